"""One engine answer for an HTTP request: the engine's blocking stream is read on its own thread, the event loop
reads that, and a client that goes away cancels the answer (it leaves the engine's batch at the next step).

Answers of the API and of the page run together in the engine's batch (``scheduler.py``); the engine's own
waiting line is bounded, and a request beyond it is refused (429) before anything is streamed.
"""
from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Iterator, Optional

from ..events import TokenEvent

POLL_S = 0.25             # how often a waiting request checks whether its client is still there
# OpenAI has no reason for a full context or an out-of-memory device: both end the answer early, like a length
# cap ("oom" also leaves its notice in mixoff.notices).
FINISH = {"eos": "stop", "stop": "stop", "length": "length", "context": "length", "oom": "length",
          "cancelled": "stop"}


class Disconnected(Exception):
    """The client went away; there is no one to answer."""


@dataclass(frozen=True)
class Piece:
    text: str


@dataclass(frozen=True)
class Finish:
    reason: str                       # OpenAI's finish_reason: stop | length
    prompt_tokens: int
    completion_tokens: int
    mixoff: dict = field(default_factory=dict)
    routing: Optional[dict] = None    # prompt_routed_experts and routed_experts, when the request asked for them


def answer_view(a: Any, completion_tokens: int, notices: list[str]) -> dict:
    """What the cache did for this answer: ``a`` is the ``AnswerStats`` its done event carries (its own, however
    many answers ran beside it)."""
    if a is None:
        return {"completion_tokens": completion_tokens, "notices": list(notices)}
    both = {k: a.prefill[k] + a.decode[k] for k in a.decode}
    looked = both["hits"] + both["misses"]
    return {
        "hits": both["hits"], "misses": both["misses"], "hit_rate": both["hits"] / looked if looked else 0.0,
        "evictions": both["evictions"], "bytes_h2d": both["bytes_h2d"], "bytes_disk": both["bytes_disk"],
        "prefetch_issued": both["prefetch_issued"], "prefetch_used": both["prefetch_used"],
        "tokens_per_s": a.tokens_per_s, "completion_tokens": completion_tokens,
        "prefill_tokens": a.prefill_tokens, "prefill_s": a.prefill_s, "ttft_s": a.ttft_s,
        "queued_s": a.queued_s, "prefill": dict(a.prefill), "decode": dict(a.decode), "notices": list(notices),
    }


def routing_view(a: Any, prompt_tokens: int) -> dict:
    """vLLM's routing fields for this answer (``a``: the ``AnswerStats`` its done event carries): per prompt token
    and per generated token, per expert layer, the chosen experts. What cannot be vouched for is null, as in vLLM."""
    prompt = a.prompt_routing() if a is not None else None
    return {"prompt_routed_experts": _lists(prompt) if prompt is not None and len(prompt) == prompt_tokens else None,
            "routed_experts": _lists(a.routing) if a is not None else []}


def _lists(routing) -> list:
    return [[list(ex) for ex in tok] for tok in routing]


async def until(awaitable, is_disconnected: Callable[[], Any]):
    """Await ``awaitable`` unless the client disconnects first (then cancel it and raise Disconnected)."""
    task = asyncio.ensure_future(awaitable)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=POLL_S)
            if done:
                return task.result()
            if await is_disconnected():
                raise Disconnected()
    finally:
        if not task.done():
            task.cancel()


class Answer:
    """``events``: the engine's event iterator, validated but not yet begun, made with ``cancel``."""

    def __init__(self, engine: Any, events: Iterator[TokenEvent], cancel: threading.Event,
                 routed: bool = False) -> None:
        self.engine, self.events, self.cancel, self.routed = engine, events, cancel, routed

    def _work(self, put: Callable[[object], None], done: Callable[[], None]) -> None:
        n, notices = 0, []
        try:
            for ev in self.events:
                if ev.kind == "token":
                    n += ev.token_id is not None
                    if ev.text:
                        put(Piece(ev.text))
                elif ev.kind == "notice":
                    notices.append(ev.text)
                elif ev.kind == "done":
                    prompt = ev.prompt_tokens or 0
                    put(Finish(FINISH.get(ev.finish_reason or "eos", "stop"), prompt, n, answer_view(ev.answer, n, notices),
                               routing_view(ev.answer, prompt) if self.routed else None))
        except BaseException as exc:      # noqa: BLE001 - handed to the request, which answers with it
            put(exc)
        finally:
            close = getattr(self.events, "close", None)
            if close is not None:
                close()
            done()

    async def run(self, is_disconnected: Callable[[], Any]) -> AsyncIterator[object]:
        """Yield Piece ... Finish as the engine makes them."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        end = object()

        def put(item: object) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:          # the server's loop has closed: nobody is reading any more
                self.cancel.set()

        def done() -> None:
            put(end)

        threading.Thread(target=self._work, args=(put, done), name="mixoff-api-answer", daemon=True).start()
        try:
            while True:
                item = queue.get_nowait() if not queue.empty() else await until(queue.get(), is_disconnected)
                if item is end:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            self.cancel.set()             # a client gone (or an error): the engine stops at its next token
