"""Memory readings: what the panel and the planner read about this machine, checked against psutil and
against memory the test itself allocates."""
from __future__ import annotations

import gc

import psutil
import pytest
import torch

from mixoff_app.memory import (gpu_free_total, nvml_available, peak_rss_bytes, ram_available_total, read_memory,
                               reset_peak_rss, rss_bytes)

MiB = 1 << 20


def test_cpu_reading_names_no_gpu_and_passes_the_expert_bytes_through():
    m = read_memory(torch.device("cpu"), pinned_bytes=3 * MiB, host_expert_bytes=7 * MiB)
    assert m.gpu_name is None and m.vram_total == 0 and m.torch_allocated == 0
    assert (m.pinned_bytes, m.host_expert_bytes) == (3 * MiB, 7 * MiB)
    vm = psutil.virtual_memory()
    assert m.system_ram_total == vm.total
    assert 0 < m.system_ram_used <= m.system_ram_total
    assert 0 < m.process_rss < m.system_ram_total


def test_process_rss_sees_memory_this_process_touches():
    gc.collect()
    before = read_memory(torch.device("cpu")).process_rss
    block = torch.ones(64 * MiB // 4, dtype=torch.float32)      # 64 MiB, every page written
    grown = read_memory(torch.device("cpu")).process_rss - before
    assert grown >= 48 * MiB, grown / MiB
    del block


def test_free_ram_is_within_the_total():
    avail, total = ram_available_total()
    assert 0 < avail <= total == psutil.virtual_memory().total


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU answer")
def test_no_gpu_means_no_gpu_figures():
    assert gpu_free_total() is None


@pytest.mark.gpu
def test_gpu_reading_matches_torch():
    free, total = gpu_free_total(0)
    assert 0 < free <= total
    x = torch.empty(256 * MiB, dtype=torch.uint8, device="cuda")
    m = read_memory(torch.device("cuda:0"))
    assert m.gpu_name == torch.cuda.get_device_name(0) and m.vram_total == total
    assert m.torch_allocated >= 256 * MiB and m.torch_reserved >= m.torch_allocated
    assert m.torch_peak_allocated >= m.torch_allocated and 0 < m.vram_used <= m.vram_total
    del x


def test_rss_and_its_peak_follow_an_allocation():
    gc.collect()
    if not reset_peak_rss():
        pytest.skip("no /proc/self/clear_refs: the peak cannot be restarted here")
    base, peak0 = rss_bytes(), peak_rss_bytes()
    assert peak0 >= base > 0
    block = torch.ones(64 * MiB // 4, dtype=torch.float32)
    assert rss_bytes() - base >= 48 * MiB
    del block
    gc.collect()
    assert peak_rss_bytes() - base >= 48 * MiB          # the peak remembers what was freed


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU answer")
def test_no_driver_means_no_nvml():
    assert nvml_available() is False
