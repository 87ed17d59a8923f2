"""Memory readings for the panel and the planner: VRAM (pynvml, torch), process and system RAM (psutil), and
what the runtime's tensors hold on the device.

Read on demand (when a snapshot is asked for), never from the decode loop.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Optional

import torch

from .stats import MemoryReading

_nvml_state: dict = {}


def _nvml_handle(index: int):
    """A pynvml handle, or None where no NVIDIA driver exists (nvmlInit raises there)."""
    if "ok" not in _nvml_state:
        try:
            import pynvml
            pynvml.nvmlInit()
            _nvml_state["ok"] = pynvml
        except Exception:
            _nvml_state["ok"] = None
    nv = _nvml_state["ok"]
    if nv is None:
        return None, None
    try:
        return nv, nv.nvmlDeviceGetHandleByIndex(index)
    except Exception:
        return None, None


def nvml_available(index: int = 0) -> bool:
    """Whether pynvml can read GPU ``index`` (an NVIDIA driver is there, even if torch sees no CUDA)."""
    return _nvml_handle(index)[1] is not None


def gpu_free_total(index: int = 0) -> Optional[tuple[int, int]]:
    """(free, total) bytes of a GPU, or None without one."""
    nv, h = _nvml_handle(index)
    if h is not None:
        m = nv.nvmlDeviceGetMemoryInfo(h)
        return int(m.free), int(m.total)
    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info(index)
        return int(free), int(total)
    return None


def ram_available_total() -> tuple[int, int]:
    import psutil
    vm = psutil.virtual_memory()
    return int(vm.available), int(vm.total)


def read_memory(device: torch.device, pinned_bytes: int = 0, host_expert_bytes: int = 0) -> MemoryReading:
    import psutil
    vm = psutil.virtual_memory()
    rss = psutil.Process(os.getpid()).memory_info().rss
    common = dict(process_rss=int(rss), system_ram_used=int(vm.total - vm.available),
                  system_ram_total=int(vm.total), pinned_bytes=pinned_bytes, host_expert_bytes=host_expert_bytes)
    if device.type != "cuda":
        return MemoryReading(gpu_name=None, **common)
    idx = device.index or 0
    name = torch.cuda.get_device_name(idx)
    used = total = 0
    nv, h = _nvml_handle(idx)
    if h is not None:
        m = nv.nvmlDeviceGetMemoryInfo(h)
        used, total = int(m.used), int(m.total)
    else:
        free, total = torch.cuda.mem_get_info(idx)
        used = int(total - free)
    return MemoryReading(gpu_name=name, vram_used=used, vram_total=int(total),
                         torch_allocated=int(torch.cuda.memory_allocated(idx)),
                         torch_reserved=int(torch.cuda.memory_reserved(idx)),
                         torch_peak_allocated=int(torch.cuda.max_memory_allocated(idx)), **common)


def rss_bytes() -> int:
    import psutil
    return int(psutil.Process(os.getpid()).memory_info().rss)


def reset_peak_rss() -> bool:
    """Restart the peak-RSS count from now (Linux: VmHWM via /proc/self/clear_refs); False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """The process's peak RSS since the last ``reset_peak_rss`` (Linux VmHWM), else since start (ru_maxrss)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource
    import sys
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def device_tensor_bytes(model) -> int:
    """Bytes of the tensors the engine keeps on the device: trunk, expert slots (and swap staging), KV cache
    and RoPE tables, each storage counted once (tied embeddings share one)."""
    seen: dict[int, int] = {}

    def add(t) -> None:
        if isinstance(t, torch.Tensor):
            st = t.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()
        elif hasattr(t, "tensors"):
            for v in t.tensors().values():
                add(v)
        elif isinstance(t, tuple):          # a resident MLP (dense layer, shared expert): ExpertWeights
            for v in t:
                add(v)

    tr = model.trunk
    for t in (tr.embed, tr.norm, tr.lm_head):
        add(t)
    for lw in tr.layers:                    # every field: attention, norms, router, biases, resident MLPs
        for f in dataclasses.fields(lw):
            add(getattr(lw, f.name))
    for t in model.cache.device_buffers():
        add(t)
    for t in (model.kv.data, model.cos, model.sin):
        add(t)
    return sum(seen.values())
