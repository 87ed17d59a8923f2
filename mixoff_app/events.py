"""What the engine streams back to a caller while it generates."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional


@dataclass(frozen=True)
class TokenEvent:
    """One step of a streamed answer.

    kind: "token" (``text`` is the new text, possibly empty while a multi-byte character is incomplete),
    "notice" (``text`` is a message for the user, e.g. older turns were dropped), or "done"
    (``finish_reason`` is one of "eos", "stop", "length", "cancelled", "context", "oom" — the device ran out
    of memory, a notice before it says so; ``prompt_tokens`` is the length of the prompt as the model read
    it, after any old turns were left out; ``answer`` is what the answer did, an ``AnswerStats``: its own
    routing, timings and look-ups, however many other answers ran beside it).
    "waiting" (``text`` says why: every slot is taken) may come before the first token.
    """
    kind: str
    text: str = ""
    token_id: Optional[int] = None
    index: int = 0
    elapsed_s: float = 0.0
    finish_reason: Optional[str] = None
    prompt_tokens: Optional[int] = None
    answer: Any = None
