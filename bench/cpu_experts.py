"""Decode with missed experts copied into the cache (``--cpu-experts off``) beside run on the CPU from the host copy
(``--cpu-experts all``), at a small k, on the random ``cpu-bench`` preset (Mixtral's structure: hidden 768, experts
of 2048, 8 layers, 8 experts, top-2). Prints one JSON object, with the figures the cost model measured at load.

On a CPU-only machine the "device" cache is RAM: ``off`` copies each miss into a slot (a memcpy) and runs it
there; ``all`` runs it from the store's row, in the same kernel. So this measures what the copy costs here, not
the GPU trade (a PCIe copy against a CPU run), which needs a GPU and is not measured by this script's CPU run.

Decode tokens/s, prefill excluded: ``--tokens`` greedy tokens after a 16-token prompt; each repeat runs both
variants once, in turn; medians, and the ratio of medians.

    python bench/cpu_experts.py [--k 2] [--bits 4] [--tokens 32] [--repeats 3] [--threads 2]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from mixoff_app import cpu_experts as cx  # noqa: E402
from mixoff_app.config import NO_QUANT, CacheConfig, EngineConfig, QuantConfig, SamplingParams  # noqa: E402
from mixoff_app.engine import Engine  # noqa: E402
from mixoff_app.tiny import write_synthetic  # noqa: E402


def decode_tps(engine: Engine, prompt: list[int], n: int) -> float:
    engine.forget_kv()
    t0 = time.perf_counter()
    evs = list(engine.stream_ids(prompt, SamplingParams(max_new_tokens=n, greedy=True)))
    decoded = sum(e.token_id is not None for e in evs if e.kind == "token")
    return decoded / (time.perf_counter() - t0 - engine.stats().prefill_s)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--k", type=int, default=2, help="experts per layer in the cache")
    ap.add_argument("--bits", default="4", choices=("4", "none"), help="attention and expert bits (none: float32)")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--folder", type=Path, default=None, help="where the random checkpoint is (written if absent)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    folder = args.folder or Path(tempfile.mkdtemp(prefix="mixoff-cpu-experts-")) / "hf"
    if not (folder / "model.safetensors").exists():
        write_synthetic(folder, "cpu-bench", seed=0)
    quant = NO_QUANT if args.bits == "none" else QuantConfig.from_bits(4, 4)
    engines = {mode: Engine.load(EngineConfig(model=str(folder), device="cpu", quant=quant, max_context=256,
                                              cpu_experts=mode, cache=CacheConfig(sizes=(args.k,))))
               for mode in ("off", "all")}
    from transformers import AutoTokenizer
    prompt = AutoTokenizer.from_pretrained(str(folder))("def zip(*iterables): return an iterator of tuples")[
        "input_ids"][:16]
    for e in engines.values():
        decode_tps(e, prompt, 4)                                                       # warm-up
    runs: dict[str, list[float]] = {m: [] for m in engines}
    for _ in range(args.repeats):
        for mode, e in engines.items():
            runs[mode].append(decode_tps(e, prompt, args.tokens))
        print(json.dumps({k: round(v[-1], 1) for k, v in runs.items()}), file=sys.stderr, flush=True)
    med = {k: round(statistics.median(v), 2) for k, v in runs.items()}
    costs = engines["all"].model.cpu_experts.costs
    counters = {m: {k: e.answer_counters()["decode"][k] for k in ("hits", "misses", "cpu_experts", "bytes_h2d")}
                for m, e in engines.items()}
    print(json.dumps({
        "benchmark": "cpu_experts", "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
        "threads": args.threads, "k": args.k, "tokens": args.tokens, "repeats": args.repeats,
        "quant": f"{engines['off'].info.kernel}: {engines['off'].info.quant}",
        "tokens_per_s_median": med, "tokens_per_s_runs": {k: [round(x, 2) for x in v] for k, v in runs.items()},
        "all_vs_off": round(med["all"] / med["off"], 3),
        "last_answer_decode": counters,
        "measured_at_load": {"expert_bytes": costs.expert_bytes, "copy_gb_per_s": round(costs.copy_bytes_per_s / 1e9, 2),
                             "copy_ms": round(costs.copy_s * 1e3, 4), "cpu_ms_per_row": round(costs.cpu_s_per_row * 1e3, 4),
                             "cpu_kernel": costs.cpu_kernel, "threads": costs.threads,
                             "cost_model_one_row": "cpu" if cx.decide(costs.expert_bytes, costs.copy_bytes_per_s,
                                                                      costs.cpu_s_per_row) else "copy"},
        "gpu_decision": "not measured: no GPU here; --cpu-experts auto stays off on a GPU until it is",
    }, indent=1))


if __name__ == "__main__":
    main()
