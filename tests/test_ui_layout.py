"""``ui/layout.py``: the app end to end on the real engine (tiny model, CPU), launched in this process and driven
by gradio_client."""
from __future__ import annotations

import os
import threading
import time

import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import httpx  # noqa: E402
from gradio_client import Client  # noqa: E402
from gradio_client.exceptions import AppError, AuthenticationError  # noqa: E402

from mixoff_app.config import CacheConfig, ConfigError, EngineConfig, QuantConfig, SamplingParams  # noqa: E402
from mixoff_app.engine import Engine  # noqa: E402
from mixoff_app.ui import EngineSlot, build_ui, launch_kwargs  # noqa: E402
from mixoff_app.ui import launch as launcher  # noqa: E402

from helpers import free_port

TOKENS = 24


@pytest.fixture(scope="module")
def engine(tiny_dir):
    """The random-weights tiny Mixtral (``tiny_dir`` in conftest.py): its answers run to max_new_tokens, so
    streaming, queueing and cancelling have something to act on."""
    return Engine.load(EngineConfig(model=str(tiny_dir), device="cpu", quant=QuantConfig.from_bits(4, 2),
                                    cache=CacheConfig(sizes=(2,))))


@pytest.fixture(scope="module")
def app(engine):
    demo = build_ui(engine, max_new_tokens=TOKENS, examples=["hello"])
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
                **launch_kwargs())
    url = f"http://127.0.0.1:{port}/"
    yield url
    demo.close()


def engine_answer(engine, messages, max_new_tokens=TOKENS) -> str:
    out = ""
    for ev in engine.stream_chat(messages, SamplingParams(max_new_tokens=max_new_tokens, temperature=0)):
        if ev.kind == "token":
            out += ev.text
    return out


def stream(client: Client, message, history=None, system="", max_new_tokens=TOKENS) -> list[str]:
    job = client.submit(message, history or [], system, 0.0, 1.0, max_new_tokens, api_name="/chat")
    job.result(timeout=120)
    return [o for o in job.outputs() if isinstance(o, str)]


def test_chat_streams_and_matches_the_engine(app, engine):
    client = Client(app, verbose=False)
    outs = stream(client, "What is a list in Python?")
    assert len(outs) > 3, outs
    assert all(b.startswith(a) and len(b) > len(a) for a, b in zip(outs, outs[1:])), "the streamed text grows"
    assert outs[-1] == engine_answer(engine, [{"role": "user", "content": "What is a list in Python?"}])


def test_multi_turn_and_system_prompt_reach_the_template(app, engine):
    client = Client(app, verbose=False)
    history = [{"role": "user", "content": "Name a keyword."},
               {"role": "assistant", "content": [{"type": "text", "text": "def"}]}]
    outs = stream(client, "Another one?", history, system="Answer briefly.")
    expected = engine_answer(engine, [{"role": "system", "content": "Answer briefly."},
                                      {"role": "user", "content": "Name a keyword."},
                                      {"role": "assistant", "content": "def"},
                                      {"role": "user", "content": "Another one?"}])
    assert outs[-1] == expected
    # the history changes the answer: the same question alone is a different prompt, with a different answer
    alone = stream(client, "Another one?")[-1]
    assert alone == engine_answer(engine, [{"role": "user", "content": "Another one?"}])
    assert alone != outs[-1]
    # and so does the system prompt
    assert stream(client, "Another one?", history)[-1] != outs[-1]


def test_stats_snapshot_changes_with_each_answer(app, engine):
    client = Client(app, verbose=False)
    seen = []
    for q in ("first question", "second question"):
        before = client.predict(api_name="/stats")
        stream(client, q, max_new_tokens=8)
        after = client.predict(api_name="/stats")
        assert after["seq"] > before["seq"]
        assert after["tokens_total"] > before["tokens_total"]
        assert 1 <= after["answer_tokens"] <= 8 and len(after["routing"]) == after["answer_tokens"]
        assert after["hits"] + after["misses"] > before["hits"] + before["misses"]
        assert after["generating"] is False
        assert after["memory"]["gpu_name"] is None and after["memory"]["process_rss"] > 0
        seen.append(after["seq"])
    assert seen[1] > seen[0]
    info = client.predict(api_name="/info")
    assert info["model"] == engine.info.model_name and info["device"] == "cpu" and info["num_experts"] == 8
    assert "model_path" not in info and engine.info.model_path not in str(info)     # no server paths


