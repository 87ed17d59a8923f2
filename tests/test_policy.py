"""Eviction policies: ordering rules, tie-breaks, hints, and the cache rules they run under."""
from __future__ import annotations

import random

import pytest

from mixoff_app.config import POLICIES
from mixoff_app.policy import LFU, LRFU, LRU, POLICY_CLASSES, EvictionPolicy, make_policy
from mixoff_app.trace import belady, simulate, synthetic_trace


def _use(policy: EvictionPolicy, expert: int, tick: int, insert: bool = False) -> None:
    if insert:
        policy.on_insert(expert, tick)
    policy.on_access(expert, tick)


def test_names_match_config_and_factory():
    assert tuple(POLICY_CLASSES) == POLICIES
    for name in POLICIES:
        p = make_policy(name, 8)
        assert p.name == name and p.num_experts == 8
    with pytest.raises(ValueError, match="unknown eviction policy 'fifo'"):
        make_policy("fifo", 8)


def test_lru_order_and_victim():
    p = LRU(8)
    for t, e in enumerate([0, 1, 2]):
        _use(p, e, t, insert=True)
    _use(p, 0, 3)
    assert p.order() == [1, 2, 0]
    assert p.victim([1, 2, 0]) == 1
    assert p.victim([2, 0]) == 2          # 1 not a candidate (needed now)
    p.on_remove(1)
    assert p.order() == [2, 0]
    p.on_hint([2], 4)                     # LRU ignores hints
    assert p.victim([2, 0]) == 2


def test_lfu_counts_whole_history_and_breaks_ties_by_recency():
    p = LFU(8)
    _use(p, 0, 0, insert=True)
    _use(p, 0, 1)
    _use(p, 1, 1, insert=True)
    _use(p, 2, 2, insert=True)
    assert p.victim([0, 1, 2]) == 1       # 1 and 2 used once; 1 less recently
    assert p.victim([0, 2]) == 2
    # counts survive eviction: 3 was used 3 times, evicted, and comes back
    for t in (3, 4, 5):
        _use(p, 3, t, insert=(t == 3))
    p.on_remove(3)
    _use(p, 3, 6, insert=True)
    assert p.count(3) == 4
    _use(p, 1, 7)                         # 1: 2 uses now, 2: 1 use
    assert p.victim([3, 0, 1, 2]) == 2
    assert p.victim([3, 0, 1]) == 0       # 0 and 1 tie at 2 uses; 0 last used at tick 1, 1 at tick 7


def test_lfu_tie_goes_to_least_recent():
    p = LFU(4)
    for t, e in enumerate([0, 1, 2, 3]):
        _use(p, e, t, insert=True)
    _use(p, 2, 4)
    _use(p, 1, 5)
    # counts: 0:1 1:2 2:2 3:1 -> least frequent {0, 3}, 0 older
    assert p.victim([0, 1, 2, 3]) == 0
    assert p.victim([1, 2, 3]) == 3
    assert p.victim([1, 2]) == 2          # tie at 2, 2 used before 1


def test_lrfu_between_lfu_and_lru():
    # expert 0 used at ticks 0, 1, 2 (often, long ago); expert 1 once at tick 10 (recently)
    def run(decay: float) -> LRFU:
        p = LRFU(4, decay=decay)
        for t in (0, 1, 2):
            _use(p, 0, t, insert=(t == 0))
        _use(p, 1, 10, insert=True)
        _use(p, 2, 10, insert=True)       # advances nothing, keeps 2 out of the candidates below
        return p

    assert run(0.0).victim([0, 1]) == 1       # LFU: frequency wins
    assert run(0.001).victim([0, 1]) == 1     # the tuned default is frequency-led
    assert run(1.0).victim([0, 1]) == 0       # LRU-like: recency wins
    assert run(0.5).victim([0, 1]) == 0       # 2^-4 + 2^-4.5 + 2^-5 < 1
    assert run(0.1).victim([0, 1]) == 1       # 2^-0.8 + 2^-0.9 + 2^-1 > 1
    p = run(0.5)
    assert p.score(0) == pytest.approx(2 ** -5 + 2 ** -4.5 + 2 ** -4)
    assert p.score(1) == pytest.approx(1.0)
    assert LRFU(4).decay == LRFU.DEFAULT_DECAY == make_policy("lrfu", 4).decay
    with pytest.raises(ValueError):
        LRFU(4, decay=-1)


