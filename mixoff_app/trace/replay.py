"""Replay of a routing trace through eviction policies, and the Belady bound.

Replay mirrors ``ExpertCache``'s rules: per token and layer, each needed expert is a hit if
resident, otherwise a miss that fills an empty slot or evicts the policy's victim among residents
the current token does not need.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

from ..policy import POLICY_CLASSES, EvictionPolicy, make_policy
from .format import Routing, Trace, _is_int

POLICY_NAMES = tuple(POLICY_CLASSES)


# --------------------------------------------------------------------------------------------
# replay


@dataclass
class ReplayResult:
    """Hits/misses/evictions per layer for one policy (or Belady) at one cache size per layer.

    ``cold_misses`` are first-ever uses: no cache of any policy avoids them, so ``cold_bound`` is
    the hit rate an infinite cache would reach, an upper bound above Belady's.
    """
    policy: str
    cache_sizes: tuple[int, ...]
    hits: list[int]
    misses: list[int]
    evictions: list[int]
    cold_misses: list[int]

    @property
    def accesses(self) -> int:
        return sum(self.hits) + sum(self.misses)

    @property
    def hit_rate(self) -> float:
        return sum(self.hits) / self.accesses if self.accesses else 0.0

    @property
    def layer_hit_rates(self) -> list[float]:
        return [h / (h + m) if h + m else 0.0 for h, m in zip(self.hits, self.misses)]

    @property
    def cold_bound(self) -> float:
        return 1.0 - sum(self.cold_misses) / self.accesses if self.accesses else 0.0

    @property
    def layer_cold_bounds(self) -> list[float]:
        return [1.0 - c / (h + m) if h + m else 0.0 for c, h, m in zip(self.cold_misses, self.hits, self.misses)]

    def to_dict(self) -> dict:
        return {"policy": self.policy, "cache_sizes": list(self.cache_sizes), "hit_rate": self.hit_rate,
                "hits": sum(self.hits), "misses": sum(self.misses), "evictions": sum(self.evictions),
                "cold_misses": sum(self.cold_misses), "cold_bound": self.cold_bound,
                "layer_hit_rates": self.layer_hit_rates, "layer_hits": list(self.hits),
                "layer_misses": list(self.misses), "layer_evictions": list(self.evictions)}


def _routing(trace: Union[Trace, Routing]) -> tuple[Routing, int]:
    if isinstance(trace, Trace):
        return trace.routing, trace.num_experts
    return trace, 1 + max((e for tok in trace for ex in tok for e in ex), default=-1)


def _sizes(cache_size: Union[int, Sequence[int]], num_layers: int, num_experts: int) -> tuple[int, ...]:
    sizes = (cache_size,) * num_layers if isinstance(cache_size, int) else tuple(cache_size)
    if len(sizes) != num_layers:
        raise ValueError(f"{len(sizes)} per-layer cache sizes given for {num_layers} layers")
    for k in sizes:
        if not _is_int(k) or not 1 <= k <= num_experts:
            raise ValueError(f"cache size {k!r} must be between 1 and the number of experts ({num_experts})")
    return sizes


PolicySpec = Union[str, Callable[[int], EvictionPolicy]]


def _replay_layer(column: Sequence[tuple[int, ...]], k: int, choose: Callable, policy: Optional[EvictionPolicy]):
    """One layer's replay, in ``ExpertCache.fetch``'s order; ``choose(tick, candidates) -> victim``.

    Per token: every hit is accessed first; then each miss takes an empty slot or the victim's slot,
    candidates being residents the token does not need (in slot order); the loaded experts are
    accessed after all of them are in. Only when k < top_k do candidates run out: the remaining
    misses then reuse slots of experts this token has already been served.
    """
    slots: list[int] = []                 # expert per slot, in slot order
    hits = misses = evictions = 0
    for tick, needed in enumerate(column):
        present = [e for e in needed if e in slots]
        absent = [e for e in needed if e not in slots]
        hits += len(present)
        misses += len(absent)
        if policy is not None:
            for e in present:
                policy.on_access(e, tick)
        pending = set(needed)
        issued = 0
        for e in absent:
            if len(slots) < k:
                slots.append(e)
            else:
                candidates = [r for r in slots if r not in pending]
                if not candidates:
                    break
                v = choose(tick, candidates)
                slots[slots.index(v)] = e
                evictions += 1
                if policy is not None:
                    policy.on_remove(v)
            issued += 1
            if policy is not None:
                policy.on_insert(e, tick)
        pending.difference_update(present)
        for e in absent[:issued]:
            pending.discard(e)
            if policy is not None:
                policy.on_access(e, tick)
        for e in absent[issued:]:         # k < top_k
            v = choose(tick, [r for r in slots if r not in pending])
            slots[slots.index(v)] = e
            evictions += 1
            pending.discard(e)
            if policy is not None:
                policy.on_remove(v)
                policy.on_insert(e, tick)
                policy.on_access(e, tick)
    return hits, misses, evictions


def _cold(column: Sequence[tuple[int, ...]]) -> int:
    return len({e for needed in column for e in needed})


def simulate(trace: Union[Trace, Routing], cache_size: Union[int, Sequence[int]], policy: PolicySpec) -> ReplayResult:
    """Replay ``trace`` through a per-layer cache of ``cache_size`` experts run by ``policy``.

    ``policy`` is a name from ``POLICY_CLASSES`` or a factory ``num_experts -> EvictionPolicy``
    (one instance per layer, as in the real cache).
    """
    routing, num_experts = _routing(trace)
    num_layers = len(routing[0]) if routing else 0
    sizes = _sizes(cache_size, num_layers, num_experts)
    factory = (lambda n: make_policy(policy, n)) if isinstance(policy, str) else policy
    policies = [factory(num_experts) for _ in range(num_layers)]
    name = policy if isinstance(policy, str) else getattr(policies[0] if policies else None, "name", "custom")
    hits, misses, evictions, cold = [], [], [], []
    for l, pol in enumerate(policies):
        column = [tok[l] for tok in routing]
        h, m, ev = _replay_layer(column, sizes[l], lambda tick, cands: pol.victim(cands), pol)
        hits.append(h), misses.append(m), evictions.append(ev), cold.append(_cold(column))
    return ReplayResult(name, sizes, hits, misses, evictions, cold)


def belady(trace: Union[Trace, Routing], cache_size: Union[int, Sequence[int]]) -> ReplayResult:
    """Offline optimum (MIN): evict the candidate whose next use is farthest away; experts the current
    token needs are never candidates (same rules as ``simulate``)."""
    routing, num_experts = _routing(trace)
    num_layers = len(routing[0]) if routing else 0
    sizes = _sizes(cache_size, num_layers, num_experts)
    hits, misses, evictions, cold = [], [], [], []
    never = len(routing)
    for l in range(num_layers):
        column = [tok[l] for tok in routing]
        # next_use[t][e]: first token after t that uses e (``never`` if none)
        next_use: list[list[int]] = [[]] * len(column)
        ahead = [never] * max(num_experts, 1)
        for t in range(len(column) - 1, -1, -1):
            next_use[t] = ahead[:]
            for e in column[t]:
                ahead[e] = t

        def choose(tick: int, candidates: list[int]) -> int:
            nu = next_use[tick]
            return max(candidates, key=lambda e: nu[e])

        h, m, ev = _replay_layer(column, sizes[l], choose, None)
        hits.append(h), misses.append(m), evictions.append(ev), cold.append(_cold(column))
    return ReplayResult("belady", sizes, hits, misses, evictions, cold)


def compare(trace: Trace, cache_size: Union[int, Sequence[int]], policies: Sequence[PolicySpec] = POLICY_NAMES,
            ) -> dict[str, ReplayResult]:
    """Every policy plus Belady on one trace and cache size."""
    out = {}
    for p in policies:
        r = simulate(trace, cache_size, p)
        out[r.policy] = r
    out["belady"] = belady(trace, cache_size)
    return out
