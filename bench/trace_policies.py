"""Eviction policy hit rates on routing traces, with the Belady bound. Prints one JSON object.

    python bench/trace_policies.py                       # synthetic Mixtral-like trace, k = 2..6
    python bench/trace_policies.py --trace run.jsonl     # ... and a recorded trace
    python bench/trace_policies.py --tune                # sweep LRFU's decay (tune seed, held-out seed)
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from mixoff_app.policy import LRFU, POLICY_CLASSES  # noqa: E402
from mixoff_app.trace import belady, read_trace, routing_stats, simulate, synthetic_trace  # noqa: E402

DECAYS = (0.0, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)


def table(trace, sizes):
    out = {}
    for k in sizes:
        if k > trace.num_experts:
            continue
        row = {name: simulate(trace, k, name).hit_rate for name in POLICY_CLASSES}
        b = belady(trace, k)
        row["belady"] = b.hit_rate
        row["cold_bound"] = b.cold_bound
        out[str(k)] = {n: round(v, 4) for n, v in row.items()}
    return out


def tune(tune_seed, eval_seed, tokens, sizes):
    """Mean LRFU hit rate over ``sizes`` for each decay, on a tuning seed and a held-out seed."""
    traces = {"tune": synthetic_trace(tokens, seed=tune_seed), "held_out": synthetic_trace(tokens, seed=eval_seed)}
    sweep = {}
    for d in DECAYS:
        sweep[str(d)] = {name: round(sum(simulate(tr, k, lambda n, d=d: LRFU(n, decay=d)).hit_rate
                                         for k in sizes) / len(sizes), 4)
                         for name, tr in traces.items()}
    ref = {name: {p: round(sum(simulate(tr, k, p).hit_rate for k in sizes) / len(sizes), 4) for p in ("lru", "lfu")}
           for name, tr in traces.items()}
    best = max(DECAYS, key=lambda d: sweep[str(d)]["tune"])
    return {"tune_seed": tune_seed, "held_out_seed": eval_seed, "tokens": tokens, "sizes": sizes,
            "mean_hit_rate_by_decay": sweep, "reference": ref, "best_decay_on_tune_seed": best,
            "held_out_at_best": sweep[str(best)]["held_out"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=2, help="synthetic trace seed (2: held out from tuning)")
    ap.add_argument("--sizes", default="2,3,4,5,6")
    ap.add_argument("--trace", help="also measure this JSONL trace")
    ap.add_argument("--tune", action="store_true", help="sweep LRFU decay on seed 1, report seed 2 too")
    args = ap.parse_args(argv)
    sizes = [int(x) for x in args.sizes.split(",")]
    t0 = time.perf_counter()
    syn = synthetic_trace(args.tokens, seed=args.seed)
    stats = routing_stats(syn)
    out = {"lrfu_decay": LRFU.DEFAULT_DECAY,
           "synthetic": {"tokens": args.tokens, "layers": syn.num_layers, "seed": args.seed,
                         "routing_stats": {str(s["layer"]): {"first_same": round(s["first_same"], 4),
                                                             "share_any": round(s["share_any"], 4)}
                                           for s in stats if s["layer"] in (0, 15, 31)},
                         "hit_rate": table(syn, sizes)}}
    if args.trace:
        tr = read_trace(args.trace)
        out["trace"] = {"path": args.trace, "tokens": tr.num_tokens, "layers": tr.num_layers,
                        "hit_rate": table(tr, sizes)}
    if args.tune:
        out["tune"] = tune(1, 2, args.tokens, [k for k in sizes if k not in (1, 2)] or sizes)
    out["seconds"] = round(time.perf_counter() - t0, 2)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
