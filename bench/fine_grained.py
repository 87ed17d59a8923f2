"""Per-expert overhead on fine-grained models: the decode step's grouped expert loop against the per-expert loop
it replaced, side by side on the same engines. Prints one JSON object.

Two random models, every expert resident (exclusive placement, every expert in a slot), on the CPU:
- ``qwen3-fine``: Qwen3-MoE's structure at 48 layers x 128 experts, top-8, hidden 128, experts 128 wide
  (384 expert calls a token, each a few microseconds of arithmetic: what is left is Python and dispatch);
- ``mixtral-cpu-bench``: the ``cpu-bench`` preset (hidden 768, experts 2048 wide, 8 layers, 8 experts, top-2),
  where reading weights dominates.
Each in float32 and at attention + experts 4-bit g64, on the CPU kernels (``--kernel cpu``). The vocabulary is
the tiny model's (512) for both, so lm_head stays small.

Per model and format, one engine; ``MoEModel.grouped_experts`` picks the loop (False: the per-expert loop,
``_experts_decode``). Both loops give the same bits (tests/test_grouped_experts.py); the bench checks that the
greedy tokens agree. Reported per loop:
- ``tokens_per_s``: decode tokens/s, prefill excluded, ``--tokens`` greedy tokens after a 16-token prompt, the
  loops interleaved over ``--repeats`` rounds, median (this machine is shared: ratios between medians of one run);
- ``ops_per_token_per_layer``: dispatched aten ops per decoded token per decoder layer, counted as
  bench/decode_costs.py counts them (``op_counts.count_ops`` on the engine's step thread; two answer lengths, the
  difference per extra token, so load and prefill cancel out). The counter does not see dtype conversions
  (``.to``: no ``_to_copy`` in its counts), so the conversion of h the grouped loop hoists does not show here;
- ``python_calls_per_token_per_layer``: Python function calls (cProfile's count, builtins included) per decoded
  token per decoder layer, one-row decode steps in this thread: what the grouped loop cuts;
- ``batch3_ops_per_step_per_layer``: dispatched ops of one decode step over three sequences' rows, per decoder
  layer (the grouped loop adds the outputs rank by rank over all rows: K adds a layer instead of 3 x K).

    python bench/fine_grained.py [--threads 1] [--tokens 32] [--repeats 3] [--models qwen3-fine,mixtral-cpu-bench]
"""
from __future__ import annotations

import argparse
import contextlib
import cProfile
import json
import os
import pstats
import statistics
import sys
import tempfile
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from mixoff_app.config import NO_QUANT, CacheConfig, EngineConfig, QuantConfig, QuantSpec, SamplingParams  # noqa: E402
from mixoff_app.engine import Engine  # noqa: E402
from mixoff_app.kernels import cpu  # noqa: E402
from mixoff_app.op_counts import count_ops  # noqa: E402
from mixoff_app.presets import from_name  # noqa: E402
from mixoff_app.tiny import make_family_checkpoint, make_tiny, write_synthetic  # noqa: E402

INT4 = QuantConfig(attn=QuantSpec(bits=4, group_size=64, scale_group=256),
                   experts=QuantSpec(bits=4, group_size=64, scale_group=128))
