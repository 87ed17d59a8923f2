"""The TokenEvent stream is the contract between the engine and every caller (UI, CLI, API): its order,
its indices and its finish reasons, as the real engine produces them."""
from __future__ import annotations

import dataclasses
import threading

import pytest

from mixoff_app.config import SamplingParams
from mixoff_app.events import TokenEvent

from helpers import load

FINISH_REASONS = {"eos", "stop", "length", "cancelled", "context"}


@pytest.fixture(scope="module")
def engine(tiny_dir):
    return load(tiny_dir, k=2, max_context=96)


def check_stream(evs: list[TokenEvent]) -> list[TokenEvent]:
    """Notices first, then tokens, then exactly one ``done``; returns the token events."""
    kinds = [e.kind for e in evs]
    assert kinds[-1] == "done" and kinds.count("done") == 1
    first_token = kinds.index("token") if "token" in kinds else len(kinds) - 1
    assert set(kinds[:first_token]) <= {"notice"} and set(kinds[first_token:-1]) <= {"token"}
    assert evs[-1].finish_reason in FINISH_REASONS
    assert all(e.finish_reason is None for e in evs[:-1])
    tokens = [e for e in evs if e.kind == "token"]
    times = [e.elapsed_s for e in tokens] + [evs[-1].elapsed_s]
    assert times == sorted(times) and times[0] > 0
    return tokens


def test_a_length_limited_answer(engine):
    evs = list(engine.stream_chat([{"role": "user", "content": "hello"}],
                                  SamplingParams(max_new_tokens=5, greedy=True)))
    tokens = check_stream(evs)
    assert evs[-1].finish_reason == "length"
    assert [e.index for e in tokens] == list(range(5)) and all(e.token_id is not None for e in tokens)
    assert "".join(e.text for e in tokens) == engine.tokenizer.decode([e.token_id for e in tokens],
                                                                      skip_special_tokens=True)


def test_notices_come_first(engine):
    conv = []
    for i in range(5):
        conv += [{"role": "user", "content": f"Question number {i} about the builtin functions?"},
                 {"role": "assistant", "content": "An answer that takes some room in the context window."}]
    conv.append({"role": "user", "content": "last one"})
    evs = list(engine.stream_chat(conv, SamplingParams(max_new_tokens=16, greedy=True)))
    check_stream(evs)
    assert evs[0].kind == "notice" and "oldest exchange" in evs[0].text


def test_cancel_and_context_end_the_stream_with_their_reason(engine):
    cancel = threading.Event()
    evs = []
    for ev in engine.stream_chat([{"role": "user", "content": "hi"}], SamplingParams(max_new_tokens=50, greedy=True),
                                 cancel=cancel):
        evs.append(ev)
        if ev.kind == "token" and ev.index == 2:
            cancel.set()
    assert len(check_stream(evs)) == 3 and evs[-1].finish_reason == "cancelled"
    evs = list(engine.stream_chat([{"role": "user", "content": "hi"}], SamplingParams(max_new_tokens=200, greedy=True)))
    check_stream(evs)
    assert evs[-1].finish_reason == "context"


def test_events_are_frozen():
    ev = TokenEvent("token", "a", 5, 0, 0.1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        ev.text = "b"
    assert TokenEvent("done", finish_reason="eos").token_id is None
