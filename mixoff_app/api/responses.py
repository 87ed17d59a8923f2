"""Response bodies in OpenAI's shapes: chat.completion(.chunk), text_completion, usage, and SSE framing."""
from __future__ import annotations

import json
import time
import uuid
from typing import Optional

from .answer import Finish


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def sse(data: object) -> bytes:
    return f"data: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n".encode()


SSE_DONE = b"data: [DONE]\n\n"


def usage(finish: Finish) -> dict:
    return {"prompt_tokens": finish.prompt_tokens, "completion_tokens": finish.completion_tokens,
            "total_tokens": finish.prompt_tokens + finish.completion_tokens}


def with_routing(body: dict, finish: Finish) -> dict:
    """vLLM's places: ``prompt_routed_experts`` on the response, ``routed_experts`` on the choice (streamed: the
    final chunk's, as vLLM sends them only once the answer is done)."""
    if finish.routing is not None:
        body["prompt_routed_experts"] = finish.routing["prompt_routed_experts"]
        body["choices"][0]["routed_experts"] = finish.routing["routed_experts"]
    return body


class Shape:
    """The ids, timestamps and object names one response shares across its chunks."""

    def __init__(self, chat: bool, model: str) -> None:
        self.chat, self.model = chat, model
        self.id = new_id("chatcmpl" if chat else "cmpl")
        self.created = int(time.time())

    def _head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def whole(self, text: str, finish: Finish) -> dict:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": finish.reason}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish.reason}
        out = {**self._head("chat.completion" if self.chat else "text_completion"), "choices": [choice],
               "usage": usage(finish), "mixoff": finish.mixoff}
        return with_routing(out, finish)

    def chunk(self, text: Optional[str] = None, finish: Optional[Finish] = None, first: bool = False,
              with_usage: bool = False) -> dict:
        reason = finish.reason if finish else None
        if self.chat:
            delta = ({"role": "assistant", "content": text or ""} if first else
                     {"content": text} if text is not None else {})
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": reason}
        out = {**self._head("chat.completion.chunk" if self.chat else "text_completion"), "choices": [choice]}
        if with_usage:
            out["usage"] = None           # OpenAI: null on every chunk but the last
        if finish is not None:
            out["mixoff"] = finish.mixoff
            with_routing(out, finish)
        return out

    def usage_chunk(self, finish: Finish) -> dict:
        return {**self._head("chat.completion.chunk" if self.chat else "text_completion"), "choices": [],
                "usage": usage(finish)}
