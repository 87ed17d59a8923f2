"""One rule for chat messages (mixoff_app/messages.py), and the same answer from each door: the engine, the /v1
API's parser and the page's history all take text parts joined, refuse a non-text part with one sentence naming
it, and agree on roles and order."""
from __future__ import annotations

import pytest

from mixoff_app.api.errors import ApiError
from mixoff_app.api.request import parse_chat
from mixoff_app.config import SamplingParams
from mixoff_app.messages import MessageError, Turn, content_text, conversation, to_turns
from mixoff_app.ui.chat import to_messages

from helpers import load

IMAGE = {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}


def test_text_in_every_shape_openai_and_gradio_send():
    assert content_text("plain") == "plain" and content_text(None) == ""
    assert content_text([{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]) == "ab"
    assert content_text([{"type": "text", "text": "a"}, "b"]) == "ab"            # gradio may send bare strings
    assert content_text({"type": "text", "text": "one part"}) == "one part"     # a single part
    assert to_turns([{"role": "developer", "content": "be brief"}]) == [Turn("system", "be brief")]


@pytest.mark.parametrize("content, where, unsupported", [
    ([{"type": "text", "text": "what is this?"}, IMAGE], "messages[0].content[1].type", True),
    ([{"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}], "messages[0].content[0].type", True),
    ({"path": "/tmp/cat.png", "mime_type": "image/png"}, "messages[0].content.type", True),   # gradio's file
    ([{"type": "text", "text": 5}], "messages[0].content[0].text", False),
    ([{"type": "hologram"}], "messages[0].content[0].type", False),
    (42, "messages[0].content", False),
])
def test_what_is_not_text_is_refused_with_its_place(content, where, unsupported):
    with pytest.raises(MessageError) as exc:
        conversation([{"role": "user", "content": content}])
    assert exc.value.where == where and exc.value.unsupported == unsupported
    msg = str(exc.value)
    assert msg.endswith(".") and "\n" not in msg and len(msg) < 160          # one sentence


@pytest.mark.parametrize("messages, where, text", [
    ([], "messages", "non-empty"),
    ("hi", "messages", "must be a list"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "messages[1].role", "end with a user"),
    ([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}, {"role": "user", "content": "c"}],
     "messages[1].role", "only the first message may be a system prompt"),
    ([{"role": "wizard", "content": "a"}], "messages[0].role", "system, user or assistant"),
    ([{"role": "tool", "content": "42"}], "messages[0].role", "tool result"),
    ([{"role": "assistant", "tool_calls": [{"id": "x"}]}, {"role": "user", "content": "a"}], "messages[0].role",
     "tool call"),
    ([7], "messages[0]", "'role' and 'content'"),
])
def test_the_conversation_rule(messages, where, text):
    with pytest.raises(MessageError, match=text) as exc:
        conversation(messages)
    assert exc.value.where == where


def test_the_three_doors_apply_the_same_rule(tiny_dir):
    """The engine, the API and the page: the same turns for the same text, the same refusal for an image."""
    engine = load(tiny_dir)
    parts = [{"role": "system", "content": [{"type": "text", "text": "Be "}, {"type": "text", "text": "brief."}]},
             {"role": "user", "content": [{"type": "text", "text": "What does "}, {"type": "text", "text": "len do?"}]}]
    joined = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What does len do?"}]
    api = parse_chat({"messages": parts}, 8).messages
    assert [t.message() for t in api] == joined
    assert to_messages(parts[1:], "Be brief.") == joined
    params = SamplingParams(max_new_tokens=6, greedy=True)

    def answer(messages):
        return [(e.kind, e.token_id) for e in engine.stream_chat(messages, params)]
    assert answer(parts) == answer(joined) == answer(list(api))         # raw, normalised, Turns: one prompt
    bad = [{"role": "user", "content": [{"type": "text", "text": "What is this?"}, IMAGE]}]
    with pytest.raises(MessageError, match="'messages\\[0\\].content\\[1\\]' is an image_url: this model reads text only"):
        engine.stream_chat(bad, params)
    with pytest.raises(ApiError) as exc:
        parse_chat({"messages": bad}, 8)
    assert exc.value.status == 400 and exc.value.param == "messages[0].content[1].type"
    assert exc.value.code == "unsupported_value" and "reads text only" in exc.value.message
    with pytest.raises(MessageError, match="'history\\[0\\].content\\[1\\]' is an image_url"):
        to_messages(bad)
