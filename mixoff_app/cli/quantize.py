"""``quantize SRC OUT``: write a checkpoint in mixoff's own format (one blob per expert)."""
from __future__ import annotations

from ..config import FAMILY, ConfigError, QuantConfig
from .args import bits


def run(args) -> int:
    from ..checkpoints import save_quantized
    from ..hub import resolve
    src = resolve(args.src, print).path
    hold = None
    if args.for_cpu:
        from ..cpu_weights import cpu_hold
        from ..kernels.cpu import probe
        if not probe().ok:
            raise ConfigError(f"--for-cpu writes the CPU kernels' formats, and {probe().describe()}")
        hold = cpu_hold(probe().layout)
    out = save_quantized(src, args.out, QuantConfig.from_bits(args.attn_bits, args.expert_bits), progress=print,
                         force=args.force, hold=hold)
    print(f"wrote {out}")
    return 0


def add_parser(subparsers) -> None:
    q = subparsers.add_parser("quantize", help="quantize a checkpoint into mixoff's own format")
    q.add_argument("src", help="hub repo id or local folder (HF fp16/bf16 or the pre-quantized layout)")
    q.add_argument("out", help="output folder")
    q.add_argument("--attn-bits", type=bits, default=4)
    q.add_argument("--expert-bits", type=bits, default=FAMILY, help="default: the model family's")
    q.add_argument("--force", action="store_true", help="replace the contents of a non-empty output folder")
    q.add_argument("--for-cpu", action="store_true",
                   help="write the CPU kernel's formats (4-bit groups along the input dimension packed as this "
                        "machine's torch reads them, int8 for 8-bit), so a CPU load reads them as they are")
    q.set_defaults(func=run)
