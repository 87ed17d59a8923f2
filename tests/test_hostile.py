"""The app and the CLI as a hostile or careless user meets them: huge and malformed inputs, someone else's
settings and statistics, logins, uploads, concurrent users with one hostile, cancel and disconnect, a soak
with a bound on memory growth, and files on disk that must not be clobbered.

Driven from outside: gradio_client, raw HTTP (httpx) and the CLI as a subprocess, against the real engine on
the tiny model. Nothing here measures speed (that is bench/limits.py); it checks what comes back and what is
left behind.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import load_file, save_file

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from gradio_client import Client  # noqa: E402

from mixoff_app.access import Access, LoginThrottle, is_loopback, parse_account, public_info  # noqa: E402
from mixoff_app.checkpoints import CheckpointError, save_quantized  # noqa: E402
from mixoff_app.config import CacheConfig, ConfigError, EngineConfig, QuantConfig, SamplingParams  # noqa: E402
from mixoff_app.engine import Engine  # noqa: E402
from mixoff_app.memory import rss_bytes  # noqa: E402
from mixoff_app.ui import build_ui, launch_kwargs  # noqa: E402
from mixoff_app.ui import launch as launcher  # noqa: E402

from helpers import cli, cli_here, free_port

ROOT = Path(__file__).resolve().parents[1]
CONTEXT = 512
TOKENS = 8
MiB = 2**20
ACCOUNTS = {"ann": "ann-pass", "bob": "bob-pass", "boss": "boss-pass", "mallory": "mallory-pass"}


@pytest.fixture(scope="module")
def engine(tiny_dir):
    return Engine.load(EngineConfig(model=str(tiny_dir), device="cpu", quant=QuantConfig.from_bits(4, 2),
                                    cache=CacheConfig(sizes=(2,)), max_context=CONTEXT))


@pytest.fixture(scope="module")
def server(engine):
    """The app as shared: logins for users and an operator (--admin boss), throttled; uploads refused."""
    demo = build_ui(engine, max_new_tokens=TOKENS, examples=[], access=Access(admin="boss"))
    port = free_port()
    said: list[str] = []
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
                auth=LoginThrottle(dict(ACCOUNTS), log=said.append), **launch_kwargs())
    demo.login_log = said
    yield f"http://127.0.0.1:{port}/", demo
    demo.close()


@pytest.fixture(scope="module")
def url(server):
    return server[0]


def client(url, user="ann") -> Client:
    return Client(url, auth=(user, ACCOUNTS[user]), verbose=False)


def chat(c: Client, message, history=None, system="", temperature=0.0, top_p=1.0, max_new_tokens=TOKENS):
    return c.predict(message, history if history is not None else [], system, temperature, top_p, max_new_tokens,
                     api_name="/chat")


def engine_answer(engine, messages, max_new_tokens=TOKENS) -> str:
    return "".join(ev.text for ev in engine.stream_chat(messages, SamplingParams(max_new_tokens=max_new_tokens,
                                                                                 temperature=0))
                   if ev.kind == "token")


# ---- who may do what --------------------------------------------------------------------------------

def test_the_access_decision():
    open_app = Access()
    assert open_app.is_operator(None, "127.0.0.1", shared=False)
    assert open_app.is_operator(None, "localhost", shared=False) and is_loopback("::1")
    assert not open_app.is_operator(None, "127.0.0.1", shared=True)           # a share link reaches anyone
    assert not open_app.is_operator("ann", "0.0.0.0", shared=False)           # so does the network
    admin = Access(admin="boss")
    assert admin.is_operator("boss", "0.0.0.0", shared=True)
    assert not admin.is_operator("ann", "127.0.0.1", shared=False)            # with --admin, only the admin
    assert not admin.is_operator(None, "127.0.0.1", shared=False)


def test_logins_reject_blanks_and_the_launcher_warns():
    for bad in (" : ", "ann:", ":pw", "ann", " ann:pw", "ann:   "):
        with pytest.raises(ConfigError, match="non-empty user and password|spaces"):
            parse_account(bad, "--auth")
    assert parse_account("ann:p:w", "--admin") == ("ann", "p:w")
    with pytest.raises(ConfigError, match="same user"):
        launcher.accounts(("ann", "a"), ("ann", "b"))
    assert "without a login" in launcher.exposure_warning("0.0.0.0", False, False)
    assert "gradio.live" in launcher.exposure_warning("127.0.0.1", True, False)
    assert launcher.exposure_warning("127.0.0.1", False, False) is None
    assert launcher.exposure_warning("0.0.0.0", True, True) is None
    p = subprocess.run([sys.executable, "app.py", "--auth", " : "], capture_output=True, text=True, cwd=ROOT,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=120)
    assert p.returncode == 2 and "non-empty user and password" in p.stderr and "Traceback" not in p.stderr


def test_login_guessing_is_throttled(url, server):
    wrong = [httpx.post(f"{url}login", data={"username": "mallory", "password": f"guess{i}"}).status_code
             for i in range(8)]
    assert set(wrong) == {400}
    # Now even the right password fails for that name until the window passes; others can still log in.
    assert httpx.post(f"{url}login", data={"username": "mallory", "password": ACCOUNTS["mallory"]}).status_code == 400
    assert httpx.post(f"{url}login", data={"username": "bob", "password": ACCOUNTS["bob"]}).status_code == 200
    assert any("too many wrong tries" in line for line in server[1].login_log)
    # The throttle on its own, with a clock: the window passes and the right password works again.
    now = [0.0]
    t = LoginThrottle({"a": "b"}, max_failures=2, window_s=10, clock=lambda: now[0])
    assert not t("a", "x") and not t("a", "y") and not t("a", "b")
    now[0] = 11
    assert t("a", "b")


def test_the_guard_answers_before_gradio_reads(url):
    """A body announced as 50 MB is refused from its headers, at once, on the live server; wrong logins from
    one address are slowed for that address only (the client binds 127.0.0.2, so this test's guessing does
    not lock out the other tests, which log in from 127.0.0.1)."""
    import socket
    from urllib.parse import urlparse

    u = urlparse(url)
    with socket.create_connection((u.hostname, u.port), timeout=10) as sock:
        sock.sendall(b"POST /gradio_api/queue/join HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 50000000\r\n\r\n")
        t0 = time.monotonic()
        reply = b""
        while b"larger than this server takes" not in reply and time.monotonic() - t0 < 10:
            part = sock.recv(4096)          # the head and the body may come in separate packets
            if not part:
                break
            reply += part
        elapsed = time.monotonic() - t0
    reply = reply.decode(errors="replace")
    assert reply.startswith("HTTP/1.1 413") and "larger than this server takes" in reply, reply
    assert elapsed < 5, elapsed
    other = httpx.Client(transport=httpx.HTTPTransport(local_address="127.0.0.2"))
    # "eve" has no account: the per-name throttle locks out no one the other tests log in as.
    codes = [other.post(f"{url}login", data={"username": "eve", "password": f"nope{i}"}).status_code
             for i in range(20)]
    r = other.post(f"{url}login", data={"username": "bob", "password": ACCOUNTS["bob"]})
    assert set(codes) == {400} and r.status_code == 429 and "wait 60 s" in r.json()["detail"]
    assert httpx.post(f"{url}login", data={"username": "bob", "password": ACCOUNTS["bob"]}).status_code == 200


def test_cache_settings_are_the_operators(url, engine):
    ann, boss = client(url), client(url, "boss")
    with pytest.raises(Exception, match="belong to the operator"):
        ann.predict(3, "lfu", 1, api_name="/set_cache")
    assert engine.info.cache.sizes == (2,) and engine.info.cache.policy == "lru"
    _, msg = boss.predict(3, "lfu", 1, api_name="/set_cache")
    assert "re-planned" in msg and engine.info.cache.sizes == (3,) and engine.info.cache.prefetch == 1
    # Bounds come from the loaded model, for the operator too; bad types get a sentence, not Python.
    for args, msg in (((2, "lru", 9), "prefetch must be between 0 and 8"),
                      ((2, "nope", 0), "eviction policy must be one of"),
                      ((2.5, "lru", 0), "whole number")):
        with pytest.raises(Exception, match=msg):
            boss.predict(*args, api_name="/set_cache")
    boss.predict(2, "lru", 0, api_name="/set_cache")
    assert engine.info.cache.sizes == (2,) and engine.info.cache.prefetch == 0
    assert chat(ann, "still answering?")


def test_prefetch_wider_than_the_experts_is_refused_everywhere(engine, tiny_dir):
    with pytest.raises(ConfigError, match="prefetch 9 is more than the 8 experts"):
        engine.reconfigure_cache(CacheConfig(sizes=(2,), prefetch=9))
    p = cli("generate", "--model", tiny_dir, "--device", "cpu", "--prompt", "hi", "--prefetch", "9", check=False)
    assert p.returncode == 2 and "prefetch 9 is more than the 8 experts" in p.stderr
    assert "Traceback" not in p.stderr


def test_stats_show_no_other_sessions_answer_and_info_no_paths(url, engine):
    ann, bob, boss = client(url), client(url, "bob"), client(url, "boss")
    chat(bob, "bob's private question about os.environ", max_new_tokens=6)
    seen_by_ann = ann.predict(api_name="/stats")
    assert seen_by_ann["routing"] == [] and seen_by_ann["prefill_tokens"] == 0 and seen_by_ann["answer_tokens"] == 0
    assert seen_by_ann["hits"] + seen_by_ann["misses"] > 0            # the cache itself stays public
    assert len(boss.predict(api_name="/stats")["routing"]) == 6         # the operator sees it
    assert len(bob.predict(api_name="/stats")["routing"]) == 6          # and so does its owner
    info = ann.predict(api_name="/info")
    assert "model_path" not in info and engine.info.model_path not in json.dumps(info)


def test_uploads_are_refused(url):
    with httpx.Client(base_url=url) as h:
        assert h.post("login", data={"username": "ann", "password": ACCOUNTS["ann"]}).status_code == 200
        r = h.post("gradio_api/upload", files={"files": ("big.bin", b"x" * (2 * MiB), "application/octet-stream")})
        assert r.status_code == 413, r.text


# ---- bounded work -------------------------------------------------------------------------------------

def test_huge_inputs_are_refused_at_once_without_memory_growth(url, engine, capfd):
    ann = client(url)
    chat(ann, "warm up")
    capfd.readouterr()
    rss0 = rss_bytes()
    huge = "x" * (10 * MiB)
    for kwargs, msg in (({"message": huge}, "message is too long: 10,485,760 characters"),
                        ({"message": "hi", "system": huge}, "system prompt is too long: 10,485,760 characters"),
                        ({"message": "hi", "history": [{"role": "user", "content": huge},
                                                      {"role": "assistant", "content": "ok"}]}, None)):
        if msg is None:           # a huge old turn is dropped (from the oldest), and the answer still comes
            answer = chat(ann, **kwargs)
            seen = ann.predict(api_name="/stats")
            assert answer.strip() and seen["answer_tokens"] > 0
            # Only "hi" was prefilled: the 10 MiB turn never reached the tokenizer's output, let alone the model.
            assert seen["prefill_tokens"] <= len(engine.prompt_ids([{"role": "user", "content": "hi"}]))
        else:
            with pytest.raises(Exception, match=msg):
                chat(ann, **kwargs)
    grown = rss_bytes() - rss0
    assert grown < 200 * MiB, f"RSS grew {grown / MiB:.0f} MiB"
    err = capfd.readouterr().err
    assert err.count("mixoff: refused chat:") == 2 and "Traceback" not in err      # one line per refusal


def test_malformed_api_calls_get_one_sentence(url, capfd):
    ann = client(url)
    cases = [
        (dict(message=5), "message must be text"),
        (dict(message="hi", history="not a list"), "history must be a list"),
        (dict(message="hi", history=[1, 2]), "history must be a list"),
        (dict(message="hi", system=["x"]), "system_prompt must be text"),
        (dict(message="hi", temperature="abc"), "temperature must be a number"),
        (dict(message="hi", temperature="inf"), "temperature must be a finite number"),
        (dict(message="hi", max_new_tokens="many"), "max new tokens must be a number"),
        (dict(message="hi", max_new_tokens=2.5), "whole number"),
        (dict(message="hi", top_p=0), "top_p"),
        (dict(message="   "), "empty"),
    ]
    capfd.readouterr()
    for kwargs, msg in cases:
        with pytest.raises(Exception, match=msg):
            chat(ann, **kwargs)
    err = capfd.readouterr().err
    assert err.count("mixoff: refused chat:") == len(cases) and "Traceback" not in err
    for leak in ("could not convert", "has no attribute", "invalid literal"):
        assert leak not in err


def test_ten_thousand_turns_are_answered(url, engine):
    history = []
    for i in range(5000):
        history += [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"answer {i}"}]
    ann = client(url)
    answer = chat(ann, "and the last one?", history)
    seen = ann.predict(api_name="/stats")
    assert answer.strip() and seen["answer_tokens"] > 0
    # The oldest turns were left out so the prompt fits the context, with room for the answer.
    assert 0 < seen["prefill_tokens"] <= engine.model.max_seq - 1


def test_kv_reuse_through_the_app_is_per_session(url, engine):
    """Turn 2 of a browser session prefills only its new tokens (read from its own /stats); another session's
    turn in between runs in a KV slot of its own, so turn 3 still prefills only its new tokens, and the answer is
    the one a fresh engine gives."""
    alice, bob = client(url), client(url, "bob")
    conv = [{"role": "user", "content": "What does len do?"}]
    a = chat(alice, conv[0]["content"], [])
    conv += [{"role": "assistant", "content": a}, {"role": "user", "content": "And zip?"}]
    b = chat(alice, "And zip?", conv[:2])
    turn2 = alice.predict(api_name="/stats")["prefill_tokens"]
    full = len(engine.prompt_ids(conv))
    assert turn2 <= full - len(engine.prompt_ids(conv[:1])), (turn2, full)
    chat(bob, "What does len do?", [])
    conv += [{"role": "assistant", "content": b}, {"role": "user", "content": "And map?"}]
    c = chat(alice, "And map?", conv[:4])
    turn3 = alice.predict(api_name="/stats")["prefill_tokens"]
    assert turn3 <= len(engine.prompt_ids(conv)) - len(engine.prompt_ids(conv[:3])), turn3
    assert c == engine_answer(engine, conv)


# ---- many users, one hostile ---------------------------------------------------------------------------

def test_concurrent_users_with_one_hostile(url, engine):
    questions = ["What is a list?", "Explain the with statement.", "What does zip do?"]
    expected = [engine_answer(engine, [{"role": "user", "content": q}]) for q in questions]
    got: dict[int, str] = {}
    stop = threading.Event()
    hostile_refusals = []

    def user(i):
        got[i] = chat(client(url, "bob"), questions[i])

    def hostile():
        c = client(url, "ann")
        attacks = [dict(message="x" * (4 * MiB)), dict(message="hi", history="junk"),
                   dict(message="hi", temperature="hot"), dict(message="hi", system="y" * (4 * MiB))]
        while not stop.is_set():
            for a in attacks:
                try:
                    chat(c, **a)
                except Exception as exc:          # noqa: BLE001 - each must be refused
                    hostile_refusals.append(str(exc))
            try:
                c.predict(8, "lfu", 4, api_name="/set_cache")
            except Exception as exc:              # noqa: BLE001
                hostile_refusals.append(str(exc))

    h = threading.Thread(target=hostile)
    h.start()
    users = [threading.Thread(target=user, args=(i,)) for i in range(len(questions))]
    for t in users:
        t.start()
    for t in users:
        t.join(timeout=300)
    stop.set()
    h.join(timeout=120)
    assert [got.get(i) for i in range(len(questions))] == expected
    assert hostile_refusals and engine.info.cache.sizes == (2,) and engine.info.cache.policy == "lru"


def test_cancel_and_disconnect_free_the_engine(url, engine):
    ann = client(url)
    job = ann.submit("Write a long story.", [], "", 0.0, 1.0, CONTEXT, api_name="/chat")
    deadline = time.time() + 60
    while len(job.outputs()) < 3 and time.time() < deadline:
        time.sleep(0.02)
    job.cancel()
    wait_idle(engine)
    # A raw HTTP client that starts a long answer and goes away mid-stream.
    with httpx.Client(base_url=url, timeout=60) as h:
        h.post("login", data={"username": "ann", "password": ACCOUNTS["ann"]})
        event = h.post("gradio_api/call/chat", json={"data": ["Another long story.", [], "", 0.0, 1.0, CONTEXT]})
        event_id = event.json()["event_id"]
        with h.stream("GET", f"gradio_api/call/chat/{event_id}") as r:
            lines = 0
            for _ in r.iter_lines():
                lines += 1
                if lines > 6:
                    break
    wait_idle(engine)
    assert chat(ann, "still there?", max_new_tokens=2) is not None


def wait_idle(engine, timeout=60):
    deadline = time.time() + timeout
    while engine.busy and time.time() < deadline:
        time.sleep(0.05)
    assert not engine.busy, "the engine was released"


def test_soak_bounded_memory_growth(url):
    c = client(url)
    for _ in range(20):                                      # warm up allocator pools and gradio's caches
        chat(c, "warm", max_new_tokens=1)
    rss0 = rss_bytes()
    bad = 0
    for i in range(240):
        if i % 4 == 3:
            try:
                chat(c, "z" * 100_000, max_new_tokens=1)
            except Exception:                                # noqa: BLE001 - refused every time
                bad += 1
        else:
            chat(c, f"question {i}", [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                 max_new_tokens=2)
    grown = rss_bytes() - rss0
    assert bad == 60
    assert grown < 64 * MiB, f"RSS grew {grown / MiB:.1f} MiB over 240 requests"


# ---- the CLI and files on disk ------------------------------------------------------------------------



def tree(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_quantize_never_clobbers(tiny_dir, tmp_path, capsys):
    src = tmp_path / "src"
    import shutil
    shutil.copytree(tiny_dir, src)
    before = tree(src)
    p = cli("quantize", src, src, check=False)
    assert p.returncode == 2 and "choose a separate output folder" in p.stderr and "Traceback" not in p.stderr
    rc, err = cli_here(capsys, "quantize", src, src / "inside")
    assert rc == 2 and "separate output folder" in err
    assert tree(src) == before, "the source is untouched"
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    rc, err = cli_here(capsys, "quantize", src, out)
    assert rc == 2 and "not empty" in err and "--force" in err
    assert tree(out) == {"notes.txt": b"mine"}
    assert cli_here(capsys, "quantize", src, out, "--force")[0] == 0
    assert "notes.txt" not in tree(out) and (out / "trunk.safetensors").exists()
    assert not [q for q in tmp_path.iterdir() if q.name.startswith(".")], "no temporary folder left"
    (tmp_path / "a-file").write_text("f")
    rc, err = cli_here(capsys, "quantize", src, tmp_path / "a-file" / "x")
    assert rc == 2 and "cannot write the output folder" in err


def test_an_interrupted_quantize_leaves_nothing(tiny_dir, tmp_path):
    out = tmp_path / "q"
    calls = []

    def progress(msg):
        calls.append(msg)
        if "experts-00001" in msg:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        save_quantized(tiny_dir, out, QuantConfig.from_bits(4, 2), progress=progress)
    assert calls and not out.exists() and list(tmp_path.iterdir()) == []


def edited_copy(tiny_dir, folder, edit=None, config=None):
    import shutil
    shutil.copytree(tiny_dir, folder)
    if edit is not None:
        sd = load_file(str(folder / "model.safetensors"))
        edit(sd)
        save_file(sd, str(folder / "model.safetensors"))
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config(json.loads((folder / "config.json").read_text()))))
    return folder


def nan_at(key, index=0):
    def edit(sd):
        t = sd[key].clone()
        t.view(-1)[index] = float("nan")
        sd[key] = t
    return edit


BROKEN = {
    "short_embeddings": (dict(edit=lambda sd: sd.update({"model.embed_tokens.weight":
                                                         sd["model.embed_tokens.weight"][:100].clone()})),
                         r"model\.safetensors: tensor model\.embed_tokens\.weight has shape \(100, 64\)"),
    "lm_head_shape": (dict(edit=lambda sd: sd.update({"lm_head.weight": sd["lm_head.weight"][:, :32].clone()})),
                      r"tensor lm_head\.weight has shape"),
    "gate_shape": (dict(edit=lambda sd: sd.update({"model.layers.1.block_sparse_moe.gate.weight":
                                                   torch.zeros(4, 64)})),
                   r"model\.layers\.1\.block_sparse_moe\.gate\.weight has shape \(4, 64\)"),
    "nan_trunk": (dict(edit=nan_at("model.layers.2.self_attn.k_proj.weight", 5)),
                  r"model\.layers\.2\.self_attn\.k_proj\.\S+ holds NaN"),
    "nan_expert": (dict(edit=nan_at("model.layers.0.block_sparse_moe.experts.5.w3.weight", 7)),
                   r"model\.safetensors: tensor model\.layers\.0\.block_sparse_moe\.experts\.5\.w3\.\S+ holds NaN"),
    "list_config": (dict(config=lambda c: [c]), r"config\.json: config\.json must be a JSON object"),
    "string_size": (dict(config=lambda c: c | {"hidden_size": "64"}), r"hidden_size must be a whole number >= 1, not '64'"),
    "negative_layers": (dict(config=lambda c: c | {"num_hidden_layers": -2}),
                        r"num_hidden_layers must be a whole number >= 1, not -2"),
    "zero_heads": (dict(config=lambda c: c | {"num_attention_heads": 0}), r"num_attention_heads must be a whole"),
    "bad_eps": (dict(config=lambda c: c | {"rms_norm_eps": "tiny"}), r"rms_norm_eps must be a positive number"),
}


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_broken_checkpoints_are_refused_naming_file_and_tensor(tiny_dir, tmp_path, name):
    kwargs, msg = BROKEN[name]
    folder = edited_copy(tiny_dir, tmp_path / name, **kwargs)
    for quant in (QuantConfig.from_bits(None, None), QuantConfig.from_bits(4, 2)):
        with pytest.raises(CheckpointError, match=msg):
            Engine.load(EngineConfig(model=str(folder), device="cpu", quant=quant, cache=CacheConfig(sizes=(2,))))


def test_broken_checkpoint_through_the_cli(tiny_dir, tmp_path):
    folder = edited_copy(tiny_dir, tmp_path / "short", **BROKEN["short_embeddings"][0])
    p = cli("generate", "--model", folder, "--device", "cpu", "--prompt", "hi", check=False)
    assert p.returncode == 2 and "model.embed_tokens.weight has shape (100, 64)" in p.stderr
    assert "Traceback" not in p.stderr and p.stderr.strip().count("\n") < 20


def test_cli_inputs_get_one_sentence(tmp_path, tiny_dir, capsys):
    binary = tmp_path / "trace.jsonl"
    binary.write_bytes(bytes(range(256)) * 64)
    for args, msg in ((("plan", "--vram", "inf"), "--vram: expected a number of GB"),
                      (("plan", "--vram-budget", "inf"), "--vram-budget: expected a number of GB"),
                      (("plan", "--vram", "nan"), "--vram: expected a number of GB"),
                      (("trace", "replay", binary, "-k", "2"), f"{binary}:1: not UTF-8 text"),
                      (("generate", "--model", tiny_dir, "--device", "cpu", "--prompt", "x" * 100, "--max-input-chars",
                        "10"), "the message is too long: 100 characters")):
        rc, err = cli_here(capsys, *args)
        assert rc == 2 and msg in err and "Traceback" not in err, (args, err)


def test_public_info_hides_paths(engine):
    d = public_info(engine.info)
    assert "model_path" not in d and engine.info.model_path not in json.dumps(d)


def test_paths_are_cut_from_what_users_see():
    from mixoff_app.access import redact_paths
    assert redact_paths("reading a hf-layout checkpoint from /srv/models/mixtral") == \
        "reading a hf-layout checkpoint from mixtral"
    assert redact_paths("loading failed: CheckpointError: /home/op/m/config.json: bad") == \
        "loading failed: CheckpointError: config.json: bad"
    assert redact_paths("see https://huggingface.co/a/b and a/b") == "see https://huggingface.co/a/b and a/b"
