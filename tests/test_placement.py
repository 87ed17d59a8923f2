"""Placements: inclusive, exclusive (swap with write-back) and disk-backed give the same greedy tokens; their
counters count bytes in both directions; every expert lives in exactly one place under exclusive."""
from __future__ import annotations

import pytest
import torch

from mixoff_app.config import CacheConfig, ConfigError, EngineConfig, QuantConfig, SamplingParams
from mixoff_app.engine import Engine

PROMPT = list(range(5, 29))


@pytest.fixture(scope="module")
def mixoff_dir(tiny_dir, tmp_path_factory):
    """The tiny model in mixoff's own format (attention 4-bit, experts 2-bit): what the disk tier reads."""
    from mixoff_app.checkpoints import save_quantized
    return save_quantized(tiny_dir, tmp_path_factory.mktemp("mixoff") / "tiny-q", QuantConfig())


def load(path, placement, k, prefetch=0, policy="lru"):
    # The reference path holds the 2-bit experts as stored, which the disk tier reads; the CPU kernels' own
    # format is held to the same invariance in tests/test_cpu_model.py.
    return Engine.load(EngineConfig(model=str(path), device="cpu", max_context=256, kernel="torch",
                                    cache=CacheConfig(sizes=(k,), placement=placement, prefetch=prefetch,
                                                      policy=policy)))


def greedy(engine, n=12):
    return [ev.token_id for ev in engine.stream_ids(PROMPT, SamplingParams(max_new_tokens=n, greedy=True))
            if ev.kind == "token" and ev.token_id is not None]


def check_exclusive_invariant(engine):
    """Each expert is in exactly one place: a device slot or a host row; rows in use are distinct."""
    cache, store = engine.model.cache, engine.model.cache.store
    E = store.cfg.num_experts
    used_rows = []
    for layer, L in enumerate(cache.layers):
        on_device = {e for e in L.expert_in if e >= 0}
        on_host = {e for e in range(E) if store.home[layer][e] >= 0}
        assert on_device.isdisjoint(on_host)
        assert on_device | on_host == set(range(E))
        assert len(on_device) == cache.sizes[layer]
        used_rows += [store.home[layer][e] for e in on_host]
    assert len(used_rows) == len(set(used_rows))
    assert len(store.free) == 1 and store.free[0] not in used_rows        # exactly one spare row
    assert store.host_rows == len(used_rows) + 1


@pytest.mark.parametrize("k", [1, 2, 3, 8])
def test_greedy_tokens_equal_across_placements(mixoff_dir, k):
    ref = load(mixoff_dir, "inclusive", k)
    want = greedy(ref)
    for placement in ("exclusive", "disk"):
        eng = load(mixoff_dir, placement, k)
        assert greedy(eng) == want, (placement, k)
        if placement == "exclusive":
            check_exclusive_invariant(eng)


def test_counters_count_both_directions(mixoff_dir):
    inc, exc, dsk = (load(mixoff_dir, p, 2) for p in ("inclusive", "exclusive", "disk"))
    for eng in (inc, exc, dsk):
        greedy(eng)
    nb = inc.info.expert_bytes
    a, b, c = inc.stats(), exc.stats(), dsk.stats()
    assert a.bytes_d2h == 0 and a.bytes_disk == 0 and a.bytes_h2d == a.misses * nb
    # exclusive: every eviction wrote its expert back; the slots start full, so every miss evicts
    assert b.bytes_d2h == b.evictions * nb == b.misses * nb and b.bytes_h2d == b.misses * nb
    assert b.bytes_disk == 0
    # disk: every load came from the file; evictions are free
    assert c.bytes_disk == c.bytes_h2d == c.misses * nb and c.bytes_d2h == 0
    assert (a.placement, b.placement, c.placement) == ("inclusive", "exclusive", "disk")
    assert exc.info.cache.placement == "exclusive"


def test_exclusive_bytes_survive_many_swaps(mixoff_dir):
    """After a generation full of swaps, every expert's bytes (host row or slot) equal the file's."""
    from mixoff_app.stores import DiskStore
    eng = load(mixoff_dir, "exclusive", 1, prefetch=1)
    greedy(eng, 16)
    assert eng.stats().evictions > 20
    store = eng.model.cache.store
    ref = DiskStore(store.cfg, store.layout, mixoff_dir, staging=1)
    for layer in range(store.cfg.num_layers):
        for e in range(store.cfg.num_experts):
            assert torch.equal(store.buffer(layer, e), ref.buffer(layer, e)), (layer, e)
    ref.close()


def test_exclusive_resize_moves_experts_between_tiers(mixoff_dir):
    eng = load(mixoff_dir, "exclusive", 2)
    want = greedy(load(mixoff_dir, "inclusive", 2))
    assert greedy(eng) == want
    nb = eng.info.expert_bytes
    L, E = eng.model.cfg.num_layers, eng.model.cfg.num_experts
    for k in (4, 1, 8, 3):
        eng.reconfigure_cache(CacheConfig(sizes=(k,), placement="exclusive"))
        check_exclusive_invariant(eng)
        assert eng.model.cache.store.nbytes == (L * (E - k) + 1) * nb       # the host share follows k
        assert greedy(eng) == want


def test_prefetch_and_policies_keep_parity_under_exclusive_and_disk(mixoff_dir):
    want = greedy(load(mixoff_dir, "inclusive", 2))
    for placement in ("exclusive", "disk"):
        for policy in ("lfu", "lrfu"):
            eng = load(mixoff_dir, placement, 2, prefetch=2, policy=policy)
            assert greedy(eng) == want, (placement, policy)


def test_disk_placement_needs_the_mixoff_format(tiny_dir):
    with pytest.raises(ConfigError, match="python -m mixoff_app quantize"):
        load(tiny_dir, "disk", 2)


def test_disk_store_holds_only_staging(mixoff_dir):
    eng = load(mixoff_dir, "disk", 2)
    store = eng.model.cache.store
    assert store.nbytes == 2 * eng.info.expert_bytes


@pytest.mark.gpu
def test_placements_on_cuda_give_the_same_tokens(mixoff_dir):
    def gpu(placement, k):
        return Engine.load(EngineConfig(model=str(mixoff_dir), device="cuda", max_context=256, dtype="float32",
                                        cache=CacheConfig(sizes=(k,), placement=placement)))
    for k in (1, 2, 8):
        want = greedy(gpu("inclusive", k))
        for placement in ("exclusive", "disk"):
            eng = gpu(placement, k)
            assert greedy(eng) == want, (placement, k)
            s = eng.stats()
            if placement == "exclusive":
                assert s.bytes_d2h == s.evictions * eng.info.expert_bytes
                check_exclusive_invariant(eng)
        assert torch.cuda.max_memory_allocated() > 0
