"""What the OpenAI-compatible API adds to an answer: the same greedy answer straight from the engine, through
/v1/chat/completions streamed (official `openai` client, server-sent events) and not streamed, on the tiny
random model on CPU with the API served in this process by uvicorn.

Prints one JSON object. Runs are interleaved and repeated; medians are reported (this machine is shared and
noisy). Every run answers the same conversation, so each reuses the same KV prefix.

    python bench/api_overhead.py [--tokens 64] [--repeats 5]
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import openai
import torch
import uvicorn

from mixoff_app.api import ApiConfig, create_app
from mixoff_app.config import CacheConfig, EngineConfig, QuantConfig, SamplingParams
from mixoff_app.engine import Engine
from mixoff_app.tiny import make_tiny

MESSAGES = [{"role": "user", "content": "What is a list in Python?"}]


def direct(engine: Engine, n: int) -> tuple[float, float, str]:
    t0 = time.perf_counter()
    first, text = None, []
    for ev in engine.stream_chat(MESSAGES, SamplingParams(max_new_tokens=n, temperature=0)):
        if ev.kind == "token" and ev.text:
            first = first or time.perf_counter() - t0
            text.append(ev.text)
    return time.perf_counter() - t0, first, "".join(text)


def streamed(client: openai.OpenAI, n: int) -> tuple[float, float, str]:
    t0 = time.perf_counter()
    first, text = None, []
    for ch in client.chat.completions.create(model="m", messages=MESSAGES, temperature=0, max_tokens=n, stream=True):
        if ch.choices and ch.choices[0].delta.content:
            first = first or time.perf_counter() - t0
            text.append(ch.choices[0].delta.content)
    return time.perf_counter() - t0, first, "".join(text)


def whole(client: openai.OpenAI, n: int) -> tuple[float, str]:
    t0 = time.perf_counter()
    out = client.chat.completions.create(model="m", messages=MESSAGES, temperature=0, max_tokens=n)
    return time.perf_counter() - t0, out.choices[0].message.content


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory() as tmp:
        path = make_tiny(Path(tmp) / "tiny", seed=0)
        engine = Engine.load(EngineConfig(model=str(path), device="cpu", quant=QuantConfig.from_bits(4, 2),
                                          cache=CacheConfig(sizes=(2,))))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(lambda: engine, ApiConfig()), host="127.0.0.1", port=port,
                                           log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.02)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)

    direct(engine, 4), streamed(client, 4), whole(client, 4)                      # warm-up
    runs: dict[str, list[float]] = {k: [] for k in ("direct_s", "stream_s", "json_s", "direct_first_s",
                                                    "stream_first_s")}
    texts = set()
    for _ in range(args.repeats):
        d, d_first, d_text = direct(engine, args.tokens)
        s_, s_first, s_text = streamed(client, args.tokens)
        j, j_text = whole(client, args.tokens)
        texts |= {d_text, s_text, j_text}
        for k, v in (("direct_s", d), ("stream_s", s_), ("json_s", j), ("direct_first_s", d_first),
                     ("stream_first_s", s_first)):
            runs[k].append(v)
    server.should_exit = True
    med = {k: statistics.median(v) for k, v in runs.items()}
    print(json.dumps({
        "tokens": args.tokens, "repeats": args.repeats, "torch_threads": 1, "same_text": len(texts) == 1,
        "median": {k: round(v, 4) for k, v in med.items()},
        "direct_tokens_per_s": round(args.tokens / med["direct_s"], 1),
        "stream_tokens_per_s": round(args.tokens / med["stream_s"], 1),
        "stream_overhead_ms_per_answer": round(1000 * (med["stream_s"] - med["direct_s"]), 1),
        "json_overhead_ms_per_answer": round(1000 * (med["json_s"] - med["direct_s"]), 1),
        "stream_first_token_overhead_ms": round(1000 * (med["stream_first_s"] - med["direct_first_s"]), 1),
        "runs": {k: [round(x, 4) for x in v] for k, v in runs.items()},
    }, indent=1))


if __name__ == "__main__":
    main()
