"""The three placements through the one ``ExpertStore`` protocol: what a load into a slot brings, where every
expert's bytes are after many loads, what a resize keeps, and what each holds on the host."""
from __future__ import annotations

import random

import pytest
import torch

from mixoff_app.config import ModelConfig, QuantSpec
from mixoff_app.stores import DiskStore, ExclusiveStore, ExpertLayout, ExpertStore, InclusiveStore, make_store

CFG = ModelConfig(vocab_size=16, hidden_size=16, intermediate_size=32, num_layers=3, num_heads=2,
                  num_kv_heads=1, head_dim=8, num_experts=6, top_k=2)
LAYOUT = ExpertLayout.for_model(CFG, QuantSpec(bits=None), torch.float32)
SIZES = (2, 1, 3)
PLACEMENTS = ("inclusive", "exclusive", "disk")
CPU = torch.device("cpu")


def pattern(layer: int, expert: int) -> torch.Tensor:
    """Bytes that say which expert they are (and differ along the buffer, so a partial copy shows)."""
    return (torch.arange(LAYOUT.nbytes, dtype=torch.int64) + 7 * layer + 31 * expert).remainder(251).to(torch.uint8)


@pytest.fixture(scope="module")
def blob_dir(tmp_path_factory):
    """A mixoff-format file holding only the expert blobs: all the disk store reads."""
    from safetensors.torch import save_file
    folder = tmp_path_factory.mktemp("blobs")
    save_file({f"model.layers.{i}.block_sparse_moe.experts.{e}.packed": pattern(i, e)
               for i in range(CFG.num_layers) for e in range(CFG.num_experts)},
              str(folder / "model.safetensors"), metadata={"mixoff.format": "1"})
    return folder


def new_store(placement, blob_dir):
    store = make_store(placement, CFG, LAYOUT, SIZES, CPU, folder=blob_dir)
    for i, e, target in store.load_targets():     # what the checkpoint loader does
        target.copy_(pattern(i, e))
    return store


def swap_in(store, slots, residents, layer, expert, slot):
    victim = residents[layer][slot]
    n = store.load_into(layer, expert, slots[layer][slot], victim, None, None)
    store.settle(slots[layer][slot])                  # the protocol: a slot is read only once settled
    residents[layer][slot] = expert
    return n


def check_every_expert(store, slots, residents):
    for i in range(CFG.num_layers):
        for s, e in enumerate(residents[i]):
            if e >= 0:
                assert torch.equal(slots[i][s], pattern(i, e)), (i, s, e)
        for e in range(CFG.num_experts):
            assert torch.equal(store.buffer(i, e), pattern(i, e)), (i, e)


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_load_into_brings_the_expert_and_keeps_every_other(placement, blob_dir):
    store = new_store(placement, blob_dir)
    assert store.placement == placement
    slots, residents = store.open_slots(SIZES, CPU)
    assert [tuple(s.shape) for s in slots] == [(k, LAYOUT.nbytes) for k in SIZES]
    check_every_expert(store, slots, residents)
    rng = random.Random(0)
    for _ in range(60):
        i = rng.randrange(CFG.num_layers)
        absent = [e for e in range(CFG.num_experts) if e not in residents[i]]
        e, s = rng.choice(absent), rng.randrange(SIZES[i])
        n = swap_in(store, slots, residents, i, e, s)
        assert n == (LAYOUT.nbytes if placement == "disk" else 0)      # only the disk tier reads the file
        assert torch.equal(slots[i][s], pattern(i, e))
    check_every_expert(store, slots, residents)
    assert store.device_buffers() == []                                # no staging buffer off CUDA


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_resize_keeps_every_expert(placement, blob_dir):
    store = new_store(placement, blob_dir)
    slots, residents = store.open_slots(SIZES, CPU)
    swap_in(store, slots, residents, 0, 5, 1)
    for sizes in ((4, 1, 2), (1, 1, 1), (6, 6, 6), (2, 3, 1)):
        slots, residents = store.resize(list(slots), residents, sizes)
        assert [s.shape[0] for s in slots] == list(sizes)
        assert all(len(r) == k for r, k in zip(residents, sizes))
        if placement == "exclusive":      # the slots come back full: every expert is somewhere
            assert all(-1 not in r for r in residents)
        else:                             # eviction is free: the new slots start empty
            assert all(r == [-1] * k for r, k in zip(residents, sizes))
        check_every_expert(store, slots, residents)


def test_host_bytes_follow_the_placement(blob_dir):
    nb, L, E = LAYOUT.nbytes, CFG.num_layers, CFG.num_experts
    inc, exc, dsk = (new_store(p, blob_dir) for p in PLACEMENTS)
    assert inc.nbytes == L * E * nb
    assert exc.nbytes == (L * E - sum(SIZES) + 1) * nb          # off-device experts + the swap's spare row
    assert dsk.nbytes == 2 * nb                                  # staging buffers only
    assert [s.write_back for s in (inc, exc, dsk)] == [False, True, False]
    assert all(s.pinned_bytes == 0 for s in (inc, exc, dsk))


def test_exclusive_store_writes_the_victim_back_and_hands_its_slots_once(blob_dir):
    store = new_store("exclusive", blob_dir)
    with pytest.raises(ValueError, match="built for sizes"):
        store.open_slots((1, 1, 1), CPU)
    slots, residents = store.open_slots(SIZES, CPU)
    assert residents == [list(range(k)) for k in SIZES]          # the loader filled the slots first
    with pytest.raises(RuntimeError, match="already handed"):
        store.open_slots(SIZES, CPU)
    row = store.home[1][4]
    swap_in(store, slots, residents, 1, 4, 0)                     # expert 0 goes down, 4 comes up
    assert store.home[1][4] == -1 and store.home[1][0] >= 0 and store.free == [row]
    assert torch.equal(store.buffer(1, 0), pattern(1, 0))         # the written-back copy
    assert store.buffer(1, 4).data_ptr() == slots[1][0].data_ptr()   # its one place is the slot
    with pytest.raises(RuntimeError, match="neither on the device nor on the host"):
        store.load_into(1, 4, slots[1][0], -1, None, None)


def test_disk_store_is_read_only_and_needs_the_mixoff_format(blob_dir, tmp_path):
    from mixoff_app.config import ConfigError
    store = DiskStore(CFG, LAYOUT, blob_dir)
    assert list(store.load_targets()) == []
    with pytest.raises(ConfigError, match="read-only"):
        store.fill(0, 0, {})
    store.close()
    with pytest.raises(ConfigError, match="quantize"):
        DiskStore(CFG, LAYOUT, tmp_path)


def test_make_store_builds_each_placement(blob_dir):
    stores = {p: make_store(p, CFG, LAYOUT, SIZES, CPU, folder=blob_dir) for p in PLACEMENTS}
    assert all(isinstance(s, ExpertStore) for s in stores.values())     # each has every member of the protocol
    kinds = {p: type(s) for p, s in stores.items()}
    assert kinds == {"inclusive": InclusiveStore, "exclusive": ExclusiveStore, "disk": DiskStore}
