"""``plan``: where a model's parts go for a GPU and RAM size, offline (the sizing itself is ``plan.py``)."""
from __future__ import annotations

import torch

from ..config import FAMILY, PLACEMENTS, ConfigError, QuantConfig
from ..plan import model_for_planning, plan_for, presets_markdown, reference_markdown
from ..presets import PRESETS
from .args import bits, parse_gib, positive_int


def run(args) -> int:
    quant = QuantConfig.from_bits(args.attn_bits, args.expert_bits)
    cfg, quant, disk_ok, name = model_for_planning(args.model, quant)
    quant = quant.for_family(cfg.family)
    dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, None: None}[args.dtype]
    if args.presets:
        if args.vram is None or args.ram is None:
            raise ConfigError("--presets plans every preset for one machine: give --vram and --ram")
        print(presets_markdown(QuantConfig.from_bits(args.attn_bits, args.expert_bits), args.vram / 2**30,
                               args.ram / 2**30, args.max_context))
        return 0
    if args.reference:
        print(reference_markdown(cfg, quant, args.max_context, name))
        return 0
    p = plan_for(cfg, quant, args.max_context, vram_bytes=args.vram, ram_bytes=args.ram, device=args.device,
                 dtype=dtype, placement=None if args.placement == "auto" else args.placement,
                 vram_budget=args.vram_budget, ram_budget=args.ram_budget, disk_ok=disk_ok, model_name=name,
                 sequences=args.max_batch)
    if not p.feasible:
        raise ConfigError(f"{name} does not fit: {p.reason}")
    print(p.table(markdown=args.markdown))
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("plan", help="plan where the model's parts go for a GPU and RAM size (offline)")
    p.add_argument("--model", default="mixtral-8x7b",
                   help=f"a preset ({', '.join(PRESETS)}), a local checkpoint folder, or 'tiny'")
    p.add_argument("--vram", type=parse_gib, default=None, help="the GPU's memory in GB (GiB); default: measured free VRAM")
    p.add_argument("--ram", type=parse_gib, default=None, help="RAM for mixoff in GB (GiB); default: measured available RAM")
    p.add_argument("--vram-budget", type=parse_gib, default=None, help="cap on mixoff's device allocations, GB")
    p.add_argument("--ram-budget", type=parse_gib, default=None, help="cap on the RAM mixoff's load may add, GB")
    p.add_argument("--device", default="cuda", help="plan for cuda (default) or cpu")
    p.add_argument("--placement", choices=("auto",) + PLACEMENTS, default="auto")
    p.add_argument("--max-context", type=positive_int, default=4096)
    p.add_argument("--max-batch", type=positive_int, default=1,
                   help="answers decoded together: one KV cache each (default 1; the table says how many fit)")
    p.add_argument("--attn-bits", type=bits, default=4)
    p.add_argument("--expert-bits", type=bits, default=FAMILY, help="default: the model family's (see README)")
    p.add_argument("--dtype", default=None, choices=("float16", "bfloat16", "float32"))
    p.add_argument("--markdown", action="store_true", help="print the table as markdown")
    p.add_argument("--presets", action="store_true",
                   help="one markdown row per preset model for the machine given by --vram and --ram")
    p.add_argument("--reference", action="store_true",
                   help="print the plans for the README's four reference machines as one markdown table")
    p.set_defaults(func=run)
