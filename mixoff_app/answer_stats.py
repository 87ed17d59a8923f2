"""What one answer did: its prompt and timings, its own expert look-ups and routing, split into prefill and decode.

Written by the step loop (the scheduler's thread) as the answer runs, read under ``Stats``' lock for a snapshot,
and handed, frozen, to the caller with the answer's "done" event, so a caller learns about its own answer however
many others ran beside it.

Counters: ``hits``/``misses`` are the answer's own look-ups (one per decoded token, expert layer and chosen
expert; in prefill, one per distinct expert and layer of each chunk). Copies, evictions and prefetches are the
cache's, during this answer's prefill chunks (its own) and during the decode steps it took part in (shared with
the other answers of those steps). ``cpu_experts`` counts misses run on the CPU from their host copy instead of
copied (``cpu_experts.py``): they are misses too, with no bytes moved; a step's count is shared by its rows.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Optional

COUNTER_NAMES = ("hits", "misses", "evictions", "bytes_h2d", "bytes_d2h", "bytes_disk",
                 "prefetch_issued", "prefetch_used", "prefetch_wasted", "cpu_experts")


@dataclass
class AnswerStats:
    session: Optional[str] = None
    started_at: float = field(default_factory=time.perf_counter)   # admitted to the batch (its prefill starts)
    queued_s: float = 0.0              # waited for a free slot before that
    prefill_s: float = 0.0
    prefill_tokens: int = 0
    first_token_at: float = 0.0        # the first decode step that fed one of its tokens ended
    first_sent_at: float = 0.0         # its first token event reached the caller
    last_token_at: float = 0.0
    tokens: int = 0                    # tokens fed through the model after the prompt
    generating: bool = True
    prefill: dict = field(default_factory=lambda: dict.fromkeys(COUNTER_NAMES, 0))
    decode: dict = field(default_factory=lambda: dict.fromkeys(COUNTER_NAMES, 0))
    routing: list = field(default_factory=list)           # decoded token -> layer -> experts (routing rank order)
    routing_weights: list = field(default_factory=list)   # the same shape: each expert's routing weight
    mark: tuple = ()                   # the cache's counters when it began
    # Its prompt's routing by position (route_log segments): the positions it found in its KV slot, kept there
    # by earlier answers (None: the slot's log could not vouch for them), then the chunks it prefilled (None
    # in the list: a chunk whose routing was not recorded).
    prompt_prefix: Optional[list] = field(default_factory=list)
    prefill_routing: list = field(default_factory=list)

    def add(self, phase: str, before: tuple[int, ...], after: tuple[int, ...]) -> None:
        """Add the cache's counter deltas (``Stats.counters()`` before and after) to ``phase``."""
        d = self.prefill if phase == "prefill" else self.decode
        for name, a, b in zip(COUNTER_NAMES, before, after):
            d[name] += b - a

    @property
    def decode_s(self) -> float:
        return self.last_token_at - self.first_token_at if self.tokens > 1 else 0.0

    @property
    def tokens_per_s(self) -> float:
        return (self.tokens - 1) / self.decode_s if self.decode_s > 0 else 0.0

    @property
    def ttft_s(self) -> float:
        return self.first_sent_at - self.started_at if self.first_sent_at else 0.0

    @property
    def hit_rate(self) -> float:
        h = self.prefill["hits"] + self.decode["hits"]
        m = self.prefill["misses"] + self.decode["misses"]
        return h / (h + m) if h + m else 0.0

    @property
    def bytes_h2d(self) -> int:
        return self.prefill["bytes_h2d"] + self.decode["bytes_h2d"]

    def prompt_routing(self) -> Optional[list]:
        """The whole prompt's routing, token -> layer -> experts; None where it cannot be vouched for."""
        if self.prompt_prefix is None or any(seg is None for seg in self.prefill_routing):
            return None
        return [r for seg in self.prompt_prefix + self.prefill_routing for r in seg.rows()]

    def copy(self) -> "AnswerStats":
        """A copy a caller may keep while the answer (or the next one) goes on."""
        c = AnswerStats(**{k: v for k, v in self.__dict__.items()})
        c.prefill, c.decode = dict(self.prefill), dict(self.decode)
        c.routing, c.routing_weights = list(self.routing), list(self.routing_weights)
        c.prefill_routing = list(self.prefill_routing)
        return c
