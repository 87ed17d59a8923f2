"""Eviction policies for one layer's device cache.

A policy only ranks the experts resident in one layer; the cache owns slots and copies. The same
classes drive the trace simulator (``trace replay``), so they are pure Python with no torch.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Iterable


class EvictionPolicy:
    """Interface. ``tick`` is a logical clock the cache advances once per token."""

    name = "base"

    def __init__(self, num_experts: int) -> None:
        self.num_experts = num_experts

    def on_insert(self, expert: int, tick: int) -> None:
        """An expert became resident (loaded on demand or prefetched)."""

    def on_access(self, expert: int, tick: int) -> None:
        """The current token used a resident expert (a hit, or right after its load)."""

    def on_remove(self, expert: int) -> None:
        """The expert left the device."""

    def on_hint(self, experts: Iterable[int], tick: int) -> None:
        """The prefetcher guesses these experts will be needed soon."""

    def victim(self, candidates: list[int]) -> int:
        """Pick which of ``candidates`` (resident, not needed by the current token) to evict."""
        raise NotImplementedError


class LRU(EvictionPolicy):
    name = "lru"

    def __init__(self, num_experts: int) -> None:
        super().__init__(num_experts)
        self._order: OrderedDict[int, None] = OrderedDict()   # oldest first

    def on_insert(self, expert: int, tick: int) -> None:
        self._order[expert] = None
        self._order.move_to_end(expert)

    def on_access(self, expert: int, tick: int) -> None:
        self._order.move_to_end(expert)

    def on_remove(self, expert: int) -> None:
        self._order.pop(expert, None)

    def victim(self, candidates: list[int]) -> int:
        allowed = set(candidates)
        for expert in self._order:
            if expert in allowed:
                return expert
        return candidates[0]

    def order(self) -> list[int]:
        """Resident experts from least to most recently used (for tests and the UI)."""
        return list(self._order)


class LFU(EvictionPolicy):
    """Evict the candidate used least often over the whole history (resident or not).

    Counts survive eviction: an expert that keeps coming back is worth keeping, even if it was
    just thrown out. Ties go to the least recently used, so with equal counts this is LRU.
    """

    name = "lfu"

    def __init__(self, num_experts: int) -> None:
        super().__init__(num_experts)
        self._count: dict[int, int] = {}
        self._last: dict[int, int] = {}        # access sequence number, for recency ties
        self._seq = 0

    def _touch(self, expert: int) -> None:
        self._seq += 1
        self._last[expert] = self._seq

    def on_insert(self, expert: int, tick: int) -> None:
        if expert not in self._last:
            self._touch(expert)

    def on_access(self, expert: int, tick: int) -> None:
        self._count[expert] = self._count.get(expert, 0) + 1
        self._touch(expert)

    def victim(self, candidates: list[int]) -> int:
        return min(candidates, key=lambda e: (self._count.get(e, 0), self._last.get(e, 0)))

    def count(self, expert: int) -> int:
        return self._count.get(expert, 0)


class LRFU(EvictionPolicy):
    """Least Recently/Frequently Used (Lee et al., 1999) over token ticks, with prefetch hints.

    Each expert carries a combined recency-frequency value
        CRF(e) = sum over past uses u of 2 ** (-decay * (now - tick_u))
    kept incrementally (the value and the tick it was last brought up to date), so each call is
    O(1) and ``victim`` is O(k). ``decay = 0`` is LFU, ``decay >= 1`` is LRU across ticks; in between a
    use is worth half after ``1 / decay`` tokens. History is kept for non-resident experts too.

    Why this shape: Mixtral's consecutive tokens mostly repeat the experts the current token already
    holds (those are never candidates), so among the candidates what predicts the next use is each
    expert's steady per-layer popularity -- frequency. Pure LFU, though, never forgets, and the cache
    outlives a chat turn; the decay lets a new conversation's routing take over within about
    ``1 / decay`` tokens. ``decay`` was tuned by ``bench/trace_policies.py --tune`` on the calibrated
    synthetic trace (seed 1; held-out seed 2 agrees): the sweep is flat from 0 to 0.002 and falls
    steadily toward LRU above that, so DEFAULT_DECAY = 0.001 (a half-life of 1000 tokens).

    Prefetch hints: experts named by the latest ``on_hint`` at the current tick are evicted only when
    every candidate was hinted -- a prefetched expert should not make room for a demand miss it is
    about to serve. ``hint=False`` ignores hints. Ties go to the least recently touched.
    """

    name = "lrfu"
    DEFAULT_DECAY = 0.001

    def __init__(self, num_experts: int, decay: float | None = None, hint: bool = True) -> None:
        super().__init__(num_experts)
        self.decay = self.DEFAULT_DECAY if decay is None else float(decay)
        if not self.decay >= 0:
            raise ValueError(f"LRFU decay must be >= 0, not {decay!r}")
        self.use_hints = hint
        self._crf: dict[int, float] = {}
        self._at: dict[int, int] = {}          # tick the CRF was last brought up to date
        self._last: dict[int, int] = {}        # touch sequence number, for ties
        self._seq = 0
        self._now = 0
        self._hinted: frozenset[int] = frozenset()
        self._hint_tick = -1

    def _advance(self, tick: int) -> None:
        if tick > self._now:
            self._now = tick

    def _value(self, expert: int, tick: int) -> float:
        crf = self._crf.get(expert)
        if crf is None:
            return 0.0
        return crf * 2.0 ** (-self.decay * (tick - self._at[expert]))

    def _touch(self, expert: int) -> None:
        self._seq += 1
        self._last[expert] = self._seq

    def on_insert(self, expert: int, tick: int) -> None:
        self._advance(tick)
        if expert not in self._last:
            self._touch(expert)

    def on_access(self, expert: int, tick: int) -> None:
        self._advance(tick)
        self._crf[expert] = 1.0 + self._value(expert, tick)
        self._at[expert] = tick
        self._touch(expert)

    def on_hint(self, experts: Iterable[int], tick: int) -> None:
        if self.use_hints:
            self._advance(tick)
            self._hinted = frozenset(experts)
            self._hint_tick = tick

    def victim(self, candidates: list[int]) -> int:
        now = self._now
        hinted = self._hinted if self._hint_tick == now else frozenset()
        return min(candidates, key=lambda e: (e in hinted, self._value(e, now), self._last.get(e, 0)))

    def score(self, expert: int) -> float:
        """CRF at the latest tick seen (for tests and the UI)."""
        return self._value(expert, self._now)


POLICY_CLASSES: dict[str, type[EvictionPolicy]] = {"lru": LRU, "lfu": LFU, "lrfu": LRFU}


def make_policy(name: str, num_experts: int) -> EvictionPolicy:
    try:
        return POLICY_CLASSES[name](num_experts)
    except KeyError:
        raise ValueError(f"unknown eviction policy {name!r}: choose one of {', '.join(POLICY_CLASSES)}") from None
