"""The page in front of our own server, end to end with real processes: ``python -m mixoff_app serve`` on the random
tiny model (with a key), and ``python app.py --backend URL`` (the key from MIXOFF_BACKEND_KEY) driven by
gradio_client: the same greedy text as a local engine, Stop closing the stream on the server, the server's live
panel on the page, one sentence for a wrong key or a dead server."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from gradio_client import Client
from gradio_client.exceptions import AppError

from mixoff_app.config import CacheConfig, EngineConfig, QuantConfig, SamplingParams
from mixoff_app.engine import Engine
from mixoff_app.remote.config import BackendConfig
from mixoff_app.remote.engine import RemoteEngine
from mixoff_app.trace import read_trace
from mixoff_app.ui import EngineSlot, build_ui, launch_kwargs

from helpers import cli, free_port

ROOT = Path(__file__).resolve().parents[1]
KEY = "serve-key-7f3a"
TOKENS = 24


def env(**extra) -> dict:
    base = {k: v for k, v in os.environ.items() if k not in ("MIXOFF_API_KEY", "MIXOFF_BACKEND_KEY")}
    return {**base, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False", **extra}


class Process:
    """A subprocess whose output is kept in a file (a pipe nobody reads could fill and stall it)."""

    def __init__(self, args: list, log: Path, **extra_env) -> None:
        self.log = log
        self.proc = subprocess.Popen([sys.executable, *map(str, args)], cwd=ROOT, env=env(**extra_env),
                                     stdout=log.open("w"), stderr=subprocess.STDOUT, text=True)

    def wait_for(self, url: str, ok=lambda r: r.status_code < 500, timeout: float = 240) -> None:
        deadline = time.time() + timeout
        while True:
            assert self.proc.poll() is None, self.output()
            try:
                if ok(httpx.get(url, timeout=5)):
                    return
            except httpx.TransportError:
                pass
            assert time.time() < deadline, f"{url} did not come up:\n{self.output()}"
            time.sleep(0.5)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def server(tiny_dir, tmp_path_factory):
    """Our serve on a GPU box, played by this machine's CPU: the random tiny model, k = 2, a key."""
    port = free_port()
    proc = Process(["-m", "mixoff_app", "serve", "--model", tiny_dir, "--device", "cpu", "--cache-size", 2,
                    "--port", port], tmp_path_factory.mktemp("serve") / "serve.log", MIXOFF_API_KEY=KEY)
    url = f"http://127.0.0.1:{port}"
    proc.wait_for(url + "/v1/models", ok=lambda r: r.status_code == 401)
    yield url
    proc.stop()


@pytest.fixture(scope="module")
def page(server, tmp_path_factory):
    """``python app.py --backend URL``, the key in the environment (not in the process list)."""
    port = free_port()
    proc = Process(["app.py", "--backend", server, "--port", port, "--max-new-tokens", TOKENS],
                   tmp_path_factory.mktemp("page") / "page.log", MIXOFF_BACKEND_KEY=KEY)
    url = f"http://127.0.0.1:{port}/"
    proc.wait_for(url)
    yield url, proc
    proc.stop()


@pytest.fixture(scope="module")
def local(tiny_dir):
    """The same model and settings in this process: the reference for the page's greedy text."""
    return Engine.load(EngineConfig(model=str(tiny_dir), device="cpu", quant=QuantConfig.from_bits(4, 2),
                                    cache=CacheConfig(sizes=(2,))))


def server_stats(server: str) -> dict:
    return httpx.get(server + "/v1/mixoff/stats", headers={"Authorization": f"Bearer {KEY}"}, timeout=30).json()


def local_answer(engine, text: str, max_new_tokens: int = TOKENS) -> str:
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0)
    return "".join(ev.text for ev in engine.stream_chat([{"role": "user", "content": text}], params)
                   if ev.kind == "token")


def test_the_page_streams_the_local_engines_greedy_text(page, local, server):
    url, proc = page
    job = Client(url, verbose=False).submit("What does len do?", [], "", 0.0, 1.0, TOKENS, api_name="/chat")
    assert job.result(timeout=120) == local_answer(local, "What does len do?")
    streamed = [o for o in job.outputs() if isinstance(o, str)]
    assert len(streamed) > 3, "the answer reached the page piece by piece"
    assert server_stats(server)["answer_tokens"] == TOKENS, "the server answered it"
    assert f"backend: mixoff serve at {server}/v1 serving tiny" in proc.output()
    assert KEY not in proc.output(), "the key is never logged"
    assert KEY not in " ".join(proc.proc.args), "the key is not in the process list"


