"""The CPU speed figures the planner projects tokens/s from (plan.CPU_SPEED). Prints one JSON object.

Per thread count:
- ``int4_gbps`` / ``int8_gbps`` / ``fp32_gbps``: bytes of weight a one-token matmul reads per second, through
  the kernels the CPU path uses (torch's int4 and int8 kernels, oneDNN's float32 linear), over a set of matrices
  larger than any cache (2048 x 2048 each, cycled), so the bytes come from memory as a real model's do;
- ``layer_us`` / ``expert_us`` (measured once, at one thread: it is Python and dispatch on the calling thread,
  and a second thread does not change it, measured on the tiny models below): what a decode step costs beyond
  reading weights, per decoder layer and per routed expert call: two random models with matrices too small to
  matter (hidden 64), 8 layers, 8 experts top-2 and 64 experts top-8, on the CPU kernels; time per token =
  layers x (layer_us + top_k x expert_us), two equations, two unknowns.

    python bench/cpu_speed.py [--threads 1,2]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from mixoff_app.config import CacheConfig, EngineConfig, QuantConfig, SamplingParams  # noqa: E402
from mixoff_app.cpu_weights import quantize_int4, quantize_int8  # noqa: E402
from mixoff_app.engine import Engine  # noqa: E402
from mixoff_app.kernels import cpu  # noqa: E402
from mixoff_app.presets import from_name  # noqa: E402
from mixoff_app.tiny import write_synthetic  # noqa: E402

N = K = 2048
SET_BYTES = 256 << 20          # weights cycled per format: beyond any L3


def kernel_gbps(layout: str, rounds: int = 9) -> dict:
    """Bytes of weight per second for a one-token matmul, per format, interleaved rounds, median."""
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(N, K, generator=gen)
    w4 = quantize_int4(base, 64, layout)
    w8 = quantize_int8(base)
    sets = {"int4": [w4] + [type(w4)(w4.shape, 64, layout, w4.W_int4.clone(), w4.scale_zero.clone())
                            for _ in range(SET_BYTES // w4.nbytes - 1)],
            "int8": [w8] + [type(w8)(w8.shape, w8.W_int8.clone(), w8.scale_int8.clone())
                            for _ in range(SET_BYTES // w8.nbytes - 1)],
            "fp32": [base] + [base.clone() for _ in range(SET_BYTES // (4 * N * K) - 1)]}
    x = torch.randn(1, K, generator=gen)
    runs = {k: [] for k in sets}
    for _ in range(rounds):
        for name, ws in sets.items():
            t = time.perf_counter()
            for w in ws:
                cpu.qlinear(x, w)
            nbytes = sum(w.nbytes if hasattr(w, "nbytes") and not isinstance(w, torch.Tensor)
                         else w.numel() * w.element_size() for w in ws)
            runs[name].append(nbytes / (time.perf_counter() - t) / 1e9)
    return {f"{k}_gbps": round(statistics.median(v), 2) for k, v in runs.items()}


def overheads(tmp: Path, tokens: int = 96) -> dict:
    """(layer_us, expert_us) from two tiny-matrix models on the CPU kernels."""
    small = dict(hidden_size=64, intermediate_size=128, num_heads=4, num_kv_heads=2, head_dim=16, vocab_size=512,
                 num_layers=8)
    per_token = {}
    for E, k in ((8, 2), (64, 8)):
        path = write_synthetic(tmp / f"e{E}", replace(from_name("cpu-bench"), num_experts=E, top_k=k, **small), 0)
        eng = Engine.load(EngineConfig(model=str(path), device="cpu", quant=QuantConfig.from_bits(4, 4),
                                       kernel="cpu", max_context=256, cache=CacheConfig(placement="exclusive")))
        prompt = list(range(5, 21))
        runs = []
        for _ in range(5):
            eng.forget_kv()
            t = time.perf_counter()
            list(eng.stream_ids(prompt, SamplingParams(max_new_tokens=tokens, greedy=True)))
            runs.append((time.perf_counter() - t - eng.stats().prefill_s) / tokens)
        per_token[k] = statistics.median(runs) / 8          # per layer
    expert = (per_token[8] - per_token[2]) / 6
    return {"layer_us": round((per_token[2] - 2 * expert) * 1e6, 1), "expert_us": round(expert * 1e6, 1)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", default="1,2")
    args = ap.parse_args()
    probe = cpu.probe()
    out = {"benchmark": "cpu_speed", "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
           "cpu_kernel": probe.describe(), "threads": {}}
    if not probe.ok:
        out["skipped"] = probe.reason
        print(json.dumps(out, indent=1))
        return
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as d:
        out["step_overhead"] = overheads(Path(d))
    for t in (int(x) for x in args.threads.split(",")):
        torch.set_num_threads(t)
        out["threads"][t] = kernel_gbps(probe.layout)
        print(json.dumps({t: out["threads"][t]}), file=sys.stderr, flush=True)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
