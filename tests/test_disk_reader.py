"""The disk reader thread: reads happen off the decode thread, a slot is used only after its load, jobs keep
their order, a failed read surfaces where the slot is needed, and the disk placement still decodes the
same tokens (tests/test_placement.py)."""
from __future__ import annotations

import threading
import time

import pytest
import torch

from mixoff_app.stores.disk_reader import DiskReader


def slow_reader(delay: float, log: list):
    def read_into(layer: int, expert: int, buf: torch.Tensor) -> int:
        log.append((threading.current_thread().name, layer, expert))
        time.sleep(delay)
        buf.fill_(10 * layer + expert)
        return buf.numel()
    return read_into


def test_submit_returns_at_once_and_settle_waits_for_the_load():
    log: list = []
    reader = DiskReader(slow_reader(0.2, log), torch.zeros((2, 64), dtype=torch.uint8), torch.device("cpu"))
    slots = torch.zeros((3, 64), dtype=torch.uint8)
    try:
        t = time.perf_counter()
        for s, (layer, e) in enumerate([(0, 1), (1, 2), (2, 3)]):
            reader.submit(layer, e, slots[s])
        assert time.perf_counter() - t < 0.1                 # the decode thread did not wait for the disk
        reader.settle(slots[0])
        assert slots[0].eq(1).all()
        reader.settle(slots[2])                              # in order: the earlier jobs are done too
        assert slots[1].eq(12).all() and slots[2].eq(23).all()
        assert [name for name, *_ in log] == ["mixoff-disk-reader"] * 3
        assert [(layer, e) for _, layer, e in log] == [(0, 1), (1, 2), (2, 3)]
        reader.settle(slots[0])                              # nothing pending: returns at once
    finally:
        reader.close()


def test_a_failed_read_is_raised_where_the_slot_is_needed():
    def broken(layer, expert, buf):
        raise OSError("short read at offset 123")
    reader = DiskReader(broken, torch.zeros((1, 8), dtype=torch.uint8), torch.device("cpu"))
    slot = torch.zeros(8, dtype=torch.uint8)
    try:
        reader.submit(0, 0, slot)
        with pytest.raises(OSError, match="short read"):
            reader.settle(slot)
    finally:
        reader.close()


def test_disk_prefetch_does_not_block_decode(tiny_dir, tmp_path, monkeypatch):
    """With reads slowed down, issuing a prefetch from disk returns at once; the tokens stay right."""
    from mixoff_app.checkpoints import save_quantized
    from mixoff_app.config import CacheConfig, EngineConfig, QuantConfig, SamplingParams
    from mixoff_app.engine import Engine
    from mixoff_app.stores import disk as disk_store

    from helpers import for_this_cpu
    path = save_quantized(tiny_dir, tmp_path / "q", QuantConfig(), hold=for_this_cpu())     # what disk reads as stored

    def load(prefetch):
        return Engine.load(EngineConfig(model=str(path), device="cpu", max_context=128,
                                        cache=CacheConfig(sizes=(2,), placement="disk", prefetch=prefetch)))

    params = SamplingParams(max_new_tokens=6, greedy=True)
    ref = [e.token_id for e in load(0).stream_ids(list(range(5, 20)), params) if e.token_id is not None]
    eng = load(2)
    real = disk_store.pread_into
    monkeypatch.setattr(disk_store, "pread_into", lambda fd, buf, off: (time.sleep(0.05), real(fd, buf, off))[1])
    cache = eng.model.cache
    t = time.perf_counter()
    n = cache.prefetch(1, [5, 6])
    assert n == 2 and time.perf_counter() - t < 0.04
    got = [e.token_id for e in eng.stream_ids(list(range(5, 20)), params) if e.token_id is not None]
    assert got == ref
