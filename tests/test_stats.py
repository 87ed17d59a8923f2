"""Counters and the snapshot: every figure the panel and the API read, driven through ``Stats`` itself,
with a clock the test controls where a figure depends on time."""
from __future__ import annotations

import json

import pytest

from mixoff_app import stats as stats_module
from mixoff_app.stats import HISTORY_TOKENS, ROLLING_TOKENS, MemoryReading, Stats

MEM = MemoryReading(gpu_name=None, process_rss=1 << 20)
MiB = 1 << 20


class Clock:
    """Stands in for the ``time`` module inside ``mixoff_app.stats``."""

    def __init__(self) -> None:
        self.now = 100.0

    def perf_counter(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch):
    c = Clock()
    monkeypatch.setattr(stats_module, "time", c)
    return c


def token(s: Stats, hits=(), misses=(), layer=0) -> None:
    for e in hits:
        s.on_hit(layer, e)
    for e in misses:
        s.on_miss(layer, e, MiB)
    s.on_route(layer, tuple(hits) + tuple(misses))
    s.end_token()


def test_counters_land_where_they_happen():
    s = Stats(num_moe_layers=2, num_experts=8, top_k=2, cache_sizes=(2, 3), policy="lfu", placement="exclusive")
    s.begin_answer()
    s.on_hit(0, 1)
    s.on_miss(1, 4, 3 * MiB)
    s.on_evict(1, 5, nbytes_written_back=2 * MiB)
    s.on_prefetch(0, 6, MiB)
    s.on_prefetch_used(0, 6)
    s.on_prefetch(1, 7, MiB)
    s.on_prefetch_wasted(1, 7)
    s.on_disk_read(5 * MiB)
    s.on_slot(1, 2, 4)
    s.end_token()
    snap = s.snapshot(MEM)
    assert (snap.hits, snap.misses, snap.evictions) == (1, 1, 1)
    assert snap.layer_hits == (1, 0) and snap.layer_misses == (0, 1)
    assert snap.bytes_h2d == 5 * MiB and snap.bytes_d2h == 2 * MiB and snap.bytes_disk == 5 * MiB
    assert (snap.prefetch_issued, snap.prefetch_used, snap.prefetch_wasted) == (2, 1, 1)
    assert snap.resident == ((-1, -1), (-1, -1, 4))
    assert snap.cache_sizes == (2, 3) and snap.policy == "lfu" and snap.placement == "exclusive"
    assert snap.last_token[0].hits == (1,) and snap.last_token[0].prefetched == (6,)
    assert snap.last_token[1].misses == (4,) and snap.last_token[1].evicted == (5,)
    assert snap.hit_rate == 0.5 and snap.memory is MEM
    # A re-plan keeps the counters and empties the slots.
    s.configure((1, 1), "lru", "inclusive")
    snap = s.snapshot(MEM)
    assert snap.resident == ((-1,), (-1,)) and snap.hits == 1 and snap.policy == "lru"


def test_prefill_counts_in_the_totals_but_not_in_the_per_token_history():
    s = Stats(1, 8, 2, (2,))
    s.begin_answer()
    for e in range(5):
        s.on_miss(0, e, MiB)
    s.end_prefill(12)
    token(s, hits=(3, 4))
    token(s, hits=(4,), misses=(0,))
    snap = s.snapshot(MEM)
    assert snap.prefill_tokens == 12 and snap.answer_tokens == 2
    assert snap.hit_rate_history == (1.0, 0.5)
    assert (snap.hits, snap.misses) == (3, 6) and snap.answer_hit_rate == pytest.approx(3 / 9)
    c = s.answer_counters()
    assert c["prefill"]["misses"] == 5 and c["prefill"]["hits"] == 0 and c["prefill"]["bytes_h2d"] == 5 * MiB
    assert c["decode"]["hits"] == 3 and c["decode"]["misses"] == 1 and c["decode"]["bytes_h2d"] == MiB
    assert snap.routing == (((3, 4),), ((4, 0),))
    # The next answer starts its own counts; the totals go on.
    s.begin_answer()
    s.end_prefill(1)
    token(s, misses=(7,))
    c, snap = s.answer_counters(), s.snapshot(MEM)
    assert c["decode"]["misses"] == 1 and c["prefill"]["misses"] == 0
    assert snap.answer_tokens == 1 and snap.answer_hit_rate == 0.0 and snap.tokens_total == 3
    assert snap.routing == (((7,),),)


def test_rolling_hit_rate_covers_the_last_window_and_history_is_bounded():
    s = Stats(1, 8, 2, (2,))
    s.begin_answer()
    for _ in range(10):
        token(s, misses=(0, 1))
    for _ in range(ROLLING_TOKENS):
        token(s, hits=(0, 1))
    snap = s.snapshot(MEM)
    assert snap.rolling_hit_rate == 1.0
    assert snap.answer_hit_rate == pytest.approx(ROLLING_TOKENS / (ROLLING_TOKENS + 10))
    token(s, misses=(2, 3))
    assert s.snapshot(MEM).rolling_hit_rate == pytest.approx((ROLLING_TOKENS - 1) / ROLLING_TOKENS)
    for _ in range(HISTORY_TOKENS):
        token(s, hits=(0,))
    snap = s.snapshot(MEM)
    assert len(snap.hit_rate_history) == HISTORY_TOKENS and snap.tokens_total == ROLLING_TOKENS + 11 + HISTORY_TOKENS


def test_times_and_speeds_follow_the_clock(clock):
    s = Stats(1, 8, 2, (2,))
    s.begin_answer()                        # t = 100
    clock.now = 100.4
    s.end_prefill(20)
    clock.now = 100.5
    s.first_token_sent()                    # the first token reaches the caller
    snap = s.snapshot(MEM)
    assert snap.ttft_s == pytest.approx(0.5) and snap.prefill_s == pytest.approx(0.4)
    assert snap.answer_tokens == 0 and snap.tokens_per_s == 0.0 and snap.generating
    for i in range(5):                      # one decode step every 0.25 s
        clock.now = 100.75 + 0.25 * i
        token(s, misses=(i,))
    snap = s.snapshot(MEM)
    assert snap.ttft_s == pytest.approx(0.5)                  # later tokens do not move it
    assert snap.decode_s == pytest.approx(1.0) and snap.avg_tokens_per_s == pytest.approx(4.0)
    assert snap.tokens_per_s == pytest.approx(4.0)
    # bytes moved over the answer's wall time, up to its last token (1.75 s)
    assert snap.copy_bandwidth == pytest.approx(5 * MiB / 1.75)
    s.end_answer()
    snap2 = s.snapshot(MEM)
    assert not snap2.generating and snap2.seq == snap.seq + 1


def test_seq_moves_only_when_something_changed():
    s = Stats(1, 8, 2, (2,))
    a = s.snapshot(MEM).seq
    assert s.snapshot(MEM).seq == a
    s.begin_answer()
    token(s, hits=(0,))
    b = s.snapshot(MEM).seq
    s.end_answer()
    assert a < b < s.snapshot(MEM).seq


def test_snapshot_is_frozen_and_serialises():
    s = Stats(2, 4, 2, (1, 1))
    s.begin_answer()
    token(s, misses=(0, 1))
    snap = s.snapshot(MEM)
    with pytest.raises(AttributeError):
        snap.hits = 5
    d = json.loads(json.dumps(snap.to_dict()))
    assert d["misses"] == 2 and d["memory"]["process_rss"] == 1 << 20 and d["routing"] == [[[0, 1], []]]
