"""The chat column's plumbing without a browser: history in Gradio's message formats becomes the engine's
messages, sampling controls become SamplingParams, and each session's Stop/Clear turns."""
from __future__ import annotations

import pytest

from mixoff_app.messages import MessageError, Turn
from mixoff_app.ui.chat import Canceller, normalise_history, sampling, strip_to_last_user, to_messages


def test_history_normalisation():
    hist = [{"role": "user", "content": [{"type": "text", "text": "hi"}]},
            {"role": "assistant", "content": "hello", "metadata": None},
            {"role": "assistant", "content": "note", "metadata": {"title": "notice"}},
            {"role": "user", "content": "more"}, {"role": "assistant", "content": ""}]
    assert normalise_history(hist)[0] == Turn("user", "hi")
    assert len(normalise_history(hist)) == 4                     # the page's own notice is not a turn
    assert to_messages(hist, " be brief ") == [
        {"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"}, {"role": "user", "content": "more"}]
    assert strip_to_last_user(hist)[-1] == {"role": "user", "content": "more"}
    assert sampling(0, 1, 16).is_greedy and sampling(0.7, 0.9, "32").max_new_tokens == 32


def test_a_file_in_the_history_is_refused_not_dropped():
    """The page's rule is the API's and the engine's (messages.py): a file block is named, never skipped."""
    hist = [{"role": "user", "content": [{"type": "text", "text": "what is this?"}, {"path": "/tmp/cat.png"}]},
            {"role": "assistant", "content": "a cat"}]
    with pytest.raises(MessageError, match=r"'history\[0\]\.content\[1\]' is a file: this model reads text only"):
        to_messages(hist)
    with pytest.raises(MessageError, match="must be a list"):
        normalise_history("hello")


def test_canceller_turns():
    c = Canceller()
    ev1, t1 = c.begin("a")
    assert c.current("a") == (ev1, t1) and not ev1.is_set()
    ev2, t2 = c.begin("a")                     # a new question stops the running answer
    assert ev1.is_set() and not ev2.is_set() and t2 == t1 + 1
    other, _ = c.begin("b")                    # sessions are independent
    assert c.cancel("a") and ev2.is_set() and not other.is_set()
    assert c.turn("a") == t2                   # Stop keeps the turn: the stopped answer keeps its text
    assert not c.cleared("a")
    c.clear("a")
    assert c.turn("a") == t2 + 1 and c.cleared("a")   # Clear ends the turn: a late token is not written back
    c.begin("a")
    assert not c.cleared("a")
    assert not c.cancel("nobody")
