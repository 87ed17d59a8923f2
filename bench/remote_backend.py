"""What driving a remote server costs the page (``app.py --backend``), on the tiny random model on CPU: the same
greedy answer straight from an engine in this process and through ``RemoteEngine`` from ``python -m mixoff_app
serve`` in a second process (HTTP, server-sent events, the routing fields); how fast a dead server and a wrong key
are refused; and how long the panel's replay of one answer's routing takes for Mixtral's and Qwen3-30B-A3B's
shapes (synthetic routing).

Prints one JSON object. Runs are interleaved and repeated; medians are reported (this machine is shared and
noisy). Both sides run the same model on the same CPU with one torch thread each (on a loaded 2-core machine,
two spinning threads per process measured 10x slower at random), so the comparison is of the path, not of the
hardware.

    python bench/remote_backend.py [--tokens 64] [--repeats 5]
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import httpx  # noqa: E402
import torch  # noqa: E402

from mixoff_app.config import CacheConfig, EngineConfig, QuantConfig, SamplingParams  # noqa: E402
from mixoff_app.engine import Engine  # noqa: E402
from mixoff_app.remote.cache_replay import candidate_ks, card_plan, replay_answer  # noqa: E402
from mixoff_app.remote.client import BackendError  # noqa: E402
from mixoff_app.remote.config import BackendConfig  # noqa: E402
from mixoff_app.remote.engine import RemoteEngine  # noqa: E402
from mixoff_app.tiny import make_tiny  # noqa: E402
from mixoff_app.trace import synthetic_trace  # noqa: E402

MESSAGES = [{"role": "user", "content": "What is a list in Python?"}]
KEY = "bench-key"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def timed(engine, n: int) -> tuple[float, float, str]:
    t0 = time.perf_counter()
    first, text = None, []
    for ev in engine.stream_chat(MESSAGES, SamplingParams(max_new_tokens=n, temperature=0)):
        if ev.kind == "token" and ev.text:
            first = first or time.perf_counter() - t0
            text.append(ev.text)
    return time.perf_counter() - t0, first, "".join(text)


def refusal_s(engine: RemoteEngine) -> tuple[float, str]:
    t0 = time.perf_counter()
    try:
        engine.stream_chat(MESSAGES, SamplingParams(max_new_tokens=4))
    except BackendError as exc:
        return time.perf_counter() - t0, str(exc)
    raise AssertionError("not refused")


def replay_s(layers: int, experts: int, top_k: int, name: str, tokens: int = 256) -> dict:
    rows = synthetic_trace(tokens, layers, experts, top_k).routing
    card = card_plan([name])
    t0 = time.perf_counter()
    out = replay_answer(rows, experts, candidate_ks(experts, top_k), card)
    return {"tokens": tokens, "configs": len(out), "seconds": round(time.perf_counter() - t0, 2)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(1)
    folder = make_tiny(Path(tempfile.mkdtemp()) / "tiny", seed=0)
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MIXOFF_API_KEY": KEY, "OMP_NUM_THREADS": "1"}
    server = subprocess.Popen([sys.executable, "-m", "mixoff_app", "serve", "--model", str(folder), "--device", "cpu",
                               "--cache-size", "2", "--port", str(port)], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 240
        while True:
            try:
                if httpx.get(url + "/v1/models", timeout=2).status_code == 401:
                    break
            except httpx.TransportError:
                pass
            assert time.time() < deadline and server.poll() is None, "serve did not come up"
            time.sleep(0.5)
        local = Engine.load(EngineConfig(model=str(folder), device="cpu", quant=QuantConfig.from_bits(4, 2),
                                         cache=CacheConfig(sizes=(2,))))
        remote = RemoteEngine(BackendConfig(url=url + "/v1", key=KEY))
        runs: dict[str, list] = {"local": [], "remote": []}
        for _ in range(args.repeats):
            for name, engine in (("local", local), ("remote", remote)):
                runs[name].append(timed(engine, args.tokens))
        assert runs["local"][0][2] == runs["remote"][0][2], "the same greedy text both ways"
        dead = RemoteEngine(BackendConfig(url=f"http://127.0.0.1:{free_port()}/v1"))
        wrong = RemoteEngine(BackendConfig(url=url + "/v1", key="wrong"))
        out = {"tokens": args.tokens, "repeats": args.repeats, "machine": f"{os.cpu_count()} CPUs (shared)"}
        for name, rs in runs.items():
            total, first = statistics.median(r[0] for r in rs), statistics.median(r[1] for r in rs)
            out[name] = {"answer_s": round(total, 4), "first_text_s": round(first, 4),
                         "tokens_per_s": round(args.tokens / total, 1)}
        out["remote_extra_ms_per_token"] = round(1000 * (out["remote"]["answer_s"] - out["local"]["answer_s"])
                                                 / args.tokens, 3)
        for name, engine in (("dead_server", dead), ("wrong_key", wrong)):
            s, msg = refusal_s(engine)
            out[name] = {"seconds": round(s, 4), "says": msg}
        out["replay"] = {"mixtral-8x7b": replay_s(32, 8, 2, "mixtral-8x7b"),
                         "qwen3-30b-a3b": replay_s(48, 128, 8, "qwen3-30b-a3b")}
        print(json.dumps(out, indent=1))
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
