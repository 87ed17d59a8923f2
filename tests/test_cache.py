"""Expert cache bookkeeping: LRU order, counter identities, residency."""
from __future__ import annotations

from collections import OrderedDict

import pytest
import torch

from mixoff_app.config import ModelConfig, QuantSpec
from mixoff_app.expert_cache import ExpertCache
from mixoff_app.stores import ExpertLayout, InclusiveStore
from mixoff_app.stats import Stats

from helpers import chat_ids, greedy_ids, load

CFG = ModelConfig(vocab_size=16, hidden_size=16, intermediate_size=32, num_layers=2, num_heads=2,
                  num_kv_heads=1, head_dim=8, num_experts=6, top_k=2)


def small_cache(k: int):
    layout = ExpertLayout.for_model(CFG, QuantSpec(bits=None), torch.float32)
    store = InclusiveStore(CFG, layout)
    for layer in range(CFG.num_layers):
        for e in range(CFG.num_experts):
            store.buffer(layer, e).view(torch.float32).fill_(layer * 100 + e)   # a recognisable pattern
    stats = Stats(CFG.num_layers, CFG.num_experts, CFG.top_k, (k,) * CFG.num_layers)
    return ExpertCache(store, (k,) * CFG.num_layers, "lru", torch.device("cpu"), stats), stats


def use(cache, layer, experts, check=True):
    got = []
    for e, w, slot in cache.fetch(layer, experts):
        if check:
            assert torch.all(w.w1 == layer * 100 + e)    # the slot really holds that expert's bytes
        got.append(e)
        cache.release(layer, slot)
    return got


def test_lru_order_and_evictions_follow_a_reference_lru():
    cache, stats = small_cache(3)
    ref: OrderedDict = OrderedDict()
    seq = [[0, 1], [2, 0], [3, 1], [0, 4], [5, 2], [4, 5], [1, 3], [1, 0]]
    exp_hits = exp_misses = exp_evict = 0
    for experts in seq:
        cache.next_token()
        for e in experts:
            if e in ref:
                exp_hits += 1
                ref.move_to_end(e)
        for e in experts:
            if e not in ref:
                exp_misses += 1
                if len(ref) == 3:
                    victim = next(x for x in ref if x not in experts)
                    del ref[victim]
                    exp_evict += 1
                ref[e] = None
        got = use(cache, 0, experts)
        assert sorted(got) == sorted(experts)
        assert cache.layers[0].policy.order() == list(ref)
        assert sorted(e for e in cache.resident(0) if e >= 0) == sorted(ref)
    assert (stats.hits, stats.misses, stats.evictions) == (exp_hits, exp_misses, exp_evict)
    assert stats.bytes_h2d == exp_misses * cache.expert_bytes


def test_hits_are_served_before_misses():
    cache, _ = small_cache(2)
    use(cache, 1, [4, 5])
    assert use(cache, 1, [3, 5]) == [5, 3]


def test_k_smaller_than_top_k_reuses_the_slot():
    cache, stats = small_cache(1)
    assert sorted(use(cache, 0, [2, 3])) == [2, 3]
    assert stats.misses == 2 and stats.evictions == 1
    assert cache.resident(0) == [3]


def test_prefetch_counts_used_and_wasted():
    cache, stats = small_cache(2)
    use(cache, 0, [0, 1])
    cache.next_token()
    assert cache.prefetch(0, [2]) == 1                # evicts the LRU expert 0
    assert stats.prefetch_issued == 1
    use(cache, 0, [2, 1])                             # the guess was right
    assert stats.prefetch_used == 1
    cache.prefetch(0, [3])                            # wrong guess...
    use(cache, 0, [4, 2])                             # ...evicted before use
    assert stats.prefetch_wasted == 1


