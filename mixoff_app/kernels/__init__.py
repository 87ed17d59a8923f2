"""Quantized matmul behind one seam: ``qlinear(x, w, kernel)``, and ``swiglu(x, w1, w3, kernel)`` for an
expert's gate and up projections (one fused launch for a decoded token).

``kernel`` is what ``resolve_kernel`` made of ``--kernel auto|triton|torch`` for the model's device:
``"torch"`` dequantizes the whole weight and multiplies (the reference, and the CPU default);
``"triton"`` reads the packed codes inside fused Triton kernels (``qmatmul``). On a CPU the Triton kernels
run in Triton's interpreter, which is slow and there for tests.

Triton decides between compiling and interpreting when a kernel is decorated, from ``TRITON_INTERPRET``.
So the kernels' source is loaded as two modules: ``qmatmul`` as the environment says, and, for CPU tensors,
a second copy decorated under ``TRITON_INTERPRET=1``. A process can then run both (the GPU tests next to the
CPU ones), and nobody has to set the variable before triton is first imported (hqq imports it). The kernels
call only triton.language builtins, so they run in the interpreter even though triton's own @jit library
was decorated in compiled mode.
"""
from __future__ import annotations

import functools
import importlib.util
import os
import sys
from types import ModuleType
from typing import Iterable

import torch
import torch.nn.functional as F

from ..config import KERNELS, ConfigError
from ..quant import QWeight, dequantize
from .geometry import geometry

MIN_CAPABILITY = (7, 0)      # Triton's NVIDIA backend starts at Volta


def _load(interpret: bool) -> ModuleType:
    """The kernels module, interpreted or compiled; ImportError when triton is missing."""
    if not interpret or os.environ.get("TRITON_INTERPRET") == "1":
        from . import qmatmul  # as the environment says (TRITON_INTERPRET=1: interpreted everywhere)
        return qmatmul
    name = f"{__name__}.qmatmul_interpreted"
    if name in sys.modules:
        return sys.modules[name]
    import triton.language  # noqa: F401  triton's own library stays compiled-mode: only our kernels switch
    spec = importlib.util.spec_from_file_location(name, os.path.join(os.path.dirname(__file__), "qmatmul.py"))
    mod = importlib.util.module_from_spec(spec)
    os.environ["TRITON_INTERPRET"] = "1"
    sys.modules[name] = mod          # dataclasses look their module up while it executes
    try:
        spec.loader.exec_module(mod)
    except BaseException:
        del sys.modules[name]
        raise
    finally:
        del os.environ["TRITON_INTERPRET"]
    return mod


@functools.cache
def backend(device_type: str) -> ModuleType:
    """The Triton kernels for tensors on ``device_type``; ConfigError with the reason when there are none."""
    try:
        return _load(interpret=device_type != "cuda")
    except ImportError as e:
        raise ConfigError(f"--kernel triton needs the triton package, which is not importable here ({e}): "
                          f"install it with `pip install triton` (the CUDA build of torch ships it), "
                          f"or use --kernel torch") from None


def resolve_kernel(kernel: str, device: torch.device | str) -> str:
    """``auto`` | ``triton`` | ``torch`` on ``device`` -> ``"triton"`` or ``"torch"``.

    auto: triton on a CUDA GPU that Triton supports and where triton imports, torch elsewhere. An explicit
    ``triton`` that cannot work is a ConfigError with one sentence saying why."""
    if kernel not in KERNELS:
        raise ConfigError(f"unknown kernel {kernel!r}: choose one of {', '.join(KERNELS)}")
    dev = torch.device(device)
    if kernel == "torch" or (kernel == "auto" and dev.type != "cuda"):
        return "torch"
    if dev.type == "cuda" and torch.cuda.get_device_capability(dev) < MIN_CAPABILITY:
        if kernel == "auto":
            return "torch"
        cap = ".".join(map(str, torch.cuda.get_device_capability(dev)))
        raise ConfigError(f"--kernel triton needs a GPU of compute capability 7.0 or newer, and this one is {cap}: "
                          f"use --kernel torch")
    try:
        backend(dev.type)
    except ConfigError:
        if kernel == "auto":
            return "torch"
        raise
    return "triton"


_geometry = functools.cache(geometry)


def fused(w) -> bool:
    """Whether ``qlinear(..., "triton")`` runs ``w`` in a fused kernel (else: dequantize + matmul)."""
    return isinstance(w, QWeight) and _geometry(tuple(w.shape), w.bits, w.group_size) is not None


def _format(w: QWeight) -> tuple:
    """What two weights must share to go through one launch (the kernel takes one set of format arguments)."""
    return (tuple(w.shape), w.bits, w.group_size, w.W_q.dtype, w.W_q.device,
            None if w.scale_s is None else w.scale_s.numel(), w.scale is None, w.zero is None)


