"""The CPU kernel path (``--kernel cpu``): torch's own fused low-bit CPU kernels, and oneDNN for dense weights.

- int4 weights (cpu_weights.Int4Weight): ``aten._weight_int4pack_mm_for_cpu``, which reads the packed codes and
  never materialises the matrix (a 2048x768 decode GEMV: ~0.05 ms, against ~0.36 ms for fp32 ``F.linear``);
- int8 weights: ``aten._weight_int8pack_mm``;
- dense weights: oneDNN's linear (``mkldnn._linear_pointwise``), which reads a decode GEMV's matrix with
  every thread where ``F.linear``'s M=1 GEMV uses one (docs/BENCHMARKS.md).

The x86 int4/int8 kernels take bfloat16 activations only, so x is converted at the seam and the result
converted back (one [T, in] and one [T, out] conversion per call; measured in bench/cpu_kernels.py).

Whether this path can run is decided once, at load, by ``probe()``: the kernel must exist, pack codes in one
of the layouts cpu_weights knows, agree with the plain dequantize + matmul, and run vectorized (without AVX2 the
x86 kernels fall back to scalar code that is slower than the reference). Otherwise the engine says why and
uses the reference path; nothing is decided mid-answer.
"""
from __future__ import annotations

import functools
import platform
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from ..cpu_weights import BF16, LAYOUTS, CpuWeight, Int4Weight, dequantize_cpu, pack_int4

SCALAR_CAPABILITIES = ("DEFAULT", "NO AVX")     # x86 dispatch levels without a vector int4 kernel


@dataclass(frozen=True)
class Probe:
    ok: bool
    layout: str          # the int4 layout this machine's torch packs (a cpu_weights.LAYOUTS key), "" if none
    capability: str      # torch's CPU dispatch level (AVX512, AVX2, ...)
    reason: str          # why not, when not ok
    onednn: bool         # dense weights through oneDNN's linear
    rows_alone: bool = False   # the int4/int8 kernels give each row of x the bits it gets as a one-row call

    def describe(self) -> str:
        if not self.ok:
            return f"the CPU kernels cannot run here: {self.reason}"
        dense = "oneDNN" if self.onednn else "F.linear"
        return (f"torch's int4/int8 CPU kernels ({self.capability}, int4 layout {self.layout}, bfloat16 "
                f"activations), dense weights through {dense}")


def _find_layout() -> Optional[str]:
    """Pack random codes with torch's own converter and name the layout it used (None: none we know)."""
    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (80, 64), generator=gen, dtype=torch.int32)   # a full 64-row block and a partial one
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
    for name in LAYOUTS:
        if packed.shape == (80, 32) and torch.equal(pack_int4(codes, name), packed):
            return name
    return None


def _onednn_ok() -> bool:
    """oneDNN's linear exists and agrees with F.linear (fp32: to summation order)."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        gen = torch.Generator().manual_seed(1)
        x, w = torch.randn(3, 96, generator=gen), torch.randn(48, 96, generator=gen)
        y = torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")
        return bool(torch.allclose(y, F.linear(x, w), rtol=1e-4, atol=1e-4))
    except (RuntimeError, AttributeError):
        return False


@functools.cache
def probe() -> Probe:
    """Can the CPU kernels run on this machine, and how (computed once per process)."""
    cap = torch.backends.cpu.get_cpu_capability()
    onednn = _onednn_ok()
    x86 = platform.machine().lower() in ("x86_64", "amd64", "i686", "i386")
    if x86 and cap in SCALAR_CAPABILITIES:
        return Probe(False, "", cap, f"torch dispatches this CPU at {cap} (no AVX2): its int4 kernel is scalar "
                                     f"there, slower than dequantize + matmul", onednn)
    try:
        layout = _find_layout()
        if layout is None:
            return Probe(False, "", cap, "torch packs int4 codes in a layout mixoff does not know", onednn)
        gen = torch.Generator().manual_seed(2)
        from ..cpu_weights import quantize_int4
        w = quantize_int4(torch.randn(80, 128, generator=gen), 64, layout, optimize=False)
        x = torch.randn(2, 128, generator=gen).to(BF16)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, w.W_int4, 64, w.scale_zero).float()
        ref = F.linear(x.float(), dequantize_cpu(w))
        if not torch.allclose(y, ref, rtol=2e-2, atol=2e-2 * ref.abs().max().item()):
            return Probe(False, layout, cap, "torch's int4 kernel disagrees with dequantize + matmul here", onednn)
        rows_alone = _rows_alone(layout, gen)
    except (RuntimeError, AttributeError, NotImplementedError) as e:
        return Probe(False, "", cap, f"torch's int4 CPU kernel does not run here ({str(e).splitlines()[0]})", onednn)
    return Probe(True, layout, cap, "", onednn, rows_alone)


def _rows_alone(layout: str, gen: torch.Generator) -> bool:
    """Whether the int4 and int8 kernels compute each row of a many-row call bit for bit as a one-row call
    (measured on x86 AVX2 and AVX512: they accumulate each row along the input in the same order whatever M
    is). When they do, a batched decode step multiplies all its rows at once; when not, row by row."""
    from ..cpu_weights import quantize_int4, quantize_int8
    W = torch.randn(192, 256, generator=gen)
    for w in (quantize_int4(W, 64, layout, optimize=False), quantize_int8(W)):
        for m in (2, 3, 4, 5, 8, 16, 33):
            x = torch.randn(m, 256, generator=gen).to(BF16)
            alone = torch.cat([qlinear(x[i:i + 1], w) for i in range(m)])
            if not torch.equal(qlinear(x, w), alone):
                return False
    return True


def _onednn() -> bool:
    return probe().onednn


_INT4_MM = torch.ops.aten._weight_int4pack_mm_for_cpu.default      # the overloads themselves: no packet lookup per call
_INT8_MM = torch.ops.aten._weight_int8pack_mm.default


def qlinear(x: torch.Tensor, w: torch.Tensor | CpuWeight) -> torch.Tensor:
    """x [..., in] @ W.T -> [..., out] in x's dtype, for a dense weight or a CPU-format weight. Written for the
    decode step's few microseconds: no conversion, reshape or copy that the input does not need."""
    if isinstance(w, torch.Tensor):
        if x.dtype == torch.float32 and w.dtype == torch.float32 and x.numel() and _onednn():
            return torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")
        return F.linear(x, w)
    if x.dim() != 2:
        return qlinear(x.reshape(-1, x.shape[-1]), w).view(*x.shape[:-1], w.shape[0])
    dtype = x.dtype
    xb = (x if dtype == BF16 else x.to(BF16)).contiguous()
    if type(w) is Int4Weight:
        y = _INT4_MM(xb, w.W_int4, w.group_size, w.scale_zero)
    else:
        y = _INT8_MM(xb, w.W_int8, w.scale_int8)
    return y if dtype == BF16 else y.to(dtype)


