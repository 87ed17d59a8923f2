"""What a decoded token costs beyond arithmetic, on any device: host round trips and dispatched aten ops.

Prints one JSON object: for the tiny model (4 layers, k = 2, greedy), with and without quantization and
prefetch, the host round trips per decoded token (``op_counts.count_syncs`` around the engine's whole
generate loop: two answer lengths, the difference per extra token, so load and prefill cancel out) and the
non-view aten ops dispatched per decoded token and per layer (``op_counts.count_ops``; on a GPU each is a
kernel launch or more, unless a CUDA graph replays it).

    python bench/decode_costs.py [--device cpu] [--dtype float32]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
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
from mixoff_app.tiny import make_tiny  # noqa: E402


def costs(path: Path, quant, prefetch: int, device: str, dtype) -> dict:
    ids = list(range(5, 25))
    got = {}
    for n in (2, 10):
        # A fresh engine per run: the same prompt must be prefilled in full both times.
        eng = Engine.load(EngineConfig(model=str(path), device=device, quant=quant, dtype=dtype, max_context=128,
                                       cache=CacheConfig(sizes=(2,), prefetch=prefetch)))
        with count_syncs() as s, count_ops() as o:
            evs = list(eng.stream_ids(ids, SamplingParams(max_new_tokens=n, greedy=True)))
        steps = sum(e.token_id is not None for e in evs if e.kind == "token")
        got[n] = (s.total, o.total, steps)
    (s1, o1, n1), (s2, o2, n2) = got[2], got[10]
    L = eng.model.cfg.num_layers
    return {"round_trips_per_token": (s2 - s1) / (n2 - n1), "ops_per_token": (o2 - o1) / (n2 - n1),
            "ops_per_token_per_layer": (o2 - o1) / (n2 - n1) / L, "layers": L}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    out = {"benchmark": "decode_costs", "device": args.device, "dtype": args.dtype, "torch": torch.__version__,
           "model": "tiny (random, seed 0)", "cache_size": 2, "configs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        path = make_tiny(Path(tmp) / "tiny", seed=0)
        for qname, quant in (("none", NO_QUANT), ("attn4_experts2", QuantConfig())):
            for prefetch in (0, 1):
                out["configs"][f"quant={qname},prefetch={prefetch}"] = costs(path, quant, prefetch, args.device,
                                                                             args.dtype)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