FORMATS = {"int4": INT4, "fp32": NO_QUANT}
QWEN3_FINE = dict(hidden_size=128, num_hidden_layers=48, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                  num_experts=128, num_experts_per_tok=8, moe_intermediate_size=128, intermediate_size=768,
                  norm_topk_prob=True, max_position_embeddings=512,
                  rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
LOOPS = {"per_expert": False, "grouped": True}


def build(name: str, tmp: Path, tok: Path) -> Path:
    if name == "qwen3-fine":
        return make_family_checkpoint(tmp / name, "qwen3_moe", tok, seed=0, **QWEN3_FINE)
    return write_synthetic(tmp / name, replace(from_name("cpu-bench"), vocab_size=512), 0, tokenizer_from=tok)


def decode_tps(eng: Engine, prompt: list[int], n: int) -> tuple[float, list[int]]:
    eng.forget_kv()
    t = time.perf_counter()
    evs = list(eng.stream_ids(prompt, SamplingParams(max_new_tokens=n, greedy=True)))
    ids = [e.token_id for e in evs if e.kind == "token" and e.token_id is not None]
    return len(ids) / (time.perf_counter() - t - eng.stats().prefill_s), ids


def ops_per_token(eng: Engine, prompt: list[int]) -> float:
    """Dispatched aten ops per decoded token: two answer lengths, the difference per extra token."""
    got = {}
    for n in (2, 10):
        ops = Counter()

        @contextlib.contextmanager
        def counted():             # the steps run on the engine's step loop thread: count ops there
            with count_ops() as o:
                yield
            ops.update(o.by_op)
        eng.scheduler.step_context = counted
        eng.forget_kv()
        evs = list(eng.stream_ids(prompt, SamplingParams(max_new_tokens=n, greedy=True)))
        got[n] = (sum(ops.values()), sum(e.token_id is not None for e in evs if e.kind == "token"))
    eng.scheduler.step_context = contextlib.nullcontext
    (o1, n1), (o2, n2) = got[2], got[10]
    return (o2 - o1) / (n2 - n1)


def python_calls(eng: Engine, prompt: list[int], n: int = 4) -> float:
    """Python function calls per one-row decode step, counted by cProfile."""
    m = eng.model
    eng.forget_kv()
    m.forward(torch.tensor(prompt), 0, seq=0)
    pr = cProfile.Profile()
    pr.enable()
    for i in range(n):
        m.decode(torch.tensor([7]), [len(prompt) + i], [0])
    pr.disable()
    return pstats.Stats(pr).total_calls / n


def batch_ops(eng: Engine, rows: int = 3) -> float:
    """Dispatched ops of one decode step over ``rows`` sequences, after a prefill of each."""
    m = eng.model
    eng.forget_kv()
    prompts = [list(range(5 + s, 21 + s)) for s in range(rows)]
    for s, p in enumerate(prompts):
        m.forward(torch.tensor(p), 0, seq=s)
    with count_ops() as o:
        m.decode(torch.tensor([7 + s for s in range(rows)]), [len(p) for p in prompts], list(range(rows)))
    return o.total


def measure(path: Path, quant, tokens: int, repeats: int) -> dict:
    eng = Engine.load(EngineConfig(model=str(path), device="cpu", quant=quant, kernel="cpu", max_context=256,
                                   max_batch=3, cache=CacheConfig(placement="exclusive")))
    m, L = eng.model, eng.model.cfg.num_layers
    prompt = list(range(5, 21))
    out = {"held": eng.info.quant, "kernel": eng.info.kernel, "layers": L, "experts": m.cfg.num_experts,
           "top_k": m.cfg.top_k, "loops": {}}
    runs: dict[str, list[float]] = {k: [] for k in LOOPS}
    answers = {}
    for grouped in LOOPS.values():            # warm-up, both loops
        m.grouped_experts = grouped
        decode_tps(eng, prompt, 4)
    for _ in range(repeats):
        for name, grouped in LOOPS.items():
            m.grouped_experts = grouped
            tps, answers[name] = decode_tps(eng, prompt, tokens)
            runs[name].append(tps)
    for name, grouped in LOOPS.items():
        m.grouped_experts = grouped
        ops = ops_per_token(eng, prompt)
        calls = python_calls(eng, prompt)
        batch = batch_ops(eng)
        out["loops"][name] = {"tokens_per_s": round(statistics.median(runs[name]), 2),
                              "tokens_per_s_runs": [round(r, 2) for r in runs[name]],
                              "ops_per_token": round(ops, 1), "ops_per_token_per_layer": round(ops / L, 2),
                              "python_calls_per_token_per_layer": round(calls / L, 1),
                              "batch3_ops_per_step_per_layer": round(batch / L, 2)}
    out["same_answer"] = answers["per_expert"] == answers["grouped"]
    out["speedup"] = round(out["loops"]["grouped"]["tokens_per_s"] / out["loops"]["per_expert"]["tokens_per_s"], 3)
    m.grouped_experts = True
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--models", default="qwen3-fine,mixtral-cpu-bench")
    ap.add_argument("--formats", default="int4,fp32")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    probe = cpu.probe()
    out = {"benchmark": "fine_grained", "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
           "threads": args.threads, "tokens": args.tokens, "repeats": args.repeats, "cpu_kernel": probe.describe(),
           "models": {}}
    if not probe.ok:
        out["skipped"] = probe.reason
        print(json.dumps(out, indent=1))
        return
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        tok = make_tiny(tmp / "tok", seed=0)
        for name in args.models.split(","):
            path = build(name, tmp, tok)
            out["models"][name] = {}
            for fmt in args.formats.split(","):
                t = time.perf_counter()
                row = measure(path, FORMATS[fmt], args.tokens, args.repeats)
                row["seconds"] = round(time.perf_counter() - t, 1)
                out["models"][name][fmt] = row
                print(json.dumps({name: {fmt: row}}), file=sys.stderr, flush=True)      # progress
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
