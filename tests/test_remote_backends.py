"""The page's remote engine against vLLM- and SGLang-shaped servers and against broken ones.

vLLM and SGLang cannot run here: tests/fixtures/backends holds what they answer, written from their documented
formats (its README cites where). A few lines of Starlette serve those files as the engines would; the same kind of
stand-in plays the broken servers (wrong key, an error mid-answer, bad JSON, not an OpenAI server at all). Our own
server is never stood in for: tests/test_remote.py runs the real ``serve``.
"""
from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from mixoff_app.config import CacheConfig, ConfigError, SamplingParams
from mixoff_app.remote.client import BackendError
from mixoff_app.remote.config import ENV_KEY, BackendConfig, api_base, backend_key
from mixoff_app.remote.engine import RemoteEngine
from mixoff_app.remote.routing import read_routing
from mixoff_app.remote.snapshot import RemoteSnapshot
from mixoff_app.trace import Trace, compare, read_trace

from helpers import cli_here, free_port

FIXTURES = Path(__file__).parent / "fixtures" / "backends"
ASK = [{"role": "user", "content": "What does a mixture of experts do?"}]
GREEDY = SamplingParams(max_new_tokens=24, greedy=True)


def fixture(name: str):
    text = (FIXTURES / name).read_text(encoding="utf-8")
    return json.loads(text) if name.endswith(".json") else text


