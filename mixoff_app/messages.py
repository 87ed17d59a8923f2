"""Chat messages -> the turns the engine takes: one rule for the page, the /v1 API, the CLI and the engine.

The rule, wherever a conversation comes from:

- a message is a mapping (or an object, such as gradio's ``ChatMessage``) with ``role`` and ``content``;
- roles: ``system`` (``developer``, OpenAI's newer name, is the same), ``user``, ``assistant``; a tool call or
  tool result (role ``tool``/``function``, or ``tool_calls``) is refused: these models have no tool calling;
- content: a string, nothing (empty text), or a list of content parts (a single part is taken as a list of
  one). Text parts (``{"type": "text", "text": ...}``, or a bare string) are joined as they are, with nothing
  between them, as OpenAI and the chat templates join them. A non-text part (an image, audio, a file) is
  refused with one sentence naming where it is, never dropped: an answer to a question whose picture was
  silently thrown away would look like an answer to the question asked;
- the conversation: at least one message, a system prompt only as the first message, and a user message
  last.

Refusals are ``MessageError`` (a ``ValueError``): the sentence, the place (``messages[2].content[1].type``,
as the API's ``param`` names it) and whether the request was well formed but asks for what the model cannot
do (an image) rather than malformed. The engine needs no import of the API or the page to apply it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Iterable, Optional

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
TOOL_ROLES = ("tool", "function")
# Content parts that are well formed but not text: refused as unsupported (anything else unknown is malformed).
NON_TEXT_PARTS = ("image_url", "input_image", "image", "input_audio", "audio", "file", "input_file", "video_url",
                  "video", "refusal")


@dataclass(frozen=True)
class Turn:
    """One normalised message: its role (system, user or assistant) and its text."""
    role: str
    text: str

    def message(self) -> dict:
        """As a chat template reads it."""
        return {"role": self.role, "content": self.text}


class MessageError(ValueError):
    """A message the model cannot take. ``where`` is the field at fault; ``unsupported`` says the request
    was well formed but asks for what this model cannot do (an image, a tool)."""

    def __init__(self, sentence: str, where: Optional[str] = None, unsupported: bool = False) -> None:
        super().__init__(sentence)
        self.where, self.unsupported = where, unsupported


def _field(message: Any, key: str) -> Any:
    return message.get(key) if isinstance(message, dict) else getattr(message, key, None)


def _short(value: Any) -> str:
    try:
        text = json.dumps(value)
    except (TypeError, ValueError, RecursionError):     # not JSON, or nested past the stack
        text = type(value).__name__
    return text if len(text) <= 40 else text[:37] + "..."


def _part_kind(part: dict) -> Optional[str]:
    """What a non-text part is: its declared type, or what a gradio file dict holds."""
    kind = part.get("type")
    if kind is None and any(k in part for k in ("path", "file", "url", "mime_type")):
        kind = "file"
    return kind if isinstance(kind, str) else None


def content_text(content: Any, where: str = "content") -> str:
    """A message's content as its text (the rule above); raises ``MessageError`` for a non-text part."""
    if content is None or isinstance(content, str):
        return content or ""
    parts = [content] if isinstance(content, dict) else content
    if not isinstance(parts, (list, tuple)):
        raise MessageError(f"'{where}' must be a string or a list of content parts, not {_short(content)}.", where)
    out = []
    for j, part in enumerate(parts):
        here = f"{where}[{j}]" if parts is content else where
        if isinstance(part, str):
            out.append(part)
            continue
        kind = _part_kind(part) if isinstance(part, dict) else None
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise MessageError(f"'{here}.text' must be a string.", f"{here}.text")
            out.append(part["text"])
        elif kind in NON_TEXT_PARTS:
            raise MessageError(f"'{here}' is {'an' if kind[0] in 'aeiou' else 'a'} {kind}: this model reads text "
                               f"only; send the question as text.", f"{here}.type", unsupported=True)
        else:
            raise MessageError(f"'{here}' must be a content part such as {{\"type\": \"text\", \"text\": \"...\"}}, "
                               f"not {_short(part)}.", f"{here}.type")
    return "".join(out)


def to_turn(message: Any, where: str) -> Turn:
    """One message by the rule above."""
    if isinstance(message, Turn):
        return message
    if not isinstance(message, dict) and not hasattr(message, "role"):
        raise MessageError(f"'{where}' must be an object with 'role' and 'content'.", where)
    role = _field(message, "role")
    if role in TOOL_ROLES or _field(message, "tool_calls") or _field(message, "function_call"):
        what = "result" if role in TOOL_ROLES else "call"
        raise MessageError(f"'{where}' is a tool {what}: this model has no tool or function calling.",
                           f"{where}.role", unsupported=True)
    if role not in ROLES:
        raise MessageError(f"'{where}.role' must be one of system, user or assistant, not {_short(role)}.",
                           f"{where}.role")
    return Turn(ROLES[role], content_text(_field(message, "content"), f"{where}.content"))


def to_turns(messages: Any, where: str = "messages") -> list[Turn]:
    """Every message by the rule above (no conversation checks: a history may end anywhere)."""
    if not isinstance(messages, (list, tuple)):
        raise MessageError(f"'{where}' must be a list of {{\"role\", \"content\"}} messages.", where)
    return [to_turn(m, f"{where}[{i}]") for i, m in enumerate(messages)]


def conversation(messages: Any, where: str = "messages") -> list[Turn]:
    """A whole conversation to answer: the messages by the rule above, a system prompt only first, a user
    message last."""
    turns = to_turns(messages, where)
    if not turns:
        raise MessageError(f"'{where}' must be a non-empty list of {{\"role\", \"content\"}} messages.", where)
    check_order(turns, where)
    return turns


def check_order(turns: Iterable[Turn], where: str = "messages") -> None:
    turns = list(turns)
    late = next((i for i, t in enumerate(turns) if i and t.role == "system"), None)
    if late is not None:
        raise MessageError("only the first message may be a system prompt.", f"{where}[{late}].role")
    if turns[-1].role != "user":
        raise MessageError("the conversation must end with a user message.", f"{where}[{len(turns) - 1}].role")