def test_the_page_shows_the_servers_live_panel(page, server):
    url, _ = page
    client = Client(url, verbose=False)
    client.predict("What is a dict?", [], "", 0.0, 1.0, 6, api_name="/chat")
    stats = client.predict(api_name="/stats")
    mine = server_stats(server)
    assert stats["answer_tokens"] == 6 and len(stats["routing"]) == 6 and stats["routing"] == mine["routing"]
    assert stats["num_layers"] == 4 and stats["cache_sizes"] == [2] * 4 and stats["hits"] + stats["misses"] > 0
    info = client.predict(api_name="/info")
    assert info["backend"] == "mixoff" and info["model"] == "tiny" and info["num_experts"] == 8
    assert KEY not in json.dumps(info) + json.dumps(stats)
    html = httpx.get(url, timeout=30).text
    assert KEY not in html
    assert httpx.get(url + "v1/models", timeout=30).status_code == 404, "no /v1 here: the API is the backend's"


def test_stop_closes_the_remote_stream_and_the_server_sees_it(page, server):
    url, _ = page
    job = Client(url, verbose=False).submit("Write a long story.", [], "", 0.0, 1.0, 2000, api_name="/chat")
    deadline = time.time() + 60
    while len(job.outputs()) < 3 and time.time() < deadline:
        time.sleep(0.02)
    job.cancel()
    deadline = time.time() + 30
    while (snap := server_stats(server))["generating"]:
        assert time.time() < deadline, "the server kept generating after the page stopped reading"
        time.sleep(0.1)
    assert 3 <= snap["answer_tokens"] < 1000, "the server stopped the answer at the disconnect"
    again = Client(url, verbose=False).predict("still there?", [], "", 0.0, 1.0, 4, api_name="/chat")
    assert again and server_stats(server)["answer_tokens"] == 4, "the next answer is served"


def test_a_wrong_key_and_a_dead_server_are_one_sentence_on_the_page(server):
    for engine, says in ((RemoteEngine(BackendConfig(url=server + "/v1", key="wrong")), "refused the key"),
                         (RemoteEngine(BackendConfig(url=f"http://127.0.0.1:{free_port()}/v1")), "could not reach")):
        demo = build_ui(EngineSlot(engine), max_new_tokens=4, examples=[])
        port = free_port()
        demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
                    **launch_kwargs())
        try:
            client = Client(f"http://127.0.0.1:{port}/", verbose=False)
            t = time.perf_counter()
            with pytest.raises(AppError, match=says) as exc:
                client.predict("hello", [], "", 0.0, 1.0, 4, api_name="/chat")
            assert time.perf_counter() - t < 10 and "wrong" not in str(exc.value)
            assert client.predict(api_name="/stats")["problem"].startswith(("the backend", "could not"))
        finally:
            demo.close()


def test_the_stop_button_ends_the_remote_answer_at_its_next_piece(server):
    """Stop sets the answer's cancel event (ui/chat.py); the remote engine then leaves the stream, closing it."""
    engine = RemoteEngine(BackendConfig(url=server + "/v1", key=KEY))
    cancel = threading.Event()
    events = engine.stream_chat([{"role": "user", "content": "Write a long story."}],
                                SamplingParams(max_new_tokens=2000, temperature=0), cancel=cancel)
    pieces = 0
    for ev in events:
        pieces += ev.kind == "token"
        if pieces == 3:
            cancel.set()
    assert ev.kind == "done" and ev.finish_reason == "cancelled" and not engine.busy
    deadline = time.time() + 30
    while (snap := server_stats(server))["generating"]:
        assert time.time() < deadline, "the server kept generating after the stream was closed"
        time.sleep(0.1)
    assert snap["answer_tokens"] < 1000, "the server stopped the answer at the disconnect"


def test_trace_record_from_our_server_equals_generate_json(server, tiny_dir, tmp_path, monkeypatch):
    out = tmp_path / "remote.jsonl"
    monkeypatch.setenv("MIXOFF_BACKEND_KEY", KEY)
    cli("trace", "record", "--backend", server, "--prompt", "What does len do?", "--greedy", "--max-new-tokens", 8,
        out)
    monkeypatch.delenv("MIXOFF_BACKEND_KEY")
    expected = json.loads(cli("generate", "--model", tiny_dir, "--device", "cpu", "--prompt", "What does len do?",
                              "--greedy", "--max-new-tokens", 8, "--json", "--quiet").stdout)["routing"]
    trace = read_trace(out)
    assert [[list(ex) for ex in tok] for tok in trace.routing] == expected
    assert trace.header["backend"] == "mixoff" and trace.header["num_experts"] == 8
    assert trace.header["expert_layers"] == [0, 1, 2, 3] and KEY not in out.read_text()