class Served:
    """A Starlette app under uvicorn in a thread, on a free loopback port."""

    def __init__(self, routes: list, port: int | None = None) -> None:
        self.requests: list[dict] = []
        port = port or free_port()
        self.server = uvicorn.Server(uvicorn.Config(Starlette(routes=routes), host="127.0.0.1", port=port,
                                                    log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.url = f"http://127.0.0.1:{port}/v1"

    def __enter__(self) -> "Served":
        self.thread.start()
        deadline = time.time() + 20
        while not self.server.started:
            assert time.time() < deadline, "uvicorn did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def engine_like(models: dict, stream: str, whole: dict | None = None, key: str | None = None,
                port: int | None = None) -> Served:
    """vLLM or SGLang as their fixtures say they answer; records each request's body and Authorization header."""
    served: Served

    def refused(request: Request):
        if key is not None and request.headers.get("authorization") != f"Bearer {key}":
            return JSONResponse({"object": "error", "message": "Unauthorized", "type": "Unauthorized", "code": 401},
                                status_code=401)
        return None

    async def list_models(request: Request) -> Response:
        return refused(request) or JSONResponse(models)

    async def chat(request: Request) -> Response:
        body = await request.json()
        served.requests.append({"body": body, "authorization": request.headers.get("authorization")})
        if refused(request):
            return refused(request)
        if not body.get("stream"):
            return JSONResponse(whole)
        return StreamingResponse(iter([stream]), media_type="text/event-stream")

    served = Served([Route("/v1/models", list_models), Route("/v1/chat/completions", chat, methods=["POST"])], port)
    return served


def events(name: str) -> list:
    return [json.loads(line[6:]) for line in fixture(name).splitlines() if line.startswith("data: {")]


def without_routing(event: dict) -> dict:
    event.pop("prompt_routed_experts", None)
    for choice in event["choices"]:
        choice.pop("routed_experts", None)
    return event


def remote(url: str, key: str | None = None, **kw) -> RemoteEngine:
    return RemoteEngine(BackendConfig(url=url, key=key, **kw))


def settled(engine: RemoteEngine, timeout: float = 60) -> RemoteSnapshot:
    """The engine's view once the replay (computed beside, not in a panel tick) is done."""
    deadline = time.time() + timeout
    while (snap := engine.stats()).replaying:
        assert time.time() < deadline, "the replay did not finish"
        time.sleep(0.05)
    return snap


def answer(engine: RemoteEngine, messages=ASK, params=GREEDY) -> str:
    return "".join(ev.text for ev in engine.stream_chat(messages, params) if ev.kind == "token")


# ---- vLLM -----------------------------------------------------------------------------------------
def test_a_vllm_answer_feeds_the_panel_and_the_replay():
    whole = fixture("vllm_chat.json")
    with engine_like(fixture("vllm_models.json"), fixture("vllm_chat_stream.txt"), whole, key="vk") as vllm:
        engine = remote(vllm.url, key="vk")
        info = engine.connect()
        assert (info.backend, info.model, info.max_context) == ("vllm", "mistralai/Mixtral-8x7B-Instruct-v0.1", 32768)
        assert (info.num_moe_layers, info.num_experts, info.top_k, info.shape_from) == (32, 8, 2, "preset mixtral-8x7b")
        assert answer(engine) == whole["choices"][0]["message"]["content"]
        sent = vllm.requests[-1]
        assert sent["authorization"] == "Bearer vk" and sent["body"]["stream"] is True
        assert sent["body"]["return_routed_experts"] is True and sent["body"]["temperature"] == 0
        snap = settled(engine)
    assert isinstance(snap, RemoteSnapshot) and snap.backend == "vllm"
    gen, prompt = whole["choices"][0]["routed_experts"], whole["prompt_routed_experts"]
    assert [[list(ex) for ex in tok] for tok in snap.routing] == gen
    assert [[list(ex) for ex in tok] for tok in snap.prompt_routing] == prompt
    assert (snap.answer_tokens, snap.prompt_tokens, snap.finish_reason) == (24, 14, "length")
    assert snap.ttft_s > 0 and snap.tokens_per_s > 0, "latency and speed are measured by the page"
    # the replay is our simulator's, on exactly the routing vLLM returned
    rows = {r.label: r for r in snap.replay}
    assert {"k = 2", "k = 4", "k = 6"} <= set(rows)
    expected = compare(Trace({"num_experts": 8}, [[tuple(ex) for ex in tok] for tok in gen]), 4)
    assert rows["k = 4"].hit_rates == {n: r.hit_rate for n, r in expected.items()}
    assert rows["k = 4"].cold_bound == expected["belady"].cold_bound
    assert all(r.hit_rates["belady"] >= max(r.hit_rates["lru"], r.hit_rates["lfu"]) for r in snap.replay)
    card = next(r for label, r in rows.items() if label.startswith("12 GB card"))
    assert card.bytes_per_token == pytest.approx(card.misses_per_token * 66404736), "Mixtral's 2-bit expert"
    assert snap.without_answer().routing == () and snap.without_answer().replay == ()


def test_the_replay_follows_the_k_the_operator_sets():
    with engine_like(fixture("vllm_models.json"), fixture("vllm_chat_stream.txt")) as vllm:
        engine = remote(vllm.url)
        answer(engine)
        engine.reconfigure_cache(CacheConfig(sizes=(3,), policy="lfu"))
        snap = settled(engine)
        assert snap.replay_k == 3 and "k = 3" in {r.label for r in snap.replay}
        with pytest.raises(ConfigError, match="prefetch"):
            engine.reconfigure_cache(CacheConfig(sizes=(3,), prefetch=1))


def test_every_documented_routing_form_reads_the_same():
    lists = fixture("vllm_chat.json")
    a = read_routing(lists, 14, 24)
    b = read_routing(fixture("vllm_chat_npy.json"), 14, 24)
    assert a.form == "lists" and b.form == "npy" and a.prompt == b.prompt
    assert b.generated == a.generated[:-1], "the newer form leaves out the last token (never fed back)"
    bad = json.loads(json.dumps(lists))
    bad["choices"][0]["routed_experts"][3][1] = [1]
    assert read_routing(bad, 14, 24).problem and read_routing(bad, 14, 24).generated is None
    assert read_routing({"choices": [{"routed_experts": "not base64!"}]}, 3, 2).problem
    assert read_routing({"choices": [{}]}, 3, 2).generated is None


def test_an_sglang_answer_is_read_with_a_known_models_shape():
    with engine_like(fixture("sglang_models.json"), fixture("sglang_chat_stream.txt")) as sglang:
        engine = remote(sglang.url)
        assert answer(engine) == "Each token uses four of sixty experts."
        assert sglang.requests[-1]["body"]["return_routed_experts"] is True, "SGLang asks per request"
        snap = settled(engine)
    assert (engine.info.num_moe_layers, engine.info.top_k) == (24, 4)
    assert len(snap.prompt_routing) == 9 and len(snap.routing) == 5, "9 + 6 - 1 positions, split at the prompt"
    assert all(len(tok) == 24 and all(len(ex) == 4 for ex in tok) for tok in snap.routing)
    assert snap.replay


def test_an_unknown_shape_or_no_routing_is_said_not_invented():
    models = fixture("sglang_models.json")
    models["data"][0]["id"] = models["data"][0]["root"] = "some/unknown-moe"
    with engine_like(models, fixture("sglang_chat_stream.txt")) as sglang:
        engine = remote(sglang.url)
        answer(engine)
        snap = engine.stats()
    assert snap.routing == () and snap.replay == () and "top-k" in snap.routing_note
    assert engine.info.num_experts is None and engine.info.num_moe_layers is None
    plain = fixture("vllm_models.json")
    plain["data"][0]["owned_by"] = "someone"
    stream = "".join(f"data: {json.dumps(without_routing(e))}\n\n" for e in events("vllm_chat_stream.txt"))
    with engine_like(plain, stream) as other:
        engine = remote(other.url)
        answer(engine)
        assert "return_routed_experts" not in other.requests[-1]["body"], "a plain OpenAI server is not sent it"
        snap = engine.stats()
    assert snap.backend == "openai" and snap.routing == () and "does not document" in snap.routing_note
    assert snap.tokens_per_s > 0


# ---- failures: one sentence, at once --------------------------------------------------------------
def test_a_dead_server_and_a_wrong_key_are_one_sentence_at_once():
    dead = remote(f"http://127.0.0.1:{free_port()}/v1")
    t = time.perf_counter()
    with pytest.raises(BackendError, match="could not reach the backend at http://127.0.0.1:.*connection refused"):
        dead.stream_chat(ASK, GREEDY)
    assert time.perf_counter() - t < 3
    snap = dead.stats()
    assert not snap.connected and "could not reach" in snap.problem
    with engine_like(fixture("vllm_models.json"), fixture("vllm_chat_stream.txt"), key="right") as vllm:
        for key, says in (("wrong", "refused the key.*check --backend-key"), (None, "needs one")):
            engine = remote(vllm.url, key=key)
            with pytest.raises(BackendError, match=says) as exc:
                engine.stream_chat(ASK, GREEDY)
            assert "wrong" not in str(exc.value) and "\n" not in str(exc.value)
        assert not vllm.requests, "nothing was asked of the model with a refused key"


def broken(stream_text: str, models=None) -> Served:
    async def list_models(request: Request) -> Response:
        return JSONResponse(models or fixture("vllm_models.json"))

    async def chat(request: Request) -> Response:
        return StreamingResponse(iter([stream_text]), media_type="text/event-stream")
    return Served([Route("/v1/models", list_models), Route("/v1/chat/completions", chat, methods=["POST"])])


def first_chunks(n: int) -> str:
    return "".join(line + "\n\n" for line in fixture("vllm_chat_stream.txt").split("\n\n")[:n])


@pytest.mark.parametrize("tail, says", [
    ('data: {"error": {"message": "CUDA error: an illegal memory access", "type": "InternalServerError"}}\n\n',
     "failed while answering: CUDA error: an illegal memory access; the text so far is kept"),
    ('data: {"id": "x", "choices": [{"delta": {"content": "broken\n\n', "not JSON"),
    ("", "ended the answer without saying why"),
])
def test_a_failure_mid_answer_keeps_the_text_and_says_one_sentence(tail, says):
    with broken(first_chunks(4) + tail) as server:
        engine = remote(server.url)
        got = []
        with pytest.raises(BackendError, match=says):
            for ev in engine.stream_chat(ASK, GREEDY):
                got.append(ev.text)
        assert "".join(got) == "A mixture of", "what came before the failure reached the page"
        assert not engine.busy


def test_not_an_openai_server_is_said_so():
    async def page(request: Request) -> Response:
        return HTMLResponse("<html><body>a web page</body></html>")

    with Served([Route("/v1/models", page), Route("/{p:path}", page)]) as web:
        with pytest.raises(BackendError, match="not JSON \\(text/html.*OpenAI-compatible"):
            remote(web.url).connect()
    with Served([]) as empty:
        with pytest.raises(BackendError, match="is not an OpenAI-compatible server: GET /models answered HTTP 404"):
            remote(empty.url).connect()
    with broken("", models={"object": "list", "data": []}) as server:
        with pytest.raises(BackendError, match="lists no models"):
            remote(server.url).connect()


def test_backend_flags_are_checked_and_the_key_stays_out_of_sight():
    assert api_base("gpu-box:8000") == "http://gpu-box:8000/v1" == api_base("http://gpu-box:8000/v1/")
    for bad, says in (("ftp://x", "http"), ("http://me:secret@x/v1", "credentials"), ("http://x/v1?k=1", "query")):
        with pytest.raises(ConfigError, match=says):
            api_base(bad)
    assert backend_key(None, {ENV_KEY: "from-env"}) == "from-env" and backend_key("flag", {ENV_KEY: "e"}) == "flag"
    with pytest.raises(ConfigError, match="blank"):
        backend_key(" ", {})
    config = BackendConfig(url="https://gpu-box/v1", key="s3cret")
    assert "s3cret" not in repr(config) and config.plain_http_warning() is None
    assert "plain http" in BackendConfig(url="http://gpu-box/v1", key="k").plain_http_warning()
    assert BackendConfig(url="http://127.0.0.1:8000/v1", key="k").plain_http_warning() is None


def test_redirects_are_not_followed_so_the_key_goes_nowhere_else():
    async def moved(request: Request) -> Response:
        return Response(status_code=307, headers={"location": "http://elsewhere.example/v1/models"})

    with Served([Route("/v1/models", moved)]) as server:
        with pytest.raises(BackendError, match="redirects /models to http://elsewhere.example"):
            remote(server.url, key="k").connect()


# ---- trace record --backend -----------------------------------------------------------------------
def test_trace_record_from_a_vllm_backend(tmp_path, capsys, monkeypatch):
    whole = fixture("vllm_chat.json")
    monkeypatch.setenv(ENV_KEY, "vk")
    out = tmp_path / "vllm.jsonl"
    with engine_like(fixture("vllm_models.json"), fixture("vllm_chat_stream.txt"), whole, key="vk") as vllm:
        rc, err = cli_here(capsys, "trace", "record", "--backend", vllm.url, "--prompt", "Hi", "--greedy",
                           "--max-new-tokens", 24, out)
        assert rc == 0, err
        trace = read_trace(out)
        assert trace.routing == [[tuple(ex) for ex in tok] for tok in whole["choices"][0]["routed_experts"]]
        assert trace.header["backend"] == "vllm" and trace.header["num_experts"] == 8
        assert trace.header["prompt_tokens"] == 14 and "vk" not in out.read_text()
        rc, err = cli_here(capsys, "trace", "record", "--backend", vllm.url, "--prompt", "Hi", out)
        assert rc == 2 and "exists" in err, "a user's file is not overwritten without --force"
    models = fixture("sglang_models.json")
    models["data"][0]["id"] = models["data"][0]["root"] = "some/unknown-moe"
    with engine_like(models, fixture("sglang_chat_stream.txt")) as sglang:
        rc, err = cli_here(capsys, "trace", "record", "--backend", sglang.url, "--prompt", "Hi", tmp_path / "s.jsonl")
        assert rc == 2 and "nothing to record" in err and "top-k" in err and not (tmp_path / "s.jsonl").exists()
    rc, err = cli_here(capsys, "trace", "record", "--backend", f"http://127.0.0.1:{free_port()}", "--prompt", "Hi",
                       tmp_path / "none.jsonl")
    assert rc == 2 and "could not reach" in err and not (tmp_path / "none.jsonl").exists()


# ---- the page in front of vLLM ---------------------------------------------------------------------
def test_the_page_in_front_of_vllm_shows_routing_replay_and_what_is_absent():
    from gradio_client import Client

    from mixoff_app.ui import EngineSlot, build_ui, launch_kwargs
    from mixoff_app.ui.remote_panel import render_any_info, render_any_panel

    whole = fixture("vllm_chat.json")
    with engine_like(fixture("vllm_models.json"), fixture("vllm_chat_stream.txt"), whole) as vllm:
        engine = remote(vllm.url)
        demo = build_ui(EngineSlot(engine), max_new_tokens=24, examples=[])
        port = free_port()
        demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
                    **launch_kwargs())
        try:
            client = Client(f"http://127.0.0.1:{port}/", verbose=False)
            text = client.predict("What does a mixture of experts do?", [], "", 0.0, 1.0, 24, api_name="/chat")
            assert text == whole["choices"][0]["message"]["content"]
            settled(engine)
            stats = client.predict(api_name="/stats")
            assert stats["backend"] == "vllm" and len(stats["routing"]) == 24 and len(stats["prompt_routing"]) == 14
            assert [r["label"] for r in stats["replay"]][:3] == ["k = 2", "k = 4", "k = 6"]
            info = client.predict(api_name="/info")
            assert info["backend"] == "vllm" and info["num_experts"] == 8 and info["where"] == vllm.url
            _, msg = client.predict(4, "lru", 0, api_name="/set_cache")
            assert engine.info.cache.sizes == (4,) and "k = 4" in msg
        finally:
            demo.close()
    html = render_any_panel(settled(engine), engine.info)
    for shown in ("What an expert cache would have done", "Belady", "12 GB card, 32 GB RAM (mixtral-8x7b, planner)",
                  "measured by this page", "absent here, not zero", 'class="mx-routing"',
                  "14 prompt tokens routed too"):
        assert shown in html, shown
    assert "vLLM at " + vllm.url in render_any_info(engine.info)
    other = engine.stats().without_answer()
    assert "What an expert cache" not in render_any_panel(other, engine.info), "another session's answer stays hidden"