def swiglu(x: torch.Tensor, w1: CpuWeight, w3: CpuWeight) -> torch.Tensor:
    """silu(x W1.T) * (x W3.T) in bfloat16: x converted once for both matmuls, the kernels' bfloat16 results
    combined as they come, and the product left in bfloat16, the dtype the down projection's kernel reads (no
    rounding more than the kernels' own, and four conversions fewer per expert)."""
    xb = x.to(BF16)
    return F.silu(qlinear(xb, w1)).mul_(qlinear(xb, w3))


# The same kernels as builtins: an OpOverload's __call__ is a Python frame, which a fine-grained model pays
# three times an expert, hundreds of experts a token.
_INT4_FN, _INT8_FN, _SILU = torch._weight_int4pack_mm_for_cpu, torch._weight_int8pack_mm, torch._C._nn.silu


def _mm(xb: torch.Tensor, w: CpuWeight) -> torch.Tensor:
    if type(w) is Int4Weight:
        return _INT4_FN(xb, w.W_int4, w.group_size, w.scale_zero)
    return _INT8_FN(xb, w.W_int8, w.scale_int8)


def expert(xb: torch.Tensor, w1: CpuWeight, w3: CpuWeight, w2: CpuWeight) -> torch.Tensor:
    """A routed expert on contiguous bfloat16 rows xb [R, H] -> [R, H] bfloat16: the kernel calls ``swiglu``
    then ``qlinear`` make, bit for bit, without the seam's checks and conversions (the caller converts h once
    per layer). A fine-grained model calls this hundreds of times a token, so every Python frame counts."""
    if type(w1) is Int4Weight and type(w3) is Int4Weight and type(w2) is Int4Weight:
        g = _INT4_FN(xb, w1.W_int4, w1.group_size, w1.scale_zero)
        return _INT4_FN(_SILU(g).mul_(_INT4_FN(xb, w3.W_int4, w3.group_size, w3.scale_zero)), w2.W_int4,
                        w2.group_size, w2.scale_zero)
    return _mm(_SILU(_mm(xb, w1)).mul_(_mm(xb, w3)), w2)


def dense_expert(x: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """A routed expert with dense weights on ONE row x [1, H]: the calls ``swiglu`` then ``qlinear`` make with
    ``kernel="cpu"`` (oneDNN for float32), bit for bit, decided once instead of three times."""
    if x.dtype == torch.float32 and w1.dtype == torch.float32 and _onednn():
        lin = torch.ops.mkldnn._linear_pointwise.default
        return lin(F.silu(lin(x, w1, None, "none", [], "")) * lin(x, w3, None, "none", [], ""), w2, None, "none",
                   [], "")
    return F.linear(F.silu(F.linear(x, w1)) * F.linear(x, w3), w2)


def reference(x: torch.Tensor, w: CpuWeight) -> torch.Tensor:
    """The plain path for a CPU-format weight: dequantize, then matmul in x's dtype."""
    return F.linear(x, dequantize_cpu(w, x.dtype))
