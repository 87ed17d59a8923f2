"""Missed experts computed where it is cheaper: copied into the device cache, or run on the CPU from the store's
host copy (``--cpu-experts auto|off|all``).

A decode miss costs, copied: its bytes over the host->device link, behind what the link already carries; run on
the CPU: one expert's kernel time per row routed to it (rows run one by one, each bit for bit as alone), behind
what the CPU already has to do. ``decide`` compares the two from figures ``measure`` takes at load (one expert
at this shape and thread count, one expert's copy); ``CpuExperts.choose`` walks a layer's misses, adding each
choice to the link's backlog or the CPU's queue, so a layer's misses split between the two.

Where the CPU side runs: on a CPU-only machine the "device" is RAM and the host copy is in the CPU kernel's own
format, so a CPU-run expert is the same kernel on the same bytes as a slot copy of it: logits do not depend on
where it ran (the tests hold that). On a GPU machine the host copy is in the GPU's (hqq) format, which torch's
int4 CPU kernel does not read; the CPU side there is the reference path (dequantize, float32 matmul) - slow,
but correct and measured at load as it will run.

What auto chooses: ``off`` until a GPU has measured the trade (``AUTO_ON_CUDA``, the one switch; no GPU has run
bench/cpu_experts.py yet), and ``off`` on a CPU-only machine, where no link is saved and the cache's slot
copies are what the panel shows. ``all`` runs every decode miss on the CPU (and measures first, so the log
says what the cost model would have chosen). Prefill stays with the cache: a chunk's experts serve many rows,
where one copy pays for itself. Disk placement keeps no host copy in RAM, so it has nothing to run from.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Optional

import torch

from .steps import RowByRow

AUTO_ON_CUDA = False     # flip once bench/cpu_experts.py has measured auto against off on a GPU
REPS = 5


@dataclass(frozen=True)
class Costs:
    """What ``measure`` found at load: one expert's bytes, the host->device copy bandwidth, and one expert on one
    row on the CPU (at this shape and thread count, in the kernel the CPU side uses)."""
    expert_bytes: int
    copy_bytes_per_s: float
    cpu_s_per_row: float
    threads: int
    cpu_kernel: str

    def describe(self) -> str:
        return (f"one expert {self.expert_bytes / 2**20:.2f} MiB: copy {self.copy_s * 1e3:.3f} ms "
                f"({self.copy_bytes_per_s / 1e9:.1f} GB/s), CPU {self.cpu_s_per_row * 1e3:.3f} ms a row "
                f"({self.cpu_kernel} kernel, {self.threads} threads)")

    @property
    def copy_s(self) -> float:
        return self.expert_bytes / self.copy_bytes_per_s


def decide(expert_bytes: int, copy_bytes_per_s: float, cpu_s_per_row: float, rows: int = 1,
           copy_backlog_bytes: int = 0, cpu_busy_s: float = 0.0) -> bool:
    """True: run the missed expert on the CPU; False: copy it. The copy lands after the link's backlog and its
    own bytes; the CPU result after the CPU's queue and one kernel run per row."""
    copy_s = (copy_backlog_bytes + expert_bytes) / copy_bytes_per_s
    cpu_s = cpu_busy_s + rows * cpu_s_per_row
    return cpu_s < copy_s


def _median_s(fn, reps: int = REPS) -> float:
    fn()                                              # warm: first calls allocate and pick kernels
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def measure(store, device: torch.device, kernel: str, dtype: torch.dtype, reps: int = REPS) -> Costs:
    """Time one expert's copy host->device and one expert on one row on the CPU, from expert 0 of layer 0's
    bytes (a host copy of them where the store keeps that expert on the device)."""
    device = torch.device(device)
    src = store.buffer(0, 0)
    if src.device.type != "cpu":
        src = src.cpu()
    dst = torch.empty_like(src, device=device)
    cuda = device.type == "cuda"

    def copy():
        dst.copy_(src, non_blocking=cuda)
        if cuda:
            torch.cuda.synchronize(device)

    copy_s = _median_s(copy, reps)
    side = CpuSide(store, device, kernel, dtype)
    x = torch.randn(1, store.cfg.hidden_size, dtype=side.cpu_dtype)
    ew = store.layout.weights(src)
    cpu_s = _median_s(lambda: side.forward(x, ew), reps)
    return Costs(store.layout.nbytes, src.numel() / max(copy_s, 1e-9), cpu_s, torch.get_num_threads(), side.kernel)


