"""The OpenAI-compatible API end to end on the real engine (tiny model, CPU), driven by the official `openai`
client: on the app Gradio launches (beside the page, whose `/chat` answers are compared) and served on its own."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import uvicorn
from gradio_client import Client

openai = pytest.importorskip("openai", reason="the API tests use the official openai client: pip install openai")

from mixoff_app.api import ApiConfig, create_app, model_id  # noqa: E402
from mixoff_app.config import CacheConfig, EngineConfig, QuantConfig, SamplingParams  # noqa: E402
from mixoff_app.engine import Engine  # noqa: E402
from mixoff_app.ui import EngineSlot, build_ui, launch_kwargs  # noqa: E402
from mixoff_app.ui.launch import api_app_kwargs  # noqa: E402

from helpers import free_port

TOKENS = 24
ROOT = Path(__file__).resolve().parents[1]
CONVERSATION = [{"role": "system", "content": "Answer briefly."},
                {"role": "user", "content": "Name a keyword."},
                {"role": "assistant", "content": "def"},
                {"role": "user", "content": "Another one?"}]


@pytest.fixture(scope="module")
def engine(tiny_dir):
    """Random weights: answers run to max_tokens, so length, stop and cancel have something to act on."""
    return Engine.load(EngineConfig(model=str(tiny_dir), device="cpu", quant=QuantConfig.from_bits(4, 2),
                                    cache=CacheConfig(sizes=(2,))))


@pytest.fixture(scope="module")
def app(engine):
    """The page and the API on one server, as `python app.py` launches them (no key, loopback)."""
    slot = EngineSlot(engine)
    demo = build_ui(slot, max_new_tokens=TOKENS, examples=["hello"])
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
                **launch_kwargs(api_app_kwargs(slot, ApiConfig(host="127.0.0.1", default_max_tokens=TOKENS))))
    yield f"http://127.0.0.1:{port}/"
    demo.close()


class Headless:
    """The API alone under uvicorn, as `serve` runs it, in a thread of this process."""

    def __init__(self, get_engine, config: ApiConfig) -> None:
        port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(create_app(get_engine, config), host="127.0.0.1", port=port,
                                                    log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.url = f"http://127.0.0.1:{port}"

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.time() + 20
        while not self.server.started:
            assert time.time() < deadline, "uvicorn did not start"
            time.sleep(0.02)
        return self.url

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def client(base: str, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=base.rstrip("/") + "/v1", api_key=key, max_retries=0, timeout=120)


def engine_answer(engine, messages, max_new_tokens=TOKENS, stop=()) -> str:
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0, stop=tuple(stop))
    return "".join(ev.text for ev in engine.stream_chat(messages, params) if ev.kind == "token")


def page_answer(url: str, messages) -> str:
    system = messages[0]["content"] if messages[0]["role"] == "system" else ""
    turns = [m for m in messages if m["role"] != "system"]
    job = Client(url, verbose=False).submit(turns[-1]["content"], turns[:-1], system, 0.0, 1.0, TOKENS,
                                            api_name="/chat")
    return job.result(timeout=120)


def error_of(resp: httpx.Response) -> dict:
    body = resp.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["message"], body
    return body["error"]


# ---- answers ------------------------------------------------------------------------------------
def test_models_list_names_the_served_model(app, engine):
    c = client(app)
    ids = [m.id for m in c.models.list().data]
    assert ids == [model_id(engine.info)] and "/" not in ids[0]
    assert c.models.retrieve(ids[0]).id == ids[0]
    with pytest.raises(openai.NotFoundError):
        c.models.retrieve("gpt-4o")


def test_greedy_chat_equals_the_engine_and_the_page(app, engine):
    out = client(app).chat.completions.create(model="any", messages=CONVERSATION, temperature=0,
                                              max_tokens=TOKENS)
    expected = engine_answer(engine, CONVERSATION)
    assert out.choices[0].message.content == expected == page_answer(app, CONVERSATION)
    assert out.choices[0].message.role == "assistant" and out.object == "chat.completion"
    assert out.model == model_id(engine.info) and out.id.startswith("chatcmpl-") and out.created > 0
    assert out.choices[0].finish_reason == "length"            # random weights never stop early
    assert out.usage.prompt_tokens == len(engine.prompt_ids(CONVERSATION))
    assert out.usage.completion_tokens == TOKENS
    assert out.usage.total_tokens == out.usage.prompt_tokens + TOKENS


def test_streamed_chunks_concatenate_to_the_same_answer(app, engine):
    c = client(app)
    whole = c.chat.completions.create(model="m", messages=CONVERSATION, temperature=0, max_tokens=TOKENS)
    chunks = list(c.chat.completions.create(model="m", messages=CONVERSATION, temperature=0, max_tokens=TOKENS,
                                            stream=True, stream_options={"include_usage": True}))
    with_choice = [ch for ch in chunks if ch.choices]
    assert with_choice[0].choices[0].delta.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in with_choice)
    assert text == whole.choices[0].message.content
    assert len([ch for ch in with_choice if ch.choices[0].delta.content]) > 3, "the answer streams in pieces"
    assert [ch.choices[0].finish_reason for ch in with_choice[:-1]] == [None] * (len(with_choice) - 1)
    assert with_choice[-1].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == TOKENS
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens
    assert all(ch.usage is None for ch in chunks[:-1])
    assert len({ch.id for ch in chunks}) == 1


def test_stream_without_usage_option_sends_no_usage_and_ends_with_done(app):
    body = {"model": "m", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "temperature": 0,
            "stream": True}
    with httpx.stream("POST", app + "v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in r.iter_lines() if ln]
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(ln[len("data: "):]) for ln in lines[:-1]]
    assert all("usage" not in e for e in events)
    assert events[-1]["choices"][0]["finish_reason"] == "length"


def test_stop_strings_end_the_answer_before_them(app, engine):
    messages = [{"role": "user", "content": "What is a list in Python?"}]
    full = engine_answer(engine, messages)
    stop = full[8:11]
    assert stop.strip() and full.find(stop) >= 1, full
    expected = full[:full.find(stop)]
    c = client(app)
    out = c.chat.completions.create(model="m", messages=messages, temperature=0, max_tokens=TOKENS,
                                    stop=[stop, "never-appears"])
    assert out.choices[0].message.content == expected == engine_answer(engine, messages, stop=[stop])
    assert out.choices[0].finish_reason == "stop"
    streamed = list(c.chat.completions.create(model="m", messages=messages, temperature=0, max_tokens=TOKENS,
                                              stop=stop, stream=True))
    assert "".join(ch.choices[0].delta.content or "" for ch in streamed) == expected
    assert streamed[-1].choices[0].finish_reason == "stop"


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
def test_max_tokens_ends_with_length(app, field):
    out = client(app).chat.completions.create(model="m", messages=[{"role": "user", "content": "Hello"}],
                                              temperature=0, **{field: 5})
    assert out.choices[0].finish_reason == "length" and out.usage.completion_tokens == 5


def test_content_parts_and_unknown_fields(app, engine):
    messages = [{"role": "user", "content": [{"type": "text", "text": "What is a "},
                                             {"type": "text", "text": "tuple?"}]}]
    out = client(app).chat.completions.create(
        model="m", messages=messages, temperature=0, max_tokens=TOKENS, user="someone", n=1,
        extra_body={"not_an_openai_field": {"x": 1}, "repetition_penalty": 1.1})
    assert out.choices[0].message.content == engine_answer(engine, [{"role": "user", "content": "What is a tuple?"}])


def test_seeded_sampling_repeats(app):
    c = client(app)
    kw = dict(model="m", messages=[{"role": "user", "content": "Tell me about dicts."}], temperature=1.0,
              top_p=0.9, max_tokens=12)
    a, b = (c.chat.completions.create(seed=7, **kw).choices[0].message.content for _ in range(2))
    assert a == b


def test_completions_continue_a_plain_prompt(app, engine):
    prompt = "def add(a, b):"
    expected = "".join(ev.text for ev in engine.stream_prompt(prompt, SamplingParams(max_new_tokens=TOKENS,
                                                                                     temperature=0))
                       if ev.kind == "token")
    c = client(app)
    out = c.completions.create(model="m", prompt=prompt, temperature=0, max_tokens=TOKENS)
    assert out.object == "text_completion" and out.choices[0].text == expected
    assert out.choices[0].finish_reason == "length" and out.usage.completion_tokens == TOKENS
    ids = list(engine.tokenizer(prompt)["input_ids"])
    assert out.usage.prompt_tokens == len(ids)
    streamed = list(c.completions.create(model="m", prompt=[prompt], temperature=0, max_tokens=TOKENS, stream=True))
    assert "".join(ch.choices[0].text for ch in streamed) == expected
    assert streamed[-1].choices[0].finish_reason == "length"
    assert c.completions.create(model="m", prompt=ids, temperature=0, max_tokens=TOKENS).choices[0].text == expected


def test_two_api_clients_and_a_page_user_each_get_their_own_answer(app, engine):
    questions = ["What is a list in Python?", "How do I open a file?", "What does range do?"]
    expected = [engine_answer(engine, [{"role": "user", "content": q}]) for q in questions]
    got: dict[int, str] = {}

    def _text(i: int) -> str:
        c = client(app)
        msgs = [{"role": "user", "content": questions[i]}]
        if i == 1:
            return "".join(ch.choices[0].delta.content or "" for ch in c.chat.completions.create(
                model="m", messages=msgs, temperature=0, max_tokens=TOKENS, stream=True) if ch.choices)
        return c.chat.completions.create(model="m", messages=msgs, temperature=0,
                                         max_tokens=TOKENS).choices[0].message.content

    def page_user() -> None:
        got[2] = page_answer(app, [{"role": "user", "content": questions[2]}])

    threads = [threading.Thread(target=lambda i=i: got.__setitem__(i, _text(i))) for i in (0, 1)]
    threads.append(threading.Thread(target=page_user))
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert [got.get(i) for i in range(3)] == expected


def test_an_api_answer_shows_on_the_page_panel(app, engine):
    out = client(app).chat.completions.create(model="m", messages=[{"role": "user", "content": "What is a set?"}],
                                              temperature=0, max_tokens=7)
    page_stats = Client(app, verbose=False).predict(api_name="/stats")
    assert page_stats["answer_tokens"] == 7 == out.usage.completion_tokens
    assert len(page_stats["routing"]) == 7
    mix = out.model_extra["mixoff"]
    assert mix["hits"] + mix["misses"] > 0 and 0 <= mix["hit_rate"] <= 1
    assert mix["hit_rate"] == pytest.approx(mix["hits"] / (mix["hits"] + mix["misses"]))
    assert mix["misses"] == mix["prefill"]["misses"] + mix["decode"]["misses"]
    assert mix["bytes_h2d"] == mix["misses"] * engine.info.expert_bytes        # no prefetch: misses move bytes
    assert mix["tokens_per_s"] > 0 and mix["completion_tokens"] == 7
    snap = httpx.get(app + "v1/mixoff/stats", timeout=30).json()
    assert snap["answer_tokens"] == 7 and snap["hits"] >= mix["hits"] and snap["num_layers"] == engine.info.num_moe_layers


def test_a_client_that_disconnects_mid_stream_stops_the_answer(app, engine):
    body = {"model": "m", "messages": [{"role": "user", "content": "Write a long story."}], "temperature": 0,
            "max_tokens": 400, "stream": True}
    with httpx.stream("POST", app + "v1/chat/completions", json=body, timeout=60) as r:
        seen = 0
        for line in r.iter_lines():
            seen += bool(line)
            if seen >= 4:
                break                      # leaving the block closes the connection
    deadline = time.time() + 30
    while engine.busy or engine.stats().generating:
        assert time.time() < deadline, "the answer kept running after its client left"
        time.sleep(0.05)
    assert engine.stats().answer_tokens < 100, "the answer stopped within a few tokens of the disconnect"
    out = client(app).chat.completions.create(model="m", messages=[{"role": "user", "content": "Hi"}],
                                              temperature=0, max_tokens=3)
    assert out.usage.completion_tokens == 3, "the engine serves the next request"


# ---- refusals -----------------------------------------------------------------------------------
@pytest.mark.parametrize("body, param, status", [
    ({"messages": [{"role": "user", "content": "Hi"}], "n": 2}, "n", 400),
    ({"messages": [{"role": "user", "content": "Hi"}], "tools": [{"type": "function", "function": {"name": "f"}}]},
     "tools", 400),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]},
     "messages[0].content[0].type", 400),
    ({"messages": [{"role": "user", "content": "Hi"}], "temperature": 5}, "temperature", 400),
    ({"messages": [{"role": "user", "content": "Hi"}], "temperature": "hot"}, "temperature", 400),
    ({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 0}, "max_tokens", 400),
    ({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": True}, "max_tokens", 400),
    ({"messages": [{"role": "user", "content": "Hi"}], "stop": ["a", "b", "c", "d", "e"]}, "stop", 400),
    ({"messages": [{"role": "user", "content": "Hi"}], "logprobs": True}, "logprobs", 400),
    ({"messages": [{"role": "user", "content": "Hi"}], "seed": 2**70}, "seed", 400),
    ({"messages": [{"role": "user", "content": "Hi"}], "response_format": {"type": "json_object"}},
     "response_format", 400),
    ({"messages": []}, "messages", 400),
    ({"model": "m"}, "messages", 400),
    ({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]},
     "messages[1].role", 400),
    ({"messages": [{"role": "wizard", "content": "Hi"}]}, "messages[0].role", 400),
    ({"messages": [{"role": "tool", "content": "42", "tool_call_id": "x"}]}, "messages[0].role", 400),
])
def test_bad_values_get_openai_shaped_errors(app, body, param, status):
    r = httpx.post(app + "v1/chat/completions", json=body, timeout=30)
    assert r.status_code == status
    err = error_of(r)
    assert err["param"] == param and err["type"] == "invalid_request_error"


def test_deeply_nested_bodies_are_refused_with_400(app):
    """Nesting past what any OpenAI request uses is one sentence and a 400, never the parser's RecursionError as a
    500; bodies at the limit are read as usual."""
    from mixoff_app.api.request import MAX_DEPTH
    for depth in (100_000, 2_000, MAX_DEPTH + 1):
        inner = "[" * (depth - 1) + "]" * (depth - 1)
        for path, body in (("v1/chat/completions", f'{{"messages": {inner}}}'), ("v1/completions",
                                                                                f'{{"prompt": "x", "stop": {inner}}}')):
            r = httpx.post(app + path, content=body.encode(), timeout=30, headers={"content-type": "application/json"})
            assert r.status_code == 400, (depth, path, r.text[:200])
            err = error_of(r)
            assert err["code"] == "invalid_json" and f"more than {MAX_DEPTH} levels" in err["message"]
    deep_ok = {"messages": [{"role": "user", "content": "Hi"}], "metadata": {"a": [[[[[[[[1]]]]]]]]},
               "max_tokens": 2}
    assert httpx.post(app + "v1/chat/completions", json=deep_ok, timeout=60).status_code == 200


def test_malformed_and_odd_requests(app):
    r = httpx.post(app + "v1/chat/completions", content=b'{"messages": [', timeout=30,
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and "JSON" in error_of(r)["message"]
    r = httpx.post(app + "v1/chat/completions", content=b'[1, 2]', timeout=30)
    assert r.status_code == 400 and "object" in error_of(r)["message"]
    r = httpx.post(app + "v1/chat/completions", timeout=30,
                   content=b'{"messages": [{"role": "user", "content": "Hi"}], "temperature": NaN}')
    assert r.status_code == 400
    r = httpx.post(app + "v1/completions", json={"prompt": ["one", "two"]}, timeout=30)
    assert r.status_code == 400 and error_of(r)["param"] == "prompt"
    r = httpx.post(app + "v1/completions", json={"prompt": [10**9]}, timeout=30)
    assert r.status_code == 400 and "vocabulary" in error_of(r)["message"]
    r = httpx.post(app + "v1/completions", json={"prompt": "x", "echo": True}, timeout=30)
    assert r.status_code == 400 and error_of(r)["param"] == "echo"
    r = httpx.post(app + "v1/completions", json={"prompt": "x " * 5000}, timeout=60)
    assert r.status_code == 400 and error_of(r)["code"] == "context_length_exceeded"
    r = httpx.post(app + "v1/embeddings", json={"input": "x"}, timeout=30)
    assert r.status_code == 404 and error_of(r)["code"] == "unknown_url"
    r = httpx.get(app + "v1/chat/completions", timeout=30)
    assert r.status_code == 405 and error_of(r)
    with pytest.raises(openai.BadRequestError) as exc:
        client(app).chat.completions.create(model="m", messages=[{"role": "user", "content": "Hi"}], n=3)
    assert "n = 3" in exc.value.message and exc.value.status_code == 400
    assert httpx.get(app, timeout=30).status_code == 200, "the page is still served beside /v1"


def test_a_key_is_required_when_set(engine):
    with Headless(lambda: engine, ApiConfig(keys=("s3cret",), default_max_tokens=4)) as url:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            r = httpx.get(url + "/v1/models", headers=headers, timeout=30)
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", headers
            assert error_of(r)["type"] == "invalid_request_error"
        assert httpx.get(url + "/v1/mixoff/stats", timeout=30).status_code == 401
        assert httpx.post(url + "/v1/chat/completions", json={}, timeout=30).status_code == 401
        with pytest.raises(openai.AuthenticationError):
            client(url, key="wrong").models.list()
        out = client(url, key="s3cret").chat.completions.create(
            model="m", messages=[{"role": "user", "content": "Hi"}], temperature=0)
        assert out.usage.completion_tokens == 4, "the server's default max_tokens"
        assert httpx.get(url + "/v1/mixoff/stats", headers={"Authorization": "Bearer s3cret"},
                         timeout=30).status_code == 200


@pytest.mark.parametrize("config, says", [(ApiConfig(host="0.0.0.0"), "bound to 0.0.0.0"),
                                          (ApiConfig(host="127.0.0.1", share=True), "share link")])
def test_keyless_api_is_refused_beyond_loopback(engine, config, says):
    with Headless(lambda: engine, config) as url:
        r = httpx.get(url + "/v1/models", timeout=30)
        assert r.status_code == 403
        err = error_of(r)
        assert says in err["message"] and "--api-key" in err["message"] and "MIXOFF_API_KEY" in err["message"]
        assert httpx.post(url + "/v1/chat/completions", json={"messages": []}, timeout=30).status_code == 403


def test_loading_model_and_outsized_bodies(engine):
    def loading():
        raise RuntimeError("the model is still loading; the panel on the right shows its progress")
    with Headless(loading, ApiConfig()) as url:
        r = httpx.get(url + "/v1/models", timeout=30)
        assert r.status_code == 503 and "still loading" in error_of(r)["message"]
        r = httpx.get(url + "/nothing-here", timeout=30)
        assert r.status_code == 404 and error_of(r)["code"] == "unknown_url"
    with Headless(lambda: engine, ApiConfig(max_body_bytes=1024)) as url:
        r = httpx.post(url + "/v1/chat/completions", timeout=30,
                       json={"messages": [{"role": "user", "content": "x" * 4096}]})
        assert r.status_code == 413 and error_of(r)["code"] == "request_too_large"


def test_api_package_imports_no_gradio():
    code = "import sys, mixoff_app.api; assert 'gradio' not in sys.modules, 'gradio was imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_app_flags_give_the_api_its_key_and_exposure():
    from mixoff_app.config import ConfigError
    from mixoff_app.ui.launch import api_config, build_parser

    def config(argv, environ=None, host="127.0.0.1"):
        return api_config(build_parser().parse_args(argv), host, environ=environ or {})
    assert config([]).keys == () and config([]).default_max_tokens == 256
    assert config([], {"MIXOFF_API_KEY": "from-env"}).keys == ("from-env",)
    assert config([], {"MIXOFF_API_KEY": "ann-key, bob-key"}).keys == ("ann-key", "bob-key")
    assert config(["--api-key", "flag"], {"MIXOFF_API_KEY": "from-env"}).keys == ("flag",)
    assert config(["--api-key", "a", "--api-key", "b"]).keys == ("a", "b")
    assert config(["--share"]).share and config(["--max-new-tokens", "9"]).default_max_tokens == 9
    assert config([], host="0.0.0.0").host == "0.0.0.0"
    with pytest.raises(ConfigError, match="blank"):
        config(["--api-key", " "])
    with pytest.raises(ConfigError, match="blank"):
        config([], {"MIXOFF_API_KEY": "a,,b"})
    with pytest.raises(ConfigError, match="given twice"):
        config(["--api-key", "a", "--api-key", "a"])


# ---- serve: the API without the page ------------------------------------------------------------
def serve_cmd(*args) -> list[str]:
    return [sys.executable, "-m", "mixoff_app", "serve", *map(str, args)]


def serve_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "MIXOFF_API_KEY"}
    return {**env, "PYTHONPATH": str(ROOT), **extra}


def test_serve_refuses_what_cannot_work_before_loading():
    r = subprocess.run(serve_cmd("--host", "0.0.0.0", "--port", free_port()), capture_output=True, text=True,
                       cwd=ROOT, env=serve_env(), timeout=120)
    assert r.returncode == 2 and "--api-key" in r.stderr and "MIXOFF_API_KEY" in r.stderr, r.stderr
    assert "loading" not in r.stderr and "ready" not in r.stderr, "refused before the model was touched"
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        r = subprocess.run(serve_cmd("--port", busy.getsockname()[1]), capture_output=True, text=True, cwd=ROOT,
                           env=serve_env(), timeout=120)
    assert r.returncode == 2 and "in use" in r.stderr, r.stderr
    r = subprocess.run(serve_cmd("--api-key", ""), capture_output=True, text=True, cwd=ROOT, env=serve_env(),
                       timeout=120)
    assert r.returncode == 2 and "blank" in r.stderr, r.stderr


def test_serve_answers_with_the_key_from_the_environment(tiny_dir, engine):
    port = free_port()
    proc = subprocess.Popen(serve_cmd("--model", tiny_dir, "--device", "cpu", "--cache-size", 2, "--port", port,
                                      "--max-new-tokens", 6), cwd=ROOT, env=serve_env(MIXOFF_API_KEY="env-key"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 240
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(url + "/v1/models", timeout=5).status_code == 401:
                    break
            except httpx.TransportError:
                pass
            assert time.time() < deadline, "serve did not come up"
            time.sleep(0.5)
        c = client(url, key="env-key")
        assert [m.id for m in c.models.list().data] == [model_id(engine.info)]
        messages = [{"role": "user", "content": "What is a list in Python?"}]
        out = c.chat.completions.create(model="m", messages=messages, temperature=0)
        assert out.usage.completion_tokens == 6 and out.choices[0].finish_reason == "length"
        assert out.choices[0].message.content == engine_answer(engine, messages, max_new_tokens=6)
        assert httpx.get(url + "/", timeout=5).status_code == 404
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_each_key_is_a_caller_of_its_own(engine):
    """Two keys, two principals: each works, neither sees the other's answer details, and each one's next turn
    reuses its own KV cache only (the engine's session is the key's)."""
    with Headless(lambda: engine, ApiConfig(keys=("ann-key", "bob-key"), host="0.0.0.0")) as url:
        def stats(key):
            return httpx.get(url + "/v1/mixoff/stats", headers={"Authorization": f"Bearer {key}"}, timeout=30).json()

        conv = [{"role": "user", "content": "What is a set?"}]
        a = client(url, key="ann-key").chat.completions.create(model="m", messages=conv, temperature=0, max_tokens=5)
        assert len(stats("ann-key")["routing"]) == 5 and stats("bob-key")["routing"] == []
        ann_session = engine.answer_session
        client(url, key="bob-key").chat.completions.create(model="m", messages=conv, temperature=0, max_tokens=5)
        assert engine.answer_session != ann_session and stats("ann-key")["routing"] == []
        assert len(stats("bob-key")["routing"]) == 5
        # Ann's second turn: Bob answered in between, so her KV cache is not reused (another principal's tokens).
        conv2 = conv + [{"role": "assistant", "content": a.choices[0].message.content},
                        {"role": "user", "content": "And a dict?"}]
        client(url, key="ann-key").chat.completions.create(model="m", messages=conv2, temperature=0, max_tokens=3)
        full = len(engine.prompt_ids(conv2))
        assert stats("ann-key")["prefill_tokens"] == full
        # Her third turn right after her second one reuses her own cache.
        client(url, key="ann-key").chat.completions.create(model="m", messages=conv2 + [
            {"role": "assistant", "content": "ok"}, {"role": "user", "content": "Thanks"}], temperature=0, max_tokens=3)
        assert stats("ann-key")["prefill_tokens"] < full
        with pytest.raises(openai.AuthenticationError):
            client(url, key="carol-key").models.list()


def test_stats_show_other_sessions_answer_details_only_to_the_operator(engine):
    """Keyed and reachable from outside: API callers are users; they see their own answer's details, not another's."""
    with Headless(lambda: engine, ApiConfig(keys=("k",), host="0.0.0.0")) as url:
        out = client(url, key="k").chat.completions.create(
            model="m", messages=[{"role": "user", "content": "What is a set?"}], temperature=0, max_tokens=5)
        mine = httpx.get(url + "/v1/mixoff/stats", headers={"Authorization": "Bearer k"}, timeout=30).json()
        assert mine["answer_tokens"] == out.usage.completion_tokens == 5 and len(mine["routing"]) == 5
        list(engine.stream_chat([{"role": "user", "content": "Hi"}], SamplingParams(max_new_tokens=3, temperature=0),
                                session="someone else"))
        theirs = httpx.get(url + "/v1/mixoff/stats", headers={"Authorization": "Bearer k"}, timeout=30).json()
        assert theirs["routing"] == [] and theirs["answer_tokens"] == 0 and theirs["prefill_tokens"] == 0
        assert theirs["hits"] + theirs["misses"] > mine["hits"] + mine["misses"], "the server's figures stay public"
