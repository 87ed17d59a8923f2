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


POLICY_CLASSES: dict[str, type[EvictionPolicy]] = {"lru": LRU}


def make_policy(name: str, num_experts: int) -> EvictionPolicy:
    try:
        return POLICY_CLASSES[name](num_experts)
    except KeyError:
        raise ValueError(f"unknown eviction policy {name!r}: choose one of {', '.join(POLICY_CLASSES)}") from None
