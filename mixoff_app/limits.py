"""Bounded work per request: character limits checked before any tokenizing, and a history fit in O(n).

Every request costs at most a fixed amount of work before the model runs: the message and the system
prompt are refused past a character limit (derived from the context, or set by ``--max-input-chars``),
history beyond a character budget is dropped from the oldest without being tokenized, and what remains
is tokenized once, turn by turn, then cut with running sums. The chat template is rendered a bounded
number of times (once when everything fits), never once per dropped turn.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

from .config import ConfigError

# A token of a Llama/Mistral-style BPE covers about 4 characters of English; 8 leaves room for code and
# other languages, so a message refused by characters would never have fitted the context in tokens.
CHARS_PER_TOKEN = 8
MAX_RENDERS = 4               # chat-template renders the token fit may take to refine its estimate
MESSAGE_OVERHEAD_CHARS = 16   # what a turn costs in the history budget beyond its text (so 10,000 empty turns count)


@dataclass(frozen=True)
class InputLimits:
    """Characters one request may carry. ``message`` and ``system`` are refused past their limit; history
    past ``history`` is dropped from the oldest turn (with a notice)."""
    message: int
    system: int
    history: int

    def __post_init__(self) -> None:
        for name in ("message", "system", "history"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"the {name} character limit must be a whole number >= 1, not {v!r}")

    @classmethod
    def for_context(cls, max_context: int, max_input_chars: Optional[int] = None) -> "InputLimits":
        """From the context size (``CHARS_PER_TOKEN`` per token), or ``--max-input-chars`` when given."""
        chars = max_input_chars or CHARS_PER_TOKEN * max_context
        return cls(message=chars, system=chars, history=2 * chars)


class Busy(RuntimeError):
    """Every answer slot is taken and the waiting line is full (``--max-batch``, ``--max-waiting``): the request
    is refused at once (the API answers 429), never queued without bound."""


class InputTooLong(ValueError):
    """A request over a limit: the message is one sentence for the person who sent it."""


def check_chars(kind: str, text: str, limit: int) -> None:
    if len(text) > limit:
        raise InputTooLong(f"the {kind} is too long: {len(text):,} characters, and this server takes at most {limit:,} "
                           f"(about its context); shorten it, or start the app with a larger --max-input-chars "
                           f"or --max-context")


@dataclass(frozen=True)
class Fitted:
    ids: list[int]
    dropped_turns: int        # user turns (with their answers) left out
    renders: int              # chat-template renders this fit took (bounded; for tests and benchmarks)


def _cut_points(turns: Sequence[dict]) -> list[int]:
    """Indices where a kept window of earlier turns may start: a user turn, so roles still alternate."""
    return [i for i, m in enumerate(turns) if m["role"] == "user"]


def fit_conversation(system: list[dict], prior: list[dict], last: dict, limits: InputLimits, context: int,
                     reserve: int, render: Callable[[list[dict]], list[int]],
                     count_tokens: Callable[[list[str]], list[int]], overhead: Callable[[], int]) -> Fitted:
    """Keep the system prompt and the new message; drop the oldest earlier turns until prompt + ``reserve``
    answer tokens fit ``context``.

    ``render`` puts messages through the chat template (token ids), ``count_tokens`` tokenizes texts in one
    batch (their lengths), ``overhead()`` is what the template adds per turn. Raises ``InputTooLong``.
    """
    check_chars("message", last["content"], limits.message)
    if system:
        check_chars("system prompt", system[0]["content"], limits.system)
    # 1. Characters: keep the newest turns within the history budget, untokenized work stays O(n) in chars.
    cuts = _cut_points(prior)
    used, start = 0, len(prior)
    for i in range(len(prior) - 1, -1, -1):
        used += len(prior[i]["content"]) + MESSAGE_OVERHEAD_CHARS
        if used > limits.history:
            break
        if prior[i]["role"] == "user":
            start = i
    renders = 1
    ids = render(system + prior[start:] + [last])
    if len(ids) + reserve <= context or start == len(prior):
        return _done(ids, system, last, prior, start, cuts, context, renders, count_tokens)
    # 2. Tokens: each kept turn tokenized once; the cut found with running sums, then checked by a render.
    kept = prior[start:]
    n = len(kept)
    raw = count_tokens([m["content"] for m in kept])
    suffix = [0] * (n + 1)                  # suffix[j]: tokens of the texts of kept[j:]
    for j in range(n - 1, -1, -1):
        suffix[j] = suffix[j + 1] + raw[j]
    per_turn = float(overhead())            # the template's tokens around one turn, refined by each render
    base = len(ids) - suffix[0] - per_turn * n       # tokens outside the earlier turns (exact: from the render)
    cut_at = [i - start for i in cuts if i >= start] + [n]

    def estimate(c: int) -> float:
        return base + suffix[c] + per_turn * (n - c)

    best: Optional[tuple[int, list[int]]] = None     # the longest window a render showed to fit
    tried: dict[int, int] = {0: len(ids)}
    for _ in range(MAX_RENDERS):
        c = next((c for c in cut_at if estimate(c) + reserve <= context), n)
        if c in tried:
            break
        got = render(system + kept[c:] + [last])
        renders += 1
        tried[c] = len(got)
        if len(got) + reserve <= context and (best is None or c < best[0]):
            best = (c, got)
        if n - c == 0 or len(got) == round(estimate(c)):
            break
        per_turn += (len(got) - estimate(c)) / (n - c)     # the estimate's error, spread over the turns kept
    if best is None:
        # Still over after the bounded refinement: drop further, each render moving on by its overshoot.
        c = max((c for c in tried if c in cut_at), default=0)
        while True:
            over = tried[c] + reserve - context
            if over <= 0 or c == n:
                got = render(system + kept[c:] + [last])
                renders += 1
                best = (c, got)
                break
            need, nxt = over, c
            while nxt < n and need > 0:
                nxt = next(x for x in cut_at if x > nxt)
                need = over - (estimate(c) - estimate(nxt))
            c = nxt
            tried[c] = len(render(system + kept[c:] + [last]))
            renders += 1
    c, got = best
    return _done(got, system, last, prior, start + c, cuts, context, renders, count_tokens)


def _done(ids, system, last, prior, start, cuts, context, renders, count_tokens) -> Fitted:
    dropped = sum(1 for i in cuts if i < start)
    if len(ids) >= context:
        sys_tokens, msg_tokens = count_tokens([system[0]["content"] if system else "", last["content"]])
        what, n = ("system prompt", sys_tokens) if system and sys_tokens >= msg_tokens else ("message", msg_tokens)
        raise InputTooLong(f"the {what} is too long: about {n:,} tokens, and the context holds {context:,} "
                           f"(the prompt came to {len(ids):,}); shorten it or start the app with a larger "
                           f"--max-context")
    return Fitted(ids, dropped, renders)


def template_overhead(render: Callable[[list[dict]], list[int]], count_tokens: Callable[[list[str]], list[int]]
                      ) -> int:
    """Tokens the chat template adds around one turn (rounded up), measured on a probe conversation."""
    one = render([{"role": "user", "content": "c"}])
    three = render([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                    {"role": "user", "content": "c"}])
    a, b = count_tokens(["a", "b"])
    return max(0, math.ceil((len(three) - len(one) - a - b) / 2))