def test_decode_counters_add_up(tiny_dir, tokenizer):
    engine = load(tiny_dir, k=2)
    n = 20
    ids = greedy_ids(engine, chat_ids(tokenizer), n)
    c = engine.answer_counters()["decode"]
    cfg = engine.model.cfg
    assert c["hits"] + c["misses"] == cfg.top_k * cfg.num_layers * len(ids)
    assert c["bytes_h2d"] == c["misses"] * engine.info.expert_bytes
    routing = engine.last_routing
    assert len(routing) == len(ids) and all(len(tok) == cfg.num_layers for tok in routing)
    assert all(len(set(layer)) == cfg.top_k for tok in routing for layer in tok)


def test_all_resident_never_misses_twice(tiny_dir, tokenizer):
    engine = load(tiny_dir, k=None)                   # k = number of experts
    greedy_ids(engine, chat_ids(tokenizer), 24)
    greedy_ids(engine, chat_ids(tokenizer, "And what about zip?"), 24)
    s = engine.stats()
    used = {(layer, e) for tok in engine.last_routing for layer, es in enumerate(tok) for e in es}
    assert s.evictions == 0
    assert s.misses <= engine.model.cfg.num_layers * engine.model.cfg.num_experts
    assert s.bytes_h2d == s.misses * engine.info.expert_bytes
    # Every expert the last answer used is resident now.
    for layer, e in used:
        assert e in engine.model.cache.resident(layer)


def reference_lru(requests, k: int):
    """An LRU written out by hand, independent of ExpertCache: per layer an OrderedDict, least recent
    first. Each request (one layer's experts for one prefill or decode step) is served whole: its hits
    are touched first, then its misses load in order; a miss evicts the least recent resident the request
    does not name, and only when every resident is named (k below the request's size) one it has already
    been served from. Returns (hits, misses, evictions, resident experts per layer)."""
    lru: dict[int, OrderedDict] = {}
    hits = misses = evictions = 0
    for layer, experts in requests:
        cache = lru.setdefault(layer, OrderedDict())
        missing = [e for e in experts if e not in cache]
        for e in experts:
            if e in cache:
                hits += 1
                cache.move_to_end(e)
        for e in missing:
            misses += 1
            if len(cache) == k:
                others = [x for x in cache if x not in experts]
                del cache[others[0] if others else next(iter(cache))]
                evictions += 1
            cache[e] = None
    return hits, misses, evictions, {layer: set(c) for layer, c in lru.items()}


@pytest.mark.parametrize("k", [1, 3])
def test_the_engines_cache_counts_what_a_reference_lru_counts(tiny_dir, tokenizer, k):
    """Record what the model asks the cache for over two answers (prefill and decode), replay those
    requests through ``reference_lru``, and compare every counter and the final residents."""
    engine = load(tiny_dir, k=k)
    cache = engine.model.cache
    requests, fetch = [], cache.fetch

    def spy(layer, experts):
        requests.append((layer, list(experts)))
        return fetch(layer, experts)

    cache.fetch = spy
    greedy_ids(engine, chat_ids(tokenizer), 12)
    first = len(requests)
    greedy_ids(engine, chat_ids(tokenizer, "And what about zip?"), 12)
    s, c = engine.stats(), engine.answer_counters()["decode"]
    L = engine.model.cfg.num_layers
    # The decode requests are exactly the routing the engine reports (one per token and layer).
    decode = requests[len(requests) - L * len(engine.last_routing):]
    assert decode == [(layer, list(es)) for tok in engine.last_routing for layer, es in enumerate(tok)]
    assert requests[first][0] == 0 and requests[first + L - 1][0] == L - 1      # the second prefill

    hits, misses, evictions, resident = reference_lru(requests, k)
    assert (s.hits, s.misses, s.evictions) == (hits, misses, evictions)
    assert s.bytes_h2d == misses * engine.info.expert_bytes
    assert {layer: set(cache.resident(layer)) - {-1} for layer in range(L)} == resident
    dh, dm, de, _ = reference_lru(requests[:len(requests) - len(decode)], k)
    assert (c["hits"], c["misses"], c["evictions"]) == (hits - dh, misses - dm, evictions - de)
    assert evictions > 0 and hits > 0               # the comparison exercised both