def warm_up(weights: Iterable[QWeight], dtype: torch.dtype, tokens: Iterable[int] = (1, 16, 32, 64),
            swiglu_pairs: Iterable[tuple[QWeight, QWeight]] = ()) -> int:
    """Run the fused kernels once per distinct weight format and token tile (and the fused gate/up launch
    once per expert format), so Triton compiles them and the tuner times its candidates now (at load, and
    before any CUDA graph is captured) rather than inside the first answer. Returns how many calls it made."""
    seen, calls = set(), 0
    for w in weights:
        key = _format(w)
        if key in seen or not fused(w):
            continue
        seen.add(key)
        for T in tokens:
            qlinear(torch.zeros((T, w.shape[1]), dtype=dtype, device=w.W_q.device), w, "triton")
            calls += 1
    for w1, w3 in swiglu_pairs:
        key = ("swiglu", _format(w1))
        if key not in seen:
            seen.add(key)
            swiglu(torch.zeros((1, w1.shape[1]), dtype=dtype, device=w1.W_q.device), w1, w3, "triton")
            calls += 1
    return calls


def swiglu(x: torch.Tensor, w1: torch.Tensor | QWeight, w3: torch.Tensor | QWeight,
           kernel: str = "torch") -> torch.Tensor:
    """silu(x @ W1.T) * (x @ W3.T), an expert's gate and up projections. With ``kernel="triton"``, one token
    and two fused weights of one format, it is one launch that reads x once and writes only the product (on
    a GPU three launches fewer per expert); otherwise the two matmuls, silu and the product."""
    if (kernel == "triton" and x.shape[0] == 1 and x.dim() == 2 and fused(w1) and isinstance(w3, QWeight)
            and _format(w1) == _format(w3)):
        g = _geometry(tuple(w1.shape), w1.bits, w1.group_size)
        y = backend(x.device.type).qgemv_swiglu(x[0].contiguous(), w1, w3, g)
        if y is not None:
            return y[None]
    return F.silu(qlinear(x, w1, kernel)) * qlinear(x, w3, kernel)


def qlinear(x: torch.Tensor, w: torch.Tensor | QWeight, kernel: str = "torch") -> torch.Tensor:
    """x [..., in] @ W.T -> [..., out] in x's dtype, for a dense weight or a QWeight.

    With ``kernel="triton"`` a QWeight is read by the fused kernels; the one shape they do not take (a
    group that straddles output rows: out not a multiple of the group size, which only toy models have)
    falls back to dequantize + matmul."""
    if not isinstance(w, QWeight):
        return F.linear(x, w)
    if kernel == "triton":
        g = _geometry(tuple(w.shape), w.bits, w.group_size)
        if g is not None and x.numel():
            lead = x.shape[:-1]
            y = backend(x.device.type).qmatmul(x.reshape(-1, x.shape[-1]).contiguous(), w, g)
            return y.view(*lead, g.out)
    return F.linear(x, dequantize(w, x.dtype))


# ---- decode rows of several sequences: each row's result is the one it would get alone ---------------
#
# A matmul over B rows is not, in general, B matmuls of one row: BLAS picks another kernel for M > 1 (fp32
# GEMM against GEMV here) and its sums round differently, which is enough to flip a near-tied greedy token. A
# batched answer must be token for token the answer alone, so rows go one by one unless the kernel is known to
# compute each row the same whatever the others are. The weight is still fetched (and dequantized) once.

def _row_invariant(kernel: str, w) -> bool:
    """Whether ``qlinear(x, w, kernel)`` gives each row of x the bits it gets as a one-row call."""
    return False


def qlinear_rows(x: torch.Tensor, w: torch.Tensor | QWeight, kernel: str = "torch") -> torch.Tensor:
    """``qlinear`` over the rows of x [B, in], each row bit for bit ``qlinear(x[b:b+1], w, kernel)``."""
    if x.shape[0] == 1 or _row_invariant(kernel, w):
        return qlinear(x, w, kernel)
    if isinstance(w, QWeight) and kernel == "torch":
        w = dequantize(w, x.dtype)          # once for all rows: the same tensor each one-row call would make
    return torch.cat([qlinear(x[b:b + 1], w, kernel) for b in range(x.shape[0])])


def swiglu_rows(x: torch.Tensor, w1: torch.Tensor | QWeight, w3: torch.Tensor | QWeight,
                kernel: str = "torch") -> torch.Tensor:
    """``swiglu`` over the rows of x [B, in], each row bit for bit the one-row call."""
    if x.shape[0] == 1 or (_row_invariant(kernel, w1) and _row_invariant(kernel, w3)):
        return swiglu(x, w1, w3, kernel)
    if kernel == "torch":
        w1 = dequantize(w1, x.dtype) if isinstance(w1, QWeight) else w1
        w3 = dequantize(w3, x.dtype) if isinstance(w3, QWeight) else w3
    return torch.cat([swiglu(x[b:b + 1], w1, w3, kernel) for b in range(x.shape[0])])