def test_two_concurrent_clients_get_their_own_answers(app, engine):
    prompts = ["Tell me about tuples.", "How do classes work?"]
    expected = [engine_answer(engine, [{"role": "user", "content": p}], 48) for p in prompts]
    a, b = Client(app, verbose=False), Client(app, verbose=False)
    job_a = a.submit(prompts[0], [], "", 0.0, 1.0, 48, api_name="/chat")
    job_b = b.submit(prompts[1], [], "", 0.0, 1.0, 48, api_name="/chat")
    seen = set()
    while not (job_a.done() and job_b.done()):
        seen.add(tuple((job.status().code.name, job.status().rank) for job in (job_a, job_b)))
        time.sleep(0.02)
    assert job_a.result() == expected[0]
    assert job_b.result() == expected[1]
    assert expected[0] != expected[1]
    # one answer at a time: while one streams, the other waits in the queue with its place (rank 0 = next)
    assert any({a[0], b[0]} & {"ITERATING", "PROCESSING"} and "IN_QUEUE" in (a[0], b[0]) for a, b in seen), seen


def test_cancel_mid_answer_keeps_the_text_and_frees_the_engine(app, engine):
    client = Client(app, verbose=False)
    job = client.submit("Write a long story.", [], "", 0.0, 1.0, 2000, api_name="/chat")
    deadline = time.time() + 60
    while len(job.outputs()) < 3 and time.time() < deadline:
        time.sleep(0.02)
    job.cancel()
    deadline = time.time() + 30
    while engine.busy and time.time() < deadline:
        time.sleep(0.05)
    assert not engine.busy, "cancelling the client released the engine"
    snap = client.predict(api_name="/stats")
    assert not snap["generating"] and 3 <= snap["answer_tokens"] < 2000
    assert stream(client, "still there?", max_new_tokens=4), "the next request is served"


def test_cache_replan_through_the_api(app, engine):
    client = Client(app, verbose=False)
    info_html, msg = client.predict(3, "lfu", 0, api_name="/set_cache")
    assert "k = 3 of 8" in info_html and "lfu" in info_html and "re-planned" in msg
    assert engine.info.cache.sizes == (3,)
    stream(client, "after the change", max_new_tokens=4)
    snap = client.predict(api_name="/stats")
    assert snap["cache_sizes"] == [3] * engine.info.num_moe_layers and snap["policy"] == "lfu"
    assert all(len(r) == 3 for r in snap["resident"])
    client.predict(2, "lru", 0, api_name="/set_cache")
    assert engine.info.cache.sizes == (2,)


def test_errors_are_clear(app):
    client = Client(app, verbose=False)
    with pytest.raises(AppError, match="empty"):
        client.predict("   ", [], "", 0.0, 1.0, 4, api_name="/chat")
    with pytest.raises(AppError, match="top_p"):
        client.predict("hi", [], "", 0.5, 1.5, 4, api_name="/chat")
    with pytest.raises(AppError, match="between 1 and 8"):
        client.predict(9, "lru", 0, api_name="/set_cache")


def test_page_opens_while_the_model_loads(engine):
    gate = threading.Event()

    def loader(progress):
        progress("fetching nothing: the tiny model is local")
        gate.wait(30)
        progress("experts placed")
        return engine

    slot = EngineSlot()
    slot.load_in_background(loader)
    demo = build_ui(slot, max_new_tokens=4)
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        with pytest.raises(AppError, match="still loading"):
            client.predict(api_name="/stats")
        assert slot.lines == ["fetching nothing: the tiny model is local"]
        gate.set()
        assert slot.ready.wait(30) and slot.engine is engine
        assert client.predict(api_name="/stats")["num_layers"] == engine.info.num_moe_layers
        assert slot.lines[-1] == "experts placed"
    finally:
        gate.set()
        demo.close()


def test_loading_failure_is_shown():
    slot = EngineSlot()

    def loader(progress):
        raise ConfigError("no such model")

    slot.load_in_background(loader).join(10)
    assert slot.error == "ConfigError: no such model"
    with pytest.raises(RuntimeError, match="could not be loaded: ConfigError: no such model"):
        slot.get()


def test_auth_guards_the_page_and_the_api(engine):
    demo = build_ui(engine, max_new_tokens=4)
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
                auth=launcher.parse_auth("ann:secret"))
    try:
        url = f"http://127.0.0.1:{port}/"
        with pytest.raises(AuthenticationError, match="credentials were not provided"):
            Client(url, verbose=False).predict(api_name="/info")
        with pytest.raises(ValueError, match="Could not login"):
            Client(url, auth=("ann", "wrong"), verbose=False).predict(api_name="/info")
        # What the server itself answers, without a client library in between.
        login = httpx.post(url + "login", data={"username": "ann", "password": "wrong"})
        assert login.status_code == 400 and "Incorrect credentials" in login.text
        for path in ("config", "gradio_api/info"):
            r = httpx.get(url + path)
            assert r.status_code == 401 and "Not authenticated" in r.text, (path, r.status_code)
        r = httpx.post(url + "gradio_api/call/info", json={"data": []})
        assert r.status_code == 401, r.status_code
        assert Client(url, auth=("ann", "secret"), verbose=False).predict(api_name="/info")["model"] == engine.info.model_name
    finally:
        demo.close()
