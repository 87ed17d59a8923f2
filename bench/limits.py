"""What bounded work per request costs, on the shipped demo model (CPU); prints JSON.

    python bench/limits.py [--threads 1] [--http]

- a 10 MB (and a 50 MB) message: how long until it is refused, and how much the process RSS grew;
- histories of 1,000 / 2,000 / 10,000 messages: how long fitting them to the context takes (tokenizing and
  trimming, before any prefill), and how many chat-template renders it took;
- KV reuse: prefill tokens of a session's second turn, against the full prompt, and after another
  session's turn in between;
- with ``--http``: the same 10 / 50 MB messages sent to the app's ``/chat`` with gradio_client (client and
  server in this process, so the RSS growth counts the client's JSON copies too).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--model", default="tiny")
    p.add_argument("--http", action="store_true", help="also send the huge messages through the app over HTTP")
    args = p.parse_args()

    import torch

    from mixoff_app.config import CacheConfig, EngineConfig, SamplingParams
    from mixoff_app.engine import Engine
    from mixoff_app.limits import InputTooLong
    from mixoff_app.memory import rss_bytes

    torch.set_num_threads(args.threads)
    eng = Engine.load(EngineConfig(model=args.model, device="cpu", cache=CacheConfig(sizes=(3,))))
    params = SamplingParams(max_new_tokens=256, temperature=0)
    out: dict = {"model": eng.info.model_name, "context": eng.info.max_context,
                 "limits": {"message_chars": eng.limits.message, "system_chars": eng.limits.system,
                            "history_chars": eng.limits.history}}

    huge = {}
    for mb in (10, 50):
        text = "x" * (mb * 2**20)
        rss0 = rss_bytes()
        t0 = time.perf_counter()
        try:
            eng.stream_chat([{"role": "user", "content": text}], params)
            refused = None
        except InputTooLong as exc:
            refused = str(exc)
        dt = time.perf_counter() - t0
        del text
        huge[f"{mb}MB"] = {"refused_ms": round(1000 * dt, 3), "rss_growth_mib": round((rss_bytes() - rss0) / 2**20, 1),
                           "message": refused}
    out["huge_message"] = huge

    class Counting:
        def __init__(self, tok):
            self.tok, self.renders = tok, 0

        def apply_chat_template(self, *a, **kw):
            self.renders += 1
            return self.tok.apply_chat_template(*a, **kw)

        def __call__(self, *a, **kw):
            return self.tok(*a, **kw)

        def __getattr__(self, name):
            return getattr(self.tok, name)

    real = eng.tokenizer
    fits = {}
    for n in (1000, 2000, 10000):
        conv = []
        for i in range(n // 2):
            conv += [{"role": "user", "content": f"Question {i}: what does the built-in function len do?"},
                     {"role": "assistant", "content": f"Answer {i}: it returns the number of items in a container."}]
        conv.append({"role": "user", "content": "And sorted?"})
        eng.tokenizer = Counting(real)
        t0 = time.perf_counter()
        ids, notices = eng._fit(conv, params)
        dt = time.perf_counter() - t0
        fits[str(n)] = {"fit_ms": round(1000 * dt, 1), "prompt_tokens": len(ids), "renders": eng.tokenizer.renders,
                        "notice": notices[0] if notices else None}
    eng.tokenizer = real
    out["history_fit"] = fits

    def ask(conv, session):
        text = "".join(ev.text for ev in eng.stream_chat(conv, SamplingParams(max_new_tokens=64, temperature=0),
                                                         session=session) if ev.kind == "token")
        return text, eng.stats().prefill_tokens

    conv = [{"role": "user", "content": "What does len do?"}]
    a, p1 = ask(conv, "alice")
    conv += [{"role": "assistant", "content": a}, {"role": "user", "content": "What does sorted do?"}]
    b, p2 = ask(conv, "alice")
    full2 = len(eng.prompt_ids(conv))
    _, pb = ask([{"role": "user", "content": "What does len do?"}], "bob")
    conv += [{"role": "assistant", "content": b}, {"role": "user", "content": "What does zip do?"}]
    _, p3 = ask(conv, "alice")
    out["kv_reuse"] = {"turn1_prefill": p1, "turn2_prefill": p2, "turn2_prompt": full2,
                       "other_session_prefill": pb, "turn3_after_other_session_prefill": p3,
                       "turn3_prompt": len(eng.prompt_ids(conv))}
    if args.http:
        out["huge_message_http"] = over_http(eng)
    print(json.dumps(out, indent=1))


def over_http(eng) -> dict:
    import socket

    from gradio_client import Client

    from mixoff_app.memory import rss_bytes
    from mixoff_app.ui import build_ui, launch_kwargs

    demo = build_ui(eng, max_new_tokens=8, examples=[])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, **launch_kwargs())
    c = Client(f"http://127.0.0.1:{port}/", verbose=False)
    c.predict("warm up", [], "", 0.0, 1.0, 4, api_name="/chat")
    res = {}
    for mb in (10, 50):
        msg = "x" * (mb * 2**20)
        rss0, t0 = rss_bytes(), time.perf_counter()
        try:
            c.predict(msg, [], "", 0.0, 1.0, 8, api_name="/chat")
            got = "answered"
        except Exception as exc:          # noqa: BLE001 - the refusal is what is measured
            got = str(exc)
        dt = time.perf_counter() - t0
        del msg
        res[f"{mb}MB"] = {"round_trip_s": round(dt, 2), "rss_growth_mib": round((rss_bytes() - rss0) / 2**20),
                          "message": got}
    demo.close()
    return res


if __name__ == "__main__":
    main()
