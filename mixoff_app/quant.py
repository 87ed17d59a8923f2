"""HQQ mixed quantization: quantize with hqq, store in the reference checkpoint's layout, dequantize ourselves.

Layout (hqq's axis-0 convention, the one the reference pre-quantized Mixtral uses): a weight of shape
(out, in) is viewed as ``(group_size, M)`` with ``M = out*in/group_size``; each of the M columns is a group
with its own scale and zero. ``W = (unpack(W_q) - zero) * scale``. Scales and zeros are themselves
quantized to 8 bits (scale channel-wise in groups of ``scale_group``, zero with one group for the whole
tensor), which is what makes 2-bit group-16 experts cost 3 bits per weight instead of 4.

A ``QWeight`` is a plain record of tensors; it may hold views into an expert's contiguous buffer, so
nothing here copies or allocates beyond the dequantized output.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from .config import QuantSpec
from .cpu_weights import CpuWeight, Int4Weight, cpu_fields, cpu_weight_from, dequantize_cpu, quantize_cpu, repack_int4
from .fields import Field

FP = torch.float16   # dtype of scales/zeros at rest (what the reference checkpoint stores)


@dataclass
class QWeight:
    """One quantized linear weight. Exactly one of (scale) or (scale_q, scale_s, scale_z) is set; same for zero."""
    shape: tuple[int, int]
    bits: int
    group_size: int
    W_q: torch.Tensor
    scale: Optional[torch.Tensor] = None
    scale_q: Optional[torch.Tensor] = None
    scale_s: Optional[torch.Tensor] = None
    scale_z: Optional[torch.Tensor] = None
    zero: Optional[torch.Tensor] = None
    zero_q: Optional[torch.Tensor] = None
    zero_s: Optional[torch.Tensor] = None
    zero_z: Optional[torch.Tensor] = None

    def tensors(self) -> dict[str, torch.Tensor]:
        names = ("W_q", "scale", "scale_q", "scale_s", "scale_z", "zero", "zero_q", "zero_s", "zero_z")
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def dequantize(self, dtype: torch.dtype = FP) -> torch.Tensor:
        return dequantize(self, dtype)


# ---- packing (hqq BitPack layout: row blocks, most significant bits first) -----------------------

def pack(W: torch.Tensor, bits: int) -> torch.Tensor:
    """[G, M] integer codes -> packed rows. 2-bit: four row-quarters; 4-bit: two row-halves; 3-bit: ten
    row-tenths in an int32 (rows padded to a multiple of 10); 8-bit: as is."""
    if bits == 8:
        return W.to(torch.uint8)
    if bits == 3:
        rows = 10 * math.ceil(W.shape[0] / 10)
        P = torch.zeros((rows, W.shape[1]), dtype=torch.int32, device=W.device)
        P[: W.shape[0]] = W.to(torch.int32)
        s = rows // 10
        out = torch.zeros((s, W.shape[1]), dtype=torch.int32, device=W.device)
        for i in range(10):
            out |= P[i * s:(i + 1) * s] << (27 - 3 * i)
        return out
    per = 8 // bits
    W = W.to(torch.uint8)
    s = W.shape[0] // per
    out = torch.zeros((s, W.shape[1]), dtype=torch.uint8, device=W.device)
    for i in range(per):
        out |= W[i * s:(i + 1) * s] << (8 - bits * (i + 1))
    return out


_SHIFTS: dict[tuple[int, torch.device], torch.Tensor] = {}


def _shifts(bits: int, device: torch.device) -> torch.Tensor:
    """Right shifts that bring each packed row block to the low bits, most significant first: [per, 1, 1]."""
    key = (bits, device)
    t = _SHIFTS.get(key)
    if t is None:
        per, top = (10, 27) if bits == 3 else (8 // bits, 8 - bits)
        dt = torch.int32 if bits == 3 else torch.uint8
        t = _SHIFTS[key] = torch.tensor([top - bits * i for i in range(per)], dtype=dt, device=device)[:, None, None]
    return t


def unpack(P: torch.Tensor, bits: int, rows: int, dtype: torch.dtype) -> torch.Tensor:
    """Packed rows -> [rows, M] codes in ``dtype`` (the first ``rows`` rows; 3-bit packs are padded).
    All row blocks in one broadcast shift: three kernels whatever the bit width."""
    if bits == 8:
        return P.to(dtype)
    codes = P >> _shifts(bits, P.device)                                         # [per, s, M] by broadcasting
    out = codes.bitwise_and_((1 << bits) - 1).to(dtype).view(-1, P.shape[1])
    return out[:rows] if out.shape[0] != rows else out


# ---- quantize / dequantize -----------------------------------------------------------------------

def _meta_group(n: int, want: Optional[int]) -> Optional[int]:
    """The scale's own group: as asked when it divides the scale count, else none (kept in fp16)."""
    if not want:
        return None
    return want if n % want == 0 else None


