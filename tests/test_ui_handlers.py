"""The page's handlers (mixoff_app/ui/handlers.py) called as plain methods on the real engine (tiny model, CPU):
no server, no browser. What the page does on Send, the answer's stream, Retry, Stop, Clear, the panel's tick,
Apply, and the API endpoints, each checked on its values."""
from __future__ import annotations

import ast
import inspect
import threading

import pytest

from mixoff_app.config import CacheConfig, EngineConfig, QuantConfig, SamplingParams
from mixoff_app.engine import Engine
from mixoff_app.ui import handlers as handlers_module
from mixoff_app.ui.chat import EngineSlot
from mixoff_app.ui.handlers import Handlers, Refused, Viewer

ME, OTHER, OPERATOR = Viewer("me"), Viewer("other"), Viewer("op", operator=True)
TOKENS = 12


@pytest.fixture(scope="module")
def engine(tiny_dir):
    return Engine.load(EngineConfig(model=str(tiny_dir), device="cpu", quant=QuantConfig.from_bits(4, 2),
                                    cache=CacheConfig(sizes=(2,))))


@pytest.fixture
def h(engine):
    return Handlers(EngineSlot(engine))


def answer_of(engine, messages) -> str:
    params = SamplingParams(max_new_tokens=TOKENS, greedy=True)
    return "".join(ev.text for ev in engine.stream_chat(messages, params) if ev.kind == "token")


def run(h, history, turn, viewer=ME, system="", warn=lambda text: None):
    return list(h.respond(history, system, 0, 1.0, TOKENS, turn, viewer, warn=warn))


def test_the_module_is_plain_python():
    """No gradio in the handlers: layout.py wires them."""
    tree = ast.parse(inspect.getsource(handlers_module))
    names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert not any("gradio" in n for n in names)


def test_send_then_answer_streams_the_engines_answer(h, engine):
    box, chat, turn = h.add_user("  What does len do?  ", [], ME)
    assert box == "" and chat == [{"role": "user", "content": "What does len do?"}] and turn >= 1
    steps = run(h, chat, turn)
    assert len(steps) > 1                                            # it streamed
    final, status = steps[-1]
    assert final[:-1] == chat and final[-1]["role"] == "assistant"
    assert final[-1]["content"] == answer_of(engine, chat)           # what the engine says, token for token
    assert status.startswith(("finished", "reached max new tokens")) and "tokens" in status
    assert [s[0][-1]["content"] for s in steps] == sorted((s[0][-1]["content"] for s in steps), key=len)


def test_send_refuses_in_one_sentence_and_keeps_nothing(h, engine):
    with pytest.raises(Refused, match="Type a message first"):
        h.add_user("   ", [], ME)
    with pytest.raises(Refused, match="too long"):
        h.add_user("x" * (engine.limits.message + 1), [], ME)
    image = [{"role": "user", "content": [{"type": "text", "text": "this?"}, {"type": "image", "url": "x.png"}]}]
    with pytest.raises(Refused, match=r"history\[0\]\.content\[1\]' is an image: this model reads text only"):
        h.add_user("and now?", image, ME)
    loading = Handlers(EngineSlot())
    with pytest.raises(Refused, match="still loading"):
        loading.add_user("hi", [], ME)


def test_a_system_prompt_and_history_reach_the_engine(h, engine):
    history = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
               {"role": "assistant", "content": "note", "metadata": {"title": "a notice"}}]
    _, chat, turn = h.add_user("and len?", history, ME)
    final, _ = run(h, chat, turn, system="Be brief.")[-1]
    expected = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello"}, {"role": "user", "content": "and len?"}]
    assert final[-1]["content"] == answer_of(engine, expected)
    assert final[0] == {"role": "user", "content": "hi"}          # the system prompt is not shown in the chat


def test_a_newer_question_or_clear_ends_the_turn(h):
    _, chat, old = h.add_user("first", [], ME)
    _, _, new = h.add_user("second", [], ME)
    assert run(h, chat, old) == []                        # superseded while it waited: nothing is written
    steps = []
    for step in h.respond(chat, "", 0, 1.0, TOKENS, new, ME):
        steps.append(step)
        if len(steps) == 2:
            assert h.clear(ME) == ([], "")
    assert steps[-1] == ([], "")                          # Clear's empty chat is written last


