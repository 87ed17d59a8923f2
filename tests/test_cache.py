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
    c = engine._stats.answer_counters()["decode"]
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


def test_replaying_the_routing_through_a_reference_lru_gives_the_same_counts(tiny_dir, tokenizer):
    engine = load(tiny_dir, k=3)
    ids = chat_ids(tokenizer)
    greedy_ids(engine, ids, 16)
    c = engine._stats.answer_counters()["decode"]
    # Rebuild the cache state after prefill from a fresh engine, then replay decode routing by hand.
    fresh = load(tiny_dir, k=3)
    fresh.model.forward(torch.tensor(ids), 0)
    hits = misses = 0
    for tok in engine.last_routing:
        fresh.model.cache.next_token()
        for layer, experts in enumerate(tok):
            before = set(fresh.model.cache.resident(layer))
            hits += sum(e in before for e in experts)
            misses += sum(e not in before for e in experts)
            use(fresh.model.cache, layer, list(experts), check=False)
    assert (hits, misses) == (c["hits"], c["misses"])