def test_lrfu_decay_matches_closed_form_over_a_gap():
    p = LRFU(2, decay=0.25)
    _use(p, 0, 0, insert=True)
    _use(p, 0, 4)
    _use(p, 1, 12, insert=True)
    assert p.score(0) == pytest.approx(2 ** (-0.25 * 12) + 2 ** (-0.25 * 8))


def test_lrfu_protects_hinted_experts_at_the_current_tick_only():
    p = LRFU(8, decay=0.0)
    for t, e in enumerate([0, 1, 2]):
        _use(p, e, t, insert=True)
    _use(p, 1, 3)
    _use(p, 2, 3)
    assert p.victim([0, 1, 2]) == 0
    p.on_hint([0], 3)
    assert p.victim([0, 1, 2]) == 1       # 0 about to be needed; 1 and 2 tie, 1 touched first
    p.on_hint([0, 1, 2], 3)
    assert p.victim([0, 1, 2]) == 0       # all hinted: fall back to the score
    p.on_hint([0], 3)
    _use(p, 3, 4, insert=True)            # next token: the old hint is stale
    assert p.victim([0, 1, 2]) == 0
    q = LRFU(8, decay=0.0, hint=False)
    for t, e in enumerate([0, 1]):
        _use(q, e, t, insert=True)
    q.on_hint([0], 1)
    assert q.victim([0, 1]) == 0


class _Spy(EvictionPolicy):
    """Wraps a policy and records every victim choice with the current tick."""

    def __init__(self, inner: EvictionPolicy, log: list) -> None:
        super().__init__(inner.num_experts)
        self.inner, self.log = inner, log
        self.name = inner.name

    def on_insert(self, expert, tick):
        if self.log and self.log[-1][0] is None:   # the miss this victim made room for
            self.log[-1][0] = tick
        self.inner.on_insert(expert, tick)

    def on_access(self, expert, tick):
        self.inner.on_access(expert, tick)

    def on_remove(self, expert):
        self.inner.on_remove(expert)

    def victim(self, candidates):
        v = self.inner.victim(candidates)
        self.log.append([None, list(candidates), v])
        return v


@pytest.mark.parametrize("name", POLICIES)
def test_never_evicts_an_expert_the_token_needs(name):
    trace = synthetic_trace(300, num_layers=2, seed=5)
    for k in (2, 3, 4):
        logs: list[list] = []

        def factory(n, logs=logs):
            logs.append([])
            return _Spy(make_policy(name, n), logs[-1])

        r = simulate(trace, k, factory)
        assert len(logs) == trace.num_layers == 2 and r.policy == name     # one instance per layer, as in the cache
        for layer, log in enumerate(logs):
            assert log, "the policy was never asked for a victim"
            for tick, candidates, v in log:
                needed = set(trace.routing[tick][layer])
                assert v in candidates
                assert not needed & set(candidates)
                assert 0 <= k - len(candidates) < len(needed)   # all residents but the needed ones


@pytest.mark.parametrize("name", POLICIES + ("belady",))
def test_full_cache_only_cold_misses(name):
    rng = random.Random(0)
    routing = [[tuple(rng.sample(range(8), 2)) for _ in range(3)] for _ in range(200)]
    r = belady(routing, 8) if name == "belady" else simulate(routing, 8, name)
    assert r.misses == r.cold_misses == [8, 8, 8]
    assert r.evictions == [0, 0, 0]
    assert r.hit_rate == pytest.approx(r.cold_bound)
    r7 = belady(routing, 7) if name == "belady" else simulate(routing, 7, name)
    assert sum(r7.evictions) > 0 and r7.hit_rate < r.hit_rate