def test_stop_keeps_what_was_written(h):
    _, chat, turn = h.add_user("Tell me a story", [], ME)
    steps = []
    for step in h.respond(chat, "", 0, 1.0, 200, turn, ME):
        steps.append(step)
        if len(steps) == 3:
            h.stop(ME)
    final, status = steps[-1]
    assert status.startswith("stopped") and final[-1]["content"] == steps[-2][0][-1]["content"]


def test_retry_drops_the_answer(h):
    history = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    msgs, turn = h.retry(history, ME)
    assert msgs == history[:1] and turn == h.canceller.turn("me")
    with pytest.raises(Refused, match="Nothing to retry"):
        h.retry([], ME)


def test_bad_sampling_values_are_refused(h):
    _, chat, turn = h.add_user("hi", [], ME)
    with pytest.raises(Refused, match="temperature must be a number"):
        list(h.respond(chat, "", "hot", 1.0, 8, turn, ME))
    with pytest.raises(Refused, match="no question"):
        list(h.respond([], "", 0, 1.0, 8, turn, ME))


def test_panel_tick_sends_only_what_changed(h, engine):
    first = h.tick({}, ME)
    assert "mx-panel" in first.panel and "mx-info" in first.info
    c = first.controls
    assert (c.k, c.num_experts, c.editable, c.max_context) == (2, engine.info.num_experts, False,
                                                               engine.info.max_context)
    again = h.tick(first.seen, ME)
    assert again.panel is None and again.info is None and again.controls is None
    assert h.tick(first.seen, OPERATOR).controls.editable                       # the operator may edit


def test_panel_while_loading_hides_paths_from_everyone_but_the_operator():
    slot = EngineSlot()
    slot.progress("reading /home/someone/models/secret/config.json")
    h = Handlers(slot)
    seen = h.tick({}, ME)
    assert "config.json" in seen.panel and "/home/someone" not in seen.panel
    assert "/home/someone" in h.tick({}, OPERATOR).panel
    assert h.tick(seen.seen, ME).panel is None                                   # nothing new
    slot.error = "failed"
    assert "could not be loaded" in h.tick(seen.seen, ME).info


def test_apply_is_for_the_operator_and_checks_its_values(h, engine):
    with pytest.raises(Refused, match="operator"):
        h.set_cache(3, "lru", 0, ME)
    with pytest.raises(Refused, match="k \\(experts per layer on the device\\)"):
        h.set_cache(99, "lru", 0, OPERATOR)
    try:
        html, msg = h.set_cache(3, "lfu", 1, OPERATOR)
        assert msg == "Cache re-planned: k = 3, lfu, prefetch 1." and "k = 3" in html
        assert engine.info.cache.sizes == (3,) and engine.info.cache.policy == "lfu"
    finally:
        engine.reconfigure_cache(CacheConfig(sizes=(2,)))


def test_api_endpoints(h, engine):
    pieces = list(h.chat("What does len do?", None, "", 0.0, 1.0, TOKENS, ME))
    assert h.stats(ME)["routing"] and h.stats(OPERATOR)["routing"]
    assert not h.stats(OTHER)["routing"]                   # another caller's answer is not shown to them
    assert pieces[-1] == answer_of(engine, [{"role": "user", "content": "What does len do?"}])
    assert h.info()["num_experts"] == engine.info.num_experts and "model_path" not in str(h.info().get("model"))
    with pytest.raises(Refused, match="message must be text"):
        list(h.chat(5, None, "", 0.0, 1.0, 8, ME))
    with pytest.raises(Refused, match="is a file"):
        list(h.chat("and?", [{"role": "user", "content": {"path": "/tmp/a.pdf"}}], "", 0.0, 1.0, 8, ME))


def test_a_running_answer_is_stopped_by_the_sessions_next_question(h):
    """Each session's Stop event: a new question from the same session ends its running answer."""
    _, chat, turn = h.add_user("Tell me a story", [], ME)
    it = h.respond(chat, "", 0, 1.0, 200, turn, ME)
    next(it)
    done = threading.Event()

    def drain():
        for _ in it:
            pass
        done.set()
    t = threading.Thread(target=drain)
    t.start()
    h.add_user("something else", [], ME)
    assert done.wait(30)
    t.join()
