"""What a decoded token costs beyond arithmetic, on any device: host round trips and dispatched aten ops.

Prints one JSON object: for a random model of a small preset shape (4 layers, k = 2, greedy), with and
without quantization and prefetch, for each matmul kernel, the host round trips per decoded token
(``op_counts.count_syncs`` around the engine's whole generate loop: two answer lengths, the difference per
extra token, so load and prefill cancel out) and the ops dispatched per decoded token and per layer
(``op_counts.count_ops``: non-view aten ops plus launches of our Triton kernels; on a GPU each is a kernel
launch or more, unless a CUDA graph replays it). ``--kernel triton`` on a CPU runs the kernels in Triton's
interpreter (slow; the counts are those of the GPU path, which calls the same code).

The default shape, tiny-random, has K/V projections of 32 rows, fewer than attention's 64-row quantization
group, so the fused kernels fall back to dequantize + matmul for those two; the ``tiny`` shape (256 wide, the
trained demo model's) is fused throughout, as Mixtral's shapes are.

    python bench/decode_costs.py [--device cpu] [--dtype float32] [--kernel torch triton] [--shape tiny-random]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
from collections import Counter
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from mixoff_app.config import (  # noqa: E402
    NO_QUANT,
    CacheConfig,
    EngineConfig,
    QuantConfig,
    SamplingParams,
)
from mixoff_app.engine import Engine  # noqa: E402
from mixoff_app.op_counts import count_ops, count_syncs  # noqa: E402
from mixoff_app.presets import from_name  # noqa: E402
from mixoff_app.tiny import write_synthetic  # noqa: E402


def costs(path: Path, quant, prefetch: int, device: str, dtype, kernel: str) -> dict:
    ids = list(range(5, 25))
    got = {}
    for n in (2, 10):
        # A fresh engine per run: the same prompt must be prefilled in full both times.
        eng = Engine.load(EngineConfig(model=str(path), device=device, quant=quant, dtype=dtype, max_context=128,
                                       kernel=kernel, cache=CacheConfig(sizes=(2,), prefetch=prefetch)))
        ops = Counter()

        @contextlib.contextmanager
        def counted():             # the steps run on the engine's step loop thread: count ops there
            with count_ops() as o:
                yield
            ops.update(o.by_op)
        eng.scheduler.step_context = counted
        with count_syncs() as s:
            evs = list(eng.stream_ids(ids, SamplingParams(max_new_tokens=n, greedy=True)))
        steps = sum(e.token_id is not None for e in evs if e.kind == "token")
        got[n] = (s.total, sum(ops.values()), steps)
    (s1, o1, n1), (s2, o2, n2) = got[2], got[10]
    L = eng.model.cfg.num_layers
    return {"round_trips_per_token": (s2 - s1) / (n2 - n1), "ops_per_token": (o2 - o1) / (n2 - n1),
            "ops_per_token_per_layer": (o2 - o1) / (n2 - n1) / L, "layers": L, "kernel": eng.model.kernel}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--kernel", nargs="+", default=["torch"], choices=("auto", "torch", "triton", "cpu"),
                    help="matmul kernels to count (each a set of configs)")
    ap.add_argument("--shape", default="tiny-random", choices=("tiny-random", "tiny"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    out = {"benchmark": "decode_costs", "device": args.device, "dtype": args.dtype, "torch": torch.__version__,
           "model": f"{args.shape} (random, seed 0, 4 layers)", "cache_size": 2, "configs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        path = write_synthetic(Path(tmp) / "model", replace(from_name(args.shape), num_layers=4, vocab_size=512), 0)
        for kernel in args.kernel:
            for qname, quant in (("none", NO_QUANT), ("attn4_experts2", QuantConfig())):
                for prefetch in (0, 1):
                    # The key without a kernel is the torch kernel's, as before --kernel existed.
                    key = f"quant={qname},prefetch={prefetch}" + ("" if kernel == "torch" else f",kernel={kernel}")
                    out["configs"][key] = costs(path, quant, prefetch, args.device, args.dtype, kernel)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
