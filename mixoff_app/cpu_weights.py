"""Weights in the formats of torch's CPU low-bit kernels: ``Int4Weight`` and ``Int8Weight``.

int4 (``aten._weight_int4pack_mm_for_cpu``): 4-bit codes q in groups of g = 32/64/128/256 consecutive *input*
values of one output row, each group with a bfloat16 scale S and zero Z: ``w = (q - 8) * S + Z``. The codes
are held the way the kernel reads them, two per byte, in blocks of output rows (``LAYOUTS``: which rows share
a byte depends on the CPU's vector width, so a stored weight names its layout). Scales and zeros are one
tensor ``scale_zero`` [K/g, N, 2].

int8 (``aten._weight_int8pack_mm``): 8-bit signed codes, one bfloat16 scale per output row: ``w = q * S``.

hqq's layout (quant.py) groups along the *output* dimension, so an hqq weight is not an int4 weight with other
names: converting one re-quantizes (from the original weights where there are any, else from the dequantized
hqq weights; docs/KERNELS.md says what each costs). Nothing here runs the kernels (kernels/cpu.py does); this
is the format, its quantizer, and the plain dequantization every kernel result is held to.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import NamedTuple, Optional

import torch

from .config import INT4_GROUPS, ModelConfig, QuantConfig, QuantSpec
from .fields import Field

BF16 = torch.bfloat16
ROW_MULTIPLE = 16          # the int4 kernel's row blocks are 16, 32, 48 or 64 rows


class Int4Layout(NamedTuple):
    """How torch packs int4 codes on a kind of CPU: output rows in blocks of ``block``, each block stored
    input-major ([K, block / 2] bytes). A full block's byte j holds rows j and j + block / 2 when ``halves``
    (the vectorized x86 kernels unpack a register's two nibble halves as two row ranges); otherwise, and in
    a last partial block, rows 2j and 2j + 1."""
    block: int
    halves: bool


# torch 2.x's int4mm_kernel.cpp: AVX-512 (64 rows, halves), AVX2 (32, halves), x86 without AVX2 (32, pairs);
# "16p" is what a 4-float vector (NEON) would give. kernels/cpu.py finds which one this machine's torch uses.
LAYOUTS = {"64h": Int4Layout(64, True), "32h": Int4Layout(32, True), "32p": Int4Layout(32, False),
           "16p": Int4Layout(16, False)}


@dataclass
class Int4Weight:
    shape: tuple[int, int]     # (out N, in K)
    group_size: int
    layout: str                # a LAYOUTS key
    W_int4: torch.Tensor       # [N, K/2] uint8, in ``layout``
    scale_zero: torch.Tensor   # [K/g, N, 2] bfloat16: (S, Z) per group

    bits = 4

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"W_int4": self.W_int4, "scale_zero": self.scale_zero}

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_cpu(self, dtype)


@dataclass
class Int8Weight:
    shape: tuple[int, int]
    W_int8: torch.Tensor       # [N, K] int8
    scale_int8: torch.Tensor   # [N] bfloat16

    bits = 8

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"W_int8": self.W_int8, "scale_int8": self.scale_int8}

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    @property
    def group_size(self) -> int:
        return self.shape[1]           # one scale per row: a group is the whole row

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_cpu(self, dtype)


CpuWeight = Int4Weight | Int8Weight


# ---- what fits -------------------------------------------------------------------------------------

def int4_misfit(shape: tuple[int, int], group: int) -> Optional[str]:
    """Why the int4 kernel cannot take a weight of ``shape`` in groups of ``group`` (None: it can)."""
    out, inp = shape
    if group not in INT4_GROUPS:
        return f"group {group} is not one of {', '.join(map(str, INT4_GROUPS))}"
    if inp % group:
        return f"in-features {inp} are not a multiple of the group {group}"
    if out % ROW_MULTIPLE:
        return f"out-features {out} are not a multiple of {ROW_MULTIPLE}"
    return None


# ---- packing ---------------------------------------------------------------------------------------

def _split(b: torch.Tensor, halves: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of a block [..., rows, K] -> (low-nibble rows, high-nibble rows)."""
    r = b.shape[-2]
    return (b[..., :r // 2, :], b[..., r // 2:, :]) if halves else (b[..., 0::2, :], b[..., 1::2, :])


def pack_int4(codes: torch.Tensor, layout: str) -> torch.Tensor:
    """Codes [N, K] in 0..15 -> [N, K/2] uint8, byte for byte what ``aten._convert_weight_to_int4pack_for_cpu``
    makes on a CPU of ``layout`` (tests/test_cpu_weights.py holds the two together)."""
    lay = LAYOUTS[layout]
    codes = codes.to(torch.uint8)
    N, K = codes.shape
    full = N // lay.block * lay.block          # rows in full blocks; the rest is one block of pairs
    parts = []
    if full:
        lo, hi = _split(codes[:full].view(N // lay.block, lay.block, K), lay.halves)
        parts.append((lo | hi << 4).transpose(1, 2).reshape(-1))                  # [NB, K, block/2]
    if full < N:
        lo, hi = _split(codes[full:], False)
        parts.append((lo | hi << 4).t().reshape(-1))                              # [K, rows/2]
    return torch.cat(parts).view(N, K // 2)


def unpack_int4(packed: torch.Tensor, shape: tuple[int, int], layout: str) -> torch.Tensor:
    """``pack_int4``'s inverse: [N, K/2] uint8 -> codes [N, K] uint8."""
    lay = LAYOUTS[layout]
    N, K = shape
    flat = packed.reshape(-1)
    out = torch.empty((N, K), dtype=torch.uint8, device=packed.device)
    full = N // lay.block * lay.block
    if full:
        b = flat[:full * K // 2].view(N // lay.block, K, lay.block // 2).transpose(1, 2)
        lo, hi = _split(out[:full].view(N // lay.block, lay.block, K), lay.halves)
        lo.copy_(b & 15)
        hi.copy_(b >> 4)
    if full < N:
        b = flat[full * K // 2:].view(K, (N - full) // 2).t()
        lo, hi = _split(out[full:], False)
        lo.copy_(b & 15)
        hi.copy_(b >> 4)
    return out


def repack_int4(w: Int4Weight, layout: str) -> Int4Weight:
    """The same codes in another CPU's layout (exact: only bytes move)."""
    if w.layout == layout:
        return w
    codes = unpack_int4(w.W_int4, w.shape, w.layout)
    return Int4Weight(w.shape, w.group_size, layout, pack_int4(codes, layout), w.scale_zero)


# ---- quantizing ------------------------------------------------------------------------------------

def quantize_int4(W: torch.Tensor, group: int, layout: str, optimize: bool = True) -> Int4Weight:
    """A 2-D weight -> 4-bit codes in groups of ``group`` input values. hqq's optimiser picks each group's
    scale and (unrounded) zero along the input dimension (its axis 1); hqq's ``(q - z) * s`` is the kernel's
    ``(q - 8) * S + Z`` with S = s, Z = s (8 - z). S and Z are then rounded to bfloat16, the kernel's dtype, and
    the codes rounded again against the rounded S and Z, so the codes are the nearest ones to W for the
    scale and zero the kernel will actually use."""
    from hqq.core.quantize import Quantizer

    N, K = W.shape
    why = int4_misfit((N, K), group)
    if why:
        raise ValueError(f"cannot hold a {N}x{K} weight as int4: {why}")
    Wf = W.float()
    _, meta = Quantizer.quantize(Wf, nbits=4, channel_wise=True, group_size=group, optimize=optimize,
                                 round_zero=False, axis=1, bitpack=False, compute_dtype=torch.float32,
                                 device=str(W.device))
    s = meta["scale"].view(N, K // group).float()
    z = meta["zero"].view(N, K // group).float()
    S, Z = s.to(BF16), (s * (8 - z)).to(BF16)
    return from_scale_zero(Wf, S, Z, group, layout)


def from_scale_zero(Wf: torch.Tensor, S: torch.Tensor, Z: torch.Tensor, group: int, layout: str) -> Int4Weight:
    """Round fp32 W [N, K] to the codes of per-group bfloat16 scales S and zeros Z [N, K/g]."""
    N, K = Wf.shape
    Sf, Zf = S.float(), Z.float()
    safe = torch.where(Sf == 0, torch.ones_like(Sf), Sf)                       # a constant group: all codes 8
    q = ((Wf.view(N, K // group, group) - Zf[..., None]) / safe[..., None]).round_() + 8
    codes = q.clamp_(0, 15).view(N, K)
    scale_zero = torch.stack((S, Z), dim=-1).transpose(0, 1).contiguous()      # [K/g, N, 2]
    return Int4Weight((N, K), group, layout, pack_int4(codes, layout), scale_zero)


def quantize_int8(W: torch.Tensor) -> Int8Weight:
    """Symmetric 8-bit codes per output row: S = max|w| / 127 in bfloat16, q = round(w / S)."""
    Wf = W.float()
    S = (Wf.abs().amax(dim=1) / 127).to(BF16)
    safe = torch.where(S.float() == 0, torch.ones_like(S, dtype=torch.float32), S.float())
    q = (Wf / safe[:, None]).round_().clamp_(-128, 127).to(torch.int8)
    return Int8Weight(tuple(W.shape), q, S)


def quantize_cpu(W: torch.Tensor, spec: QuantSpec) -> CpuWeight:
    """A 2-D floating-point weight in the CPU format ``spec`` names."""
    if spec.packing == "int8":
        return quantize_int8(W)
    return quantize_int4(W, spec.group_size, spec.int4_layout)


# ---- the reference -----------------------------------------------------------------------------------

def dequantize_cpu(w: CpuWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The plain dequantization (fp32 arithmetic, then ``dtype``): what the kernels are held to."""
    if isinstance(w, Int8Weight):
        return (w.W_int8.float() * w.scale_int8.float()[:, None]).to(dtype)
    N, K = w.shape
    codes = unpack_int4(w.W_int4, w.shape, w.layout).float().view(N, K // w.group_size, w.group_size)
    S = w.scale_zero[..., 0].float().t()[..., None]                               # [N, K/g, 1]
    Z = w.scale_zero[..., 1].float().t()[..., None]
    return ((codes - 8) * S + Z).view(N, K).to(dtype)


# ---- stored form -------------------------------------------------------------------------------------

def cpu_fields(prefix: str, shape: tuple[int, int], spec: QuantSpec) -> list[Field]:
    """The tensors that hold one weight in a CPU format, in the order they are stored."""
    out, inp = shape
    if spec.packing == "int8":
        return [Field(f"{prefix}.W_int8", (out, inp), torch.int8), Field(f"{prefix}.scale_int8", (out,), BF16)]
    why = int4_misfit(shape, spec.group_size)
    if why:
        raise ValueError(f"{prefix} of shape {shape} cannot be held as int4: {why}")
    return [Field(f"{prefix}.W_int4", (out, inp // 2), torch.uint8),
            Field(f"{prefix}.scale_zero", (inp // spec.group_size, out, 2), BF16)]


ALIGN = 64       # torch's own allocations are 64-byte aligned, and the int8 kernel's wider paths rely on it


def aligned(w: CpuWeight) -> CpuWeight:
    """``w`` with every tensor 64-byte aligned: tensors read from a file may start anywhere (safetensors packs
    them back to back), and ``_weight_int8pack_mm`` crashes on such a weight for more than one row of x."""
    for name, t in w.tensors().items():
        if t.data_ptr() % ALIGN:
            setattr(w, name, t.clone())
    return w


def cpu_weight_from(tensors: dict[str, torch.Tensor], prefix: str, shape: tuple[int, int],
                    spec: QuantSpec) -> CpuWeight:
    """Assemble a weight from tensors named as ``cpu_fields`` names them (views stay views)."""
    if spec.packing == "int8":
        return Int8Weight(tuple(shape), tensors[f"{prefix}.W_int8"], tensors[f"{prefix}.scale_int8"])
    return Int4Weight(tuple(shape), spec.group_size, spec.int4_layout, tensors[f"{prefix}.W_int4"],
                      tensors[f"{prefix}.scale_zero"])


# ---- which format each weight takes on the CPU kernel path -------------------------------------------------

# Experts quantized below 4 bits (Mixtral's 2-bit g16 default) on the CPU kernel path: a fused kernel reads
# only 4- and 8-bit codes, so they are re-quantized to 4 bits in groups of this size (measured against int8 and
# the 2-bit reference path in bench/cpu_formats.py, docs/BENCHMARKS.md "CPU expert formats").
LOW_BIT_EXPERT_GROUP = 64


def cpu_spec(spec: QuantSpec, shapes: list[tuple[int, int]], layout: str) -> tuple[QuantSpec, Optional[str]]:
    """The CPU format of one spec for weights of ``shapes``, and why not when it keeps ``spec``.

    8-bit -> int8; other bit widths -> int4 (the spec's group where the kernel takes it, else
    ``LOW_BIT_EXPERT_GROUP``); unquantized and CPU-format specs stay as they are (an int4 spec of another
    layout is repacked, exactly, to this one)."""
    if not spec.enabled or spec.packing == "int8":
        return spec, None
    if spec.bits == 8:
        return QuantSpec(bits=8, packing="int8"), None
    group = spec.group_size if spec.group_size in INT4_GROUPS and spec.bits == 4 else LOW_BIT_EXPERT_GROUP
    for shape in shapes:
        why = int4_misfit(shape, group)
        if why:
            return spec, f"{shape[0]}x{shape[1]} weights: {why}"
    return QuantSpec(bits=4, group_size=group, packing="int4", int4_layout=layout), None


def trunk_shapes(cfg: ModelConfig) -> list[tuple[int, int]]:
    """Every weight the attention spec quantizes: the attention's linears, dense MLPs and shared experts."""
    h = cfg.hidden_size
    shapes = list(cfg.attention_shapes().values())
    for size in (cfg.dense_intermediate_size, cfg.shared_intermediate_size):
        if size:
            shapes += [(size, h), (h, size)]
    return shapes


def cpu_quant(quant: QuantConfig, cfg: ModelConfig, layout: str) -> tuple[QuantConfig, list[str]]:
    """What a model quantized as ``quant`` holds on the CPU kernel path, and a line for each spec that keeps
    its hqq format (then read by the reference path) because the int4 kernel cannot take its shapes."""
    f, h = cfg.intermediate_size, cfg.hidden_size
    attn, why_a = cpu_spec(quant.attn, trunk_shapes(cfg), layout)
    experts, why_e = cpu_spec(quant.experts, [(f, h), (h, f)], layout)
    notes = [f"{what} stay {spec.describe()} on the reference path: the int4 kernel cannot take {why}"
             for what, spec, why in (("attention weights", quant.attn, why_a), ("experts", quant.experts, why_e))
             if why]
    # lm_head is read whole for every token (151936 x 2048 for Qwen: 1.2 GB in float32): in a quantized model it
    # is held int8 per row, a quarter of that, with an error far below the 4-bit weights' (bench/cpu_formats.py);
    # an unquantized model stays unquantized.
    lm_head = QuantSpec(bits=8, packing="int8") if quant.attn.enabled or quant.experts.enabled else quant.lm_head
    return replace(quant, attn=attn, experts=experts, lm_head=lm_head), notes


def cpu_hold(layout: str):
    """A loader's ``hold`` (checkpoints.load_checkpoint_placed) for the CPU kernel path on a CPU that packs int4
    as ``layout``: every weight in its CPU format (``cpu_quant``)."""
    def hold(quant: QuantConfig, cfg: ModelConfig) -> QuantConfig:
        return cpu_quant(quant, cfg, layout)[0]
    return hold