class CpuSide:
    """How an expert runs on the CPU from a host copy: the model's kernel where the model is on the CPU (the
    host copy is in its format), else the reference path in float32."""

    def __init__(self, store, device: torch.device, kernel: str, dtype: torch.dtype) -> None:
        self.store, self.device, self.dtype = store, torch.device(device), dtype
        self.cross = self.device.type != "cpu"
        self.kernel = "torch" if self.cross else kernel
        self.cpu_dtype = torch.float32 if self.cross else dtype

    def forward(self, x: torch.Tensor, ew) -> torch.Tensor:
        """x [R, H] on the CPU -> [R, H]: each row as it would be alone (as ``MoEModel._run_expert``)."""
        return RowByRow.linear(RowByRow.swiglu(x, ew.w1, ew.w3, self.kernel), ew.w2, self.kernel)

    def run(self, moe: int, expert: int, h: torch.Tensor) -> torch.Tensor:
        """The expert on the rows h [R, H] (on the model's device) -> [R, H] there, from the store's host copy."""
        ew = self.store.weights(moe, expert)
        if not self.cross:
            return self.forward(h, ew)
        y = self.forward(h.to("cpu", self.cpu_dtype), ew)
        return y.to(self.device, self.dtype, non_blocking=True)


class CpuExperts:
    """The decision per missed decode expert and the CPU run. ``mode``: ``all`` (every miss on the CPU) or
    ``cost`` (``decide`` with ``costs``); ``off`` is no object at all (the model then asks nothing)."""

    def __init__(self, mode: str, side: CpuSide, stats, costs: Optional[Costs] = None) -> None:
        if mode not in ("all", "cost") or (mode == "cost" and costs is None):
            raise ValueError(f"CpuExperts runs 'all' or 'cost' (with measured costs), not {mode!r}")
        self.mode, self.side, self.stats, self.costs = mode, side, stats, costs

    def choose(self, moe: int, users: dict[int, list], cache) -> list[int]:
        """Of a layer's experts (expert -> the (row, rank) routed to it), the missed ones to run on the CPU."""
        missed = [e for e in users if not cache.holds(moe, e)]
        if self.mode == "all" or not missed:
            return missed
        c, backlog, busy, out = self.costs, 0, 0.0, []
        for e in missed:
            rows = len({b for b, _ in users[e]})
            if decide(c.expert_bytes, c.copy_bytes_per_s, c.cpu_s_per_row, rows, backlog, busy):
                out.append(e)
                busy += rows * c.cpu_s_per_row
            else:
                backlog += c.expert_bytes
        return out

    def run(self, moe: int, expert: int, h: torch.Tensor) -> torch.Tensor:
        self.stats.on_cpu_expert(moe, expert)
        return self.side.run(moe, expert, h)


def resolve_mode(asked: str, device: torch.device, placement: str) -> tuple[str, str]:
    """``--cpu-experts`` -> (``off`` | ``all`` | ``cost``, why). ValueError for ``all`` under disk placement."""
    if asked == "off":
        return "off", "as asked"
    if placement == "disk":
        if asked == "all":
            raise ValueError("--cpu-experts all runs missed experts from their host copies in RAM, and --placement "
                             "disk keeps none there: use --placement inclusive or exclusive, or --cpu-experts off")
        return "off", "disk placement keeps no host copy in RAM"
    if asked == "all":
        return "all", "as asked"
    if torch.device(device).type != "cuda":
        return "off", "on a CPU-only machine the cache is in RAM: there is no link to save"
    if not AUTO_ON_CUDA:
        return "off", "not measured on a GPU yet (bench/cpu_experts.py)"
    return "cost", "the cost model decides each miss"
