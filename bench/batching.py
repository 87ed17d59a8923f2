"""Many chats at once (continuous batching) on the CPU, side by side in one run.

On a Mixtral-shaped random model (hidden 768, intermediate 2048, 8 layers, 8 experts, top-2):

- throughput: four greedy answers of ``--tokens`` tokens, one after another against all four at once (they
  join one batch); aggregate tokens/s (prefill included, wall clock of the whole set) and whether every text is
  the same both ways;
- time to first token of an answer that arrives while three others stream, against the same answer alone;
- memory: ``--clients`` clients at once, twice, against a bounded line (``--max-waiting``): how many were
  refused (busy), and the process RSS after each wave (nothing may grow per request once they are done).

Prints one JSON object; medians over ``--repeats`` interleaved repeats.

    python bench/batching.py [--tokens 64] [--repeats 3] [--quant none,default]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from mixoff_app.config import NO_QUANT, CacheConfig, EngineConfig, QuantConfig, SamplingParams  # noqa: E402
from mixoff_app.engine import Engine  # noqa: E402
from mixoff_app.limits import Busy  # noqa: E402
from mixoff_app.memory import rss_bytes  # noqa: E402
from mixoff_app.presets import from_name  # noqa: E402
from mixoff_app.tiny import write_synthetic  # noqa: E402

SHAPE = replace(from_name("mid"), hidden_size=768, intermediate_size=2048, num_heads=12, num_kv_heads=4,
                head_dim=64)
QUESTIONS = ["Explain what the zip builtin does.", "What is a list comprehension?",
             "How do I open a file for reading?", "What does the with statement do?"]


def answer(eng: Engine, q: str, n: int, session: str, out: dict, key, streamed: list | None = None) -> None:
    """One greedy answer; ``out[key]`` = (token ids, seconds to the first token, seconds in all). ``streamed``
    (shared) gets +1 per token as it arrives."""
    t0 = time.perf_counter()
    ids, first = [], None
    for ev in eng.stream_chat([{"role": "user", "content": q}], SamplingParams(max_new_tokens=n, greedy=True),
                              session=session):
        if ev.kind == "token" and ev.token_id is not None:
            first = first or time.perf_counter() - t0
            ids.append(ev.token_id)
            if streamed is not None:
                streamed[key] += 1
    out[key] = (ids, first, time.perf_counter() - t0)


def throughput(eng: Engine, n: int) -> dict:
    eng.forget_kv()
    seq: dict = {}
    t0 = time.perf_counter()
    for i, q in enumerate(QUESTIONS):
        answer(eng, q, n, f"seq{i}", seq, i)
    one_by_one = time.perf_counter() - t0
    eng.forget_kv()
    par: dict = {}
    threads = [threading.Thread(target=answer, args=(eng, q, n, f"par{i}", par, i)) for i, q in enumerate(QUESTIONS)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    together = time.perf_counter() - t0
    tokens = sum(len(seq[i][0]) for i in seq)
    return {"one_by_one_tps": tokens / one_by_one, "together_tps": sum(len(par[i][0]) for i in par) / together,
            "same_text": all(seq[i][0] == par[i][0] for i in seq), "tokens": tokens}


def newcomer(eng: Engine, n: int) -> dict:
    """TTFT of the fourth answer, arriving once three others have each streamed a few tokens, vs. alone."""
    eng.forget_kv()
    alone: dict = {}
    answer(eng, QUESTIONS[3], 4, "alone", alone, 0)
    eng.forget_kv()
    busy: dict = {}
    streamed = [0, 0, 0]
    threads = [threading.Thread(target=answer, args=(eng, q, n, f"busy{i}", busy, i, streamed))
               for i, q in enumerate(QUESTIONS[:3])]
    for t in threads:
        t.start()
    while min(streamed) < 4:              # all three are past their prompts and streaming
        time.sleep(0.002)
    late: dict = {}
    answer(eng, QUESTIONS[3], 4, "late", late, 0)
    for t in threads:
        t.join()
    return {"ttft_alone_s": alone[0][1], "ttft_beside_three_s": late[0][1]}


def waves(eng: Engine, clients: int, n: int) -> dict:
    """``clients`` at once, twice: answered, refused as busy, RSS after each wave."""
    out = {}
    for wave in (1, 2):
        done, refused = {}, []

        def client(i: int) -> None:
            try:
                answer(eng, QUESTIONS[i % 4], n, f"w{wave}c{i}", done, i)
            except Busy:
                refused.append(i)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        out[f"wave{wave}"] = {"answered": len(done), "refused_busy": len(refused), "rss_after": rss_bytes(),
                              "load_after": list(eng.scheduler.load())}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quant", default="none,default", help="none (fp32) and/or default (4-bit attention, 2-bit experts)")
    ap.add_argument("--max-batch", type=int, default=4)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--max-waiting", type=int, default=16)
    ap.add_argument("--kernel", default="auto")
    args = ap.parse_args()
    result = {"benchmark": "batching", "shape": {k: getattr(SHAPE, k) for k in (
        "hidden_size", "intermediate_size", "num_layers", "num_experts", "top_k", "num_heads", "num_kv_heads")},
        "tokens": args.tokens, "repeats": args.repeats, "threads": torch.get_num_threads(),
        "torch": torch.__version__, "max_batch": args.max_batch, "variants": {}}
    with tempfile.TemporaryDirectory() as tmp:
        path = write_synthetic(Path(tmp) / "mixtral-cpu", SHAPE, 0)
        for name in args.quant.split(","):
            quant = NO_QUANT if name == "none" else QuantConfig()
            eng = Engine.load(EngineConfig(model=str(path), device="cpu", quant=quant, kernel=args.kernel,
                                           cache=CacheConfig(sizes=(SHAPE.num_experts,)), max_context=512,
                                           max_batch=args.max_batch, max_waiting=args.max_waiting))
            answer(eng, QUESTIONS[0], 4, "warm", {}, 0)
            runs = [throughput(eng, args.tokens) for _ in range(args.repeats)]
            ttft = [newcomer(eng, args.tokens) for _ in range(args.repeats)]
            med = {k: statistics.median(r[k] for r in runs) for k in ("one_by_one_tps", "together_tps")}
            alone = statistics.median(t["ttft_alone_s"] for t in ttft)
            beside = statistics.median(t["ttft_beside_three_s"] for t in ttft)
            rss0 = rss_bytes()
            result["variants"][name] = {
                "quant": eng.info.quant, "kernel": eng.info.kernel, "tokens_per_s_median": med,
                "speedup_together": med["together_tps"] / med["one_by_one_tps"],
                "same_text_every_run": all(r["same_text"] for r in runs), "runs": runs,
                "ttft_alone_s": alone, "ttft_beside_three_s": beside, "ttft_ratio": beside / alone, "ttft_runs": ttft,
                "rss_before_waves": rss0, "waves": waves(eng, args.clients, 16),
            }
            eng.scheduler.close()
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
