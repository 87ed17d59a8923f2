"""Counting what a decode step costs beyond its arithmetic: host round trips and dispatched aten ops.

``count_syncs`` patches the ``Tensor`` methods that bring a value to the host (each one drains the GPU's
queue when the tensor lives there); ``count_ops`` counts non-view aten ops through a dispatch mode, which
sees the same ops on any device (each one a kernel launch, or more, on a GPU), and each launch of our
Triton kernels as one op (``triton.<kernel>``), whatever runs it: on the CPU Triton's interpreter works
through numpy and torch calls that a GPU launch does not make, so those are not counted. Both work on the
CPU, so the tests hold the decode path to its budget without a GPU, and the benchmarks report the same counts.
"""
from __future__ import annotations

import contextlib
import sys
import weakref
from collections import Counter
from typing import Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

# Where the Triton kernels live (compiled, and the interpreted copy for CPU tensors: see kernels/__init__.py),
# and their names.
KERNEL_MODULES = ("mixoff_app.kernels.qmatmul", "mixoff_app.kernels.qmatmul_interpreted")
KERNELS = ("qgemv_kernel", "qgemv_swiglu_kernel", "qgemm_kernel")

# Every Tensor method that returns a host value (or host memory) and so synchronizes with the device.
SYNCING = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__", "__complex__")


class SyncCount:
    """How many host round trips happened, by method name."""

    def __init__(self) -> None:
        self.by_method: Counter = Counter()

    @property
    def total(self) -> int:
        return sum(self.by_method.values())


@contextlib.contextmanager
def count_syncs(methods: tuple[str, ...] = SYNCING) -> Iterator[SyncCount]:
    """Count calls of the synchronizing ``Tensor`` methods while the block runs (nested calls, e.g.
    ``__int__`` calling ``item``, count once: the outermost)."""
    out = SyncCount()
    saved = {m: getattr(torch.Tensor, m) for m in methods}
    depth = [0]

    def wrap(name, fn):
        def counted(self, *a, **kw):
            if depth[0] == 0:
                out.by_method[name] += 1
            depth[0] += 1
            try:
                return fn(self, *a, **kw)
            finally:
                depth[0] -= 1
        return counted

    try:
        for m, fn in saved.items():
            setattr(torch.Tensor, m, wrap(m, fn))
        yield out
    finally:
        for m, fn in saved.items():
            setattr(torch.Tensor, m, fn)


class _OpCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view:
            self.ops[str(func.overloadpacket.__name__)] += 1
        return func(*args, **(kwargs or {}))


class OpCount:
    def __init__(self, counter: _OpCounter) -> None:
        self._c = counter

    @property
    def by_op(self) -> Counter:
        return self._c.ops

    @property
    def total(self) -> int:
        return sum(self._c.ops.values())


class _CountedKernel:
    """Stands in for a Triton kernel: ``kernel[grid](...)`` counts one launch and runs the kernel with the
    dispatch mode off (what it does inside is one launch on a GPU)."""

    def __init__(self, kernel, name: str, ops: Counter) -> None:
        self._kernel, self._name, self._ops = kernel, name, ops

    def __getitem__(self, grid):
        launch = self._kernel[grid]

        def counted(*args, **kwargs):
            self._ops[f"triton.{self._name}"] += 1
            with _disable_current_modes():
                return launch(*args, **kwargs)
        return counted

    def __getattr__(self, name):
        return getattr(self._kernel, name)


@contextlib.contextmanager
def count_ops() -> Iterator[OpCount]:
    """Count dispatched non-view aten ops, and launches of our Triton kernels, while the block runs (kernel
    modules loaded after the block started are not counted: load the engine first)."""
    mode = _OpCounter()
    patched = []
    for modname in KERNEL_MODULES:
        mod = sys.modules.get(modname)
        for name in KERNELS if mod is not None else ():
            patched.append((mod, name, getattr(mod, name)))
            setattr(mod, name, _CountedKernel(getattr(mod, name), name, mode.ops))
    try:
        with mode:
            yield OpCount(mode)
    finally:
        for mod, name, kernel in patched:
            setattr(mod, name, kernel)


class _LiveBytes(TorchDispatchMode):
    """Bytes of the storages that ops made inside the block and that are still alive; and their peak."""

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0
        self._seen: set[int] = set()

    def _freed(self, key: int, n: int) -> None:
        self._seen.discard(key)
        self.live -= n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.is_view:
            return out
        inputs = {a.untyped_storage().data_ptr() for a in (*args, *(kwargs or {}).values())
                  if isinstance(a, torch.Tensor)}
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor):
                s = t.untyped_storage()
                key = s.data_ptr()
                if key and key not in self._seen and key not in inputs:
                    self._seen.add(key)
                    n = s.nbytes()
                    self.live += n
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(s, self._freed, key, n)
        return out


@contextlib.contextmanager
def track_live_bytes() -> Iterator[_LiveBytes]:
    """Peak bytes of tensors allocated inside the block (device-agnostic: what the CPU tests check the
    planner's activation allowance against)."""
    mode = _LiveBytes()
    with mode:
        yield mode