def quantize(W: torch.Tensor, spec: QuantSpec, device: str | torch.device = "cpu") -> QWeight | CpuWeight:
    """Quantize a 2-D weight with hqq's optimiser (axis 0) and 8-bit meta-quantize its scale and zero; a CPU
    packing goes to its own quantizer (cpu_weights.py)."""
    from hqq.core.quantize import Quantizer

    if W.dim() != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(W.shape)}")
    if spec.packing != "hqq":
        return quantize_cpu(W.to(device), spec)
    if W.numel() % spec.group_size:
        raise ValueError(f"group size {spec.group_size} does not divide a weight of shape {tuple(W.shape)}")
    dev = str(device)
    W_q, meta = Quantizer.quantize(W.to(dev), nbits=spec.bits, channel_wise=True, group_size=spec.group_size,
                                   optimize=True, round_zero=spec.bits == 4, axis=0, bitpack=True,
                                   device=dev)
    q = QWeight(shape=tuple(W.shape), bits=spec.bits, group_size=spec.group_size, W_q=W_q.contiguous())
    scale, zero = meta["scale"], meta["zero"]        # [1, M] float32
    sg = _meta_group(scale.numel(), spec.scale_group)
    if sg:
        s_q, s_meta = Quantizer.quantize(scale, nbits=8, channel_wise=True, group_size=sg, optimize=False,
                                         axis=0, bitpack=True, device=dev)
        q.scale_q, q.scale_s, q.scale_z = s_q.contiguous(), s_meta["scale"].to(FP), s_meta["zero"].to(FP)
    else:
        q.scale = scale.to(FP)
    if spec.quant_zero:
        z_q, z_meta = Quantizer.quantize(zero, nbits=8, channel_wise=False, group_size=None, optimize=False,
                                         axis=0, bitpack=True, device=dev)
        q.zero_q, q.zero_s, q.zero_z = z_q.contiguous(), z_meta["scale"].to(FP), z_meta["zero"].to(FP)
    else:
        q.zero = zero.to(FP)
    return q


def _scale(q: QWeight, dtype: torch.dtype) -> torch.Tensor:
    if q.scale is not None:
        return q.scale.to(dtype)
    s = (q.scale_q.to(dtype) - q.scale_z.to(dtype)) * q.scale_s.to(dtype)   # [sg, M/sg]
    return s.reshape(1, -1)


def _zero(q: QWeight, dtype: torch.dtype) -> torch.Tensor:
    if q.zero is not None:
        return q.zero.to(dtype)
    return ((q.zero_q.to(dtype) - q.zero_z.to(dtype)) * q.zero_s.to(dtype)).reshape(1, -1)


def dequantize(q: QWeight, dtype: torch.dtype = FP) -> torch.Tensor:
    """Bit-identical to hqq's ``Quantizer.dequantize`` chain when ``dtype`` is hqq's compute dtype."""
    W = unpack(q.W_q, q.bits, q.group_size, dtype)                               # [G, M], a fresh tensor
    # In place: one pass and no extra [G, M] temporaries; each op still rounds to dtype as hqq's does.
    return W.sub_(_zero(q, dtype)).mul_(_scale(q, dtype)).reshape(q.shape)