def test_a_backend_that_comes_up_later_is_found_without_a_restart():
    port = free_port()
    engine = RemoteEngine(BackendConfig(url=f"http://127.0.0.1:{port}/v1", probe_s=0.2))
    assert "could not reach" in engine.stats().problem and not engine.info.connected
    with engine_like(fixture("vllm_models.json"), fixture("vllm_chat_stream.txt"), port=port):
        deadline = time.time() + 10
        while not engine.stats().connected:
            assert time.time() < deadline, "the page did not ask again"
            time.sleep(0.1)
        assert engine.stats().problem == "" and engine.info.backend == "vllm"
        assert answer(engine).startswith("A mixture")


def test_the_launcher_takes_backend_flags_and_refuses_local_ones(monkeypatch):
    from mixoff_app.ui import launch
    monkeypatch.setattr(launch, "first_contact", lambda engine, say: None)     # no connection to 10.1.2.3 here

    def config(argv, environ=None):
        return launch.backend_config(launch.build_parser().parse_args(argv), environ or {})

    c = config(["--backend", "gpu-box:8000", "--backend-model", "m"], {ENV_KEY: "k"})
    assert (c.url, c.key, c.model) == ("http://gpu-box:8000/v1", "k", "m")
    for extra in (["--model", "tiny"], ["--cache-size", "3"]):
        with pytest.raises(ConfigError, match="drop one of them"):
            config(["--backend", "http://x:1/v1", *extra])
    said = []
    slot = launch.remote_slot(BackendConfig(url="http://10.1.2.3:8000/v1", key="k"),
                              launch.build_parser().parse_args(["--backend", "x", "--backend-key", "k"]), said.append)
    assert isinstance(slot.engine, RemoteEngine) and slot.engine is slot.get()
    assert any("plain http" in line for line in said) and any("process list" in line for line in said)
    assert not any("k" == w for line in said for w in line.split()), "the key itself is never printed"