def requantize(w: torch.Tensor | QWeight | CpuWeight, spec: QuantSpec,
               device: str | torch.device = "cpu") -> torch.Tensor | QWeight | CpuWeight:
    """``w`` in the format ``spec`` names. Exact when only an int4 weight's layout changes (the bytes move);
    otherwise the weight is dequantized to float32 and quantized again, which adds the new format's error to
    the old one's (bench/cpu_formats.py measures it)."""
    if isinstance(w, Int4Weight) and spec.packing == "int4" and spec.group_size == w.group_size:
        return repack_int4(w, spec.int4_layout)
    if isinstance(w, QWeight):
        w = dequantize(w, torch.float32)
    elif not isinstance(w, torch.Tensor):
        w = dequantize_cpu(w)
    return quantize(w, spec, device) if spec.enabled else w


def linear(x: torch.Tensor, w) -> torch.Tensor:
    """x @ W.T for a dense tensor or a QWeight (dequantized on the fly in x's dtype)."""
    if isinstance(w, QWeight):
        w = dequantize(w, x.dtype)
    return torch.nn.functional.linear(x, w)


# ---- sizes and layouts (shared by the store, the checkpoint writer and the planner) ---------------

def weight_fields(prefix: str, shape: tuple[int, int], spec: QuantSpec, dense_dtype: torch.dtype) -> list[Field]:
    """The tensors that represent one linear weight under ``spec`` (in the order they are stored)."""
    if not spec.enabled:
        return [Field(f"{prefix}.weight", tuple(shape), dense_dtype)]
    if spec.packing != "hqq":
        return cpu_fields(prefix, tuple(shape), spec)
    out, inp = shape
    n = out * inp
    if n % spec.group_size:
        raise ValueError(f"group size {spec.group_size} does not divide {prefix} of shape {shape}")
    G, M = spec.group_size, n // spec.group_size
    if spec.bits == 3:
        fields = [Field(f"{prefix}.W_q", (math.ceil(G / 10), M), torch.int32)]
    else:
        fields = [Field(f"{prefix}.W_q", (G * spec.bits // 8, M), torch.uint8)]
    sg = _meta_group(M, spec.scale_group)
    if sg:
        fields += [Field(f"{prefix}.scale_q", (sg, M // sg), torch.uint8),
                   Field(f"{prefix}.scale_s", (1, M // sg), FP), Field(f"{prefix}.scale_z", (1, M // sg), FP)]
    else:
        fields.append(Field(f"{prefix}.scale", (1, M), FP))
    if spec.quant_zero:
        fields += [Field(f"{prefix}.zero_q", (1, M), torch.uint8),
                   Field(f"{prefix}.zero_s", (), FP), Field(f"{prefix}.zero_z", (), FP)]
    else:
        fields.append(Field(f"{prefix}.zero", (1, M), FP))
    return fields


def qweight_from(tensors: dict[str, torch.Tensor], prefix: str, shape: tuple[int, int],
                 spec: QuantSpec) -> QWeight | CpuWeight:
    """Assemble a QWeight (or a CPU-format weight) from tensors named like ``weight_fields`` produces."""
    if spec.packing != "hqq":
        return cpu_weight_from(tensors, prefix, shape, spec)

    def get(n):
        return tensors.get(f"{prefix}.{n}")
    return QWeight(shape=tuple(shape), bits=spec.bits, group_size=spec.group_size, W_q=get("W_q"),
                   scale=get("scale"), scale_q=get("scale_q"), scale_s=get("scale_s"), scale_z=get("scale_z"),
                   zero=get("zero"), zero_q=get("zero_q"), zero_s=get("zero_s"), zero_z=get("zero_z"))
