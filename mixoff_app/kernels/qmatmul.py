"""Triton kernels that multiply by an HQQ axis-0 weight straight from its packed codes.

``geometry.py`` says where codes live: packed row j*R + r of the (S*R, in) view holds output rows
(i*S + j)*R + r for every code i, and all G of those rows share the scale/zero at [r, k] of an (R, in) matrix.
So one program owns BR values of r and every g: it reads S*BR contiguous runs of packed bytes along k (the
coalesced axis) and one [BR, BK] tile of scale/zero codes, which all G rows share, so every byte of the
weight is read once. Its outputs are the G*BR rows g*R + r.

Scale and zero are dequantized from their 8-bit meta codes inside the kernel: it costs a few flops per
group (amortised over G codes) and keeps the bytes read at 2 + 16/G bits per weight (3 for 2-bit g16),
where fp16 scale/zero precomputed at load would read 2 + 32/G (4): a third more, on a memory-bound GEMV,
and a third more in every device slot.

GEMV (one token) sums ``q * (x*s)`` and subtracts ``sum(x*s*z)`` once per group, converting codes to float
with the exponent trick ((q | 0x4B000000) as float32 - 2**23: an integer op and an add; int-to-float
conversion instructions run at a quarter rate on NVIDIA GPUs and would bound a 2-bit GEMV). It splits K
across programs when R is small (attention: R = 64 or 16) and sums the fp32 partials in a fixed order.
GEMM (prefill) dequantizes a [G*BR, BK] tile to the activation dtype and uses ``tl.dot``.

Everything accumulates in fp32. Weights are dequantized in fp32, which is at least as accurate as the
reference's fp16 per-op rounding; results agree with ``F.linear(x, dequantize(w, x.dtype))`` up to that
rounding and summation order.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from ..quant import QWeight
from .geometry import Geometry

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"     # fixed when this module was loaded


# Kernels call only triton.language builtins (tl.full, tl.reduce), not the @jit-defined tl.zeros/tl.sum of
# triton's standard library: those are compiled-mode functions when triton was imported before
# TRITON_INTERPRET was set (hqq imports it), and the interpreter cannot run them. ``tl.reduce`` with the
# standard sum combiner is what ``tl.sum`` compiles to, and the interpreter runs it as one numpy sum.
_add = tl.standard._sum_combine

@triton.jit
def _scale_zero(r, kk, s_ptr, ss_ptr, sz_ptr, z_ptr, zs_ptr, zz_ptr, R, K, C,
                SCALE_META: tl.constexpr, ZERO_META: tl.constexpr):
    """Scale and zero of groups (r, kk) as fp32 [BR, BK]; masked lanes give s = z = 0."""
    m = r[:, None] * K + kk[None, :]
    ok = (r[:, None] < R) & (kk[None, :] < K)
    if SCALE_META:
        c = m % C
        s = (tl.load(s_ptr + m, mask=ok, other=0).to(tl.float32)
             - tl.load(sz_ptr + c, mask=ok, other=0).to(tl.float32)) * tl.load(ss_ptr + c, mask=ok, other=0).to(tl.float32)
    else:
        s = tl.load(s_ptr + m, mask=ok, other=0).to(tl.float32)
    if ZERO_META:
        z = (tl.load(z_ptr + m, mask=ok, other=0).to(tl.float32) - tl.load(zz_ptr).to(tl.float32)) \
            * tl.load(zs_ptr).to(tl.float32)
    else:
        z = tl.load(z_ptr + m, mask=ok, other=0).to(tl.float32)
    return s, z


@triton.jit
def _codes(wq_ptr, r, kk, R, K, BITS: tl.constexpr, PER: tl.constexpr, S: tl.constexpr,
           PER_P: tl.constexpr, S_P: tl.constexpr, TOP: tl.constexpr):
    """Codes of output rows (i*S + j)*R + r at input columns kk, as exact fp32: [PER_P, S_P, BR, BK]."""
    j = tl.arange(0, S_P)[:, None, None]
    rr = r[None, :, None]
    k3 = kk[None, None, :]
    p = tl.load(wq_ptr + (j * R + rr) * K + k3, mask=(j < S) & (rr < R) & (k3 < K), other=0).to(tl.int32)
    i = tl.arange(0, PER_P)[:, None, None, None]
    shift = tl.where(i < PER, TOP - BITS * i, 0)
    q = ((p[None, :, :, :] >> shift) & ((1 << BITS) - 1)) | 0x4B000000
    return q.to(tl.float32, bitcast=True) - 8388608.0


@triton.jit
def _store_rows(y_ptr, val, r, R, OUT, PER: tl.constexpr, S: tl.constexpr, PER_P: tl.constexpr,
                S_P: tl.constexpr):
    """Store a [PER_P, S_P, BR] tile at output rows (i*S + j)*R + r (y_ptr already offset to the row)."""
    i = tl.arange(0, PER_P)[:, None, None]
    j = tl.arange(0, S_P)[None, :, None]
    rr = r[None, None, :]
    o = (i * S + j) * R + rr
    tl.store(y_ptr + o, val.to(y_ptr.dtype.element_ty), mask=(i < PER) & (j < S) & (rr < R) & (o < OUT))


@triton.jit
def qgemv_kernel(x_ptr, y_ptr, wq_ptr, s_ptr, ss_ptr, sz_ptr, z_ptr, zs_ptr, zz_ptr,
                 R, K, C, OUT, K_SPLIT,
                 BITS: tl.constexpr, PER: tl.constexpr, S: tl.constexpr, PER_P: tl.constexpr,
                 S_P: tl.constexpr, TOP: tl.constexpr, SCALE_META: tl.constexpr, ZERO_META: tl.constexpr,
                 BR: tl.constexpr, BK: tl.constexpr):
    """y[split, o] = sum over this split's k of x[k] * W[o, k]; grid (cdiv(R, BR), splits)."""
    pid_r = tl.program_id(0)
    pid_k = tl.program_id(1)
    r = pid_r * BR + tl.arange(0, BR)
    acc = tl.full((PER_P, S_P, BR), 0, tl.float32)
    bias = tl.full((BR,), 0, tl.float32)
    k_lo = pid_k * K_SPLIT
    for k0 in range(k_lo, tl.minimum(k_lo + K_SPLIT, K), BK):
        kk = k0 + tl.arange(0, BK)
        x = tl.load(x_ptr + kk, mask=kk < K, other=0).to(tl.float32)
        s, z = _scale_zero(r, kk, s_ptr, ss_ptr, sz_ptr, z_ptr, zs_ptr, zz_ptr, R, K, C, SCALE_META, ZERO_META)
        xs = x[None, :] * s                                                   # [BR, BK]
        bias += tl.reduce(xs * z, 1, _add)
        q = _codes(wq_ptr, r, kk, R, K, BITS, PER, S, PER_P, S_P, TOP)       # [PER_P, S_P, BR, BK]
        acc += tl.reduce(q * xs[None, None, :, :], 3, _add)
    _store_rows(y_ptr + pid_k * OUT, acc - bias[None, None, :], r, R, OUT, PER, S, PER_P, S_P)


@triton.jit
def qgemv_swiglu_kernel(x_ptr, y_ptr, wq_ptr, s_ptr, ss_ptr, sz_ptr, z_ptr, zs_ptr, zz_ptr,
                        wq3_ptr, s3_ptr, ss3_ptr, sz3_ptr, z3_ptr, zs3_ptr, zz3_ptr, R, K, C, OUT,
                        BITS: tl.constexpr, PER: tl.constexpr, S: tl.constexpr, PER_P: tl.constexpr,
                        S_P: tl.constexpr, TOP: tl.constexpr, SCALE_META: tl.constexpr, ZERO_META: tl.constexpr,
                        BR: tl.constexpr, BK: tl.constexpr):
    """y[o] = silu((W1 x)[o]) * (W3 x)[o]: an expert's gate and up projections in one pass over x, for two
    weights of one format; grid (cdiv(R, BR),). No split-K: silu needs the whole sum."""
    pid_r = tl.program_id(0)
    r = pid_r * BR + tl.arange(0, BR)
    acc1 = tl.full((PER_P, S_P, BR), 0, tl.float32)
    acc3 = tl.full((PER_P, S_P, BR), 0, tl.float32)
    bias1 = tl.full((BR,), 0, tl.float32)
    bias3 = tl.full((BR,), 0, tl.float32)
    for k0 in range(0, K, BK):
        kk = k0 + tl.arange(0, BK)
        x = tl.load(x_ptr + kk, mask=kk < K, other=0).to(tl.float32)
        s, z = _scale_zero(r, kk, s_ptr, ss_ptr, sz_ptr, z_ptr, zs_ptr, zz_ptr, R, K, C, SCALE_META, ZERO_META)
        xs = x[None, :] * s
        bias1 += tl.reduce(xs * z, 1, _add)
        q = _codes(wq_ptr, r, kk, R, K, BITS, PER, S, PER_P, S_P, TOP)
        acc1 += tl.reduce(q * xs[None, None, :, :], 3, _add)
        s, z = _scale_zero(r, kk, s3_ptr, ss3_ptr, sz3_ptr, z3_ptr, zs3_ptr, zz3_ptr, R, K, C, SCALE_META,
                           ZERO_META)
        xs = x[None, :] * s
        bias3 += tl.reduce(xs * z, 1, _add)
        q = _codes(wq3_ptr, r, kk, R, K, BITS, PER, S, PER_P, S_P, TOP)
        acc3 += tl.reduce(q * xs[None, None, :, :], 3, _add)
    a = acc1 - bias1[None, None, :]
    e = tl.exp(-tl.abs(a))                                  # silu(a) = a * sigmoid(a), without overflow
    sig = tl.where(a >= 0, 1.0 / (1.0 + e), e / (1.0 + e))
    _store_rows(y_ptr, a * sig * (acc3 - bias3[None, None, :]), r, R, OUT, PER, S, PER_P, S_P)


@triton.jit
def qgemm_kernel(x_ptr, y_ptr, wq_ptr, s_ptr, ss_ptr, sz_ptr, z_ptr, zs_ptr, zz_ptr,
                 T, R, K, C, OUT,
                 BITS: tl.constexpr, PER: tl.constexpr, S: tl.constexpr, PER_P: tl.constexpr,
                 S_P: tl.constexpr, TOP: tl.constexpr, SCALE_META: tl.constexpr, ZERO_META: tl.constexpr,
                 IEEE: tl.constexpr, BT: tl.constexpr, BR: tl.constexpr, BK: tl.constexpr):
    """y[t, o] = sum_k x[t, k] * W[o, k] for a [BT, G*BR] output tile; grid (cdiv(T, BT), cdiv(R, BR))."""
    pid_t = tl.program_id(0)
    pid_r = tl.program_id(1)
    t = pid_t * BT + tl.arange(0, BT)
    r = pid_r * BR + tl.arange(0, BR)
    N: tl.constexpr = PER_P * S_P * BR
    acc = tl.full((BT, N), 0, tl.float32)
    for k0 in range(0, K, BK):
        kk = k0 + tl.arange(0, BK)
        x = tl.load(x_ptr + t[:, None] * K + kk[None, :], mask=(t[:, None] < T) & (kk[None, :] < K), other=0)
        s, z = _scale_zero(r, kk, s_ptr, ss_ptr, sz_ptr, z_ptr, zs_ptr, zz_ptr, R, K, C, SCALE_META, ZERO_META)
        q = _codes(wq_ptr, r, kk, R, K, BITS, PER, S, PER_P, S_P, TOP)
        w = tl.reshape((q - z[None, None, :, :]) * s[None, None, :, :], (N, BK)).to(x.dtype)
        if IEEE:
            acc += tl.dot(x, tl.trans(w), input_precision="ieee")
        else:
            acc += tl.dot(x, tl.trans(w))
    n = tl.arange(0, N)
    i, j, rr = n // (S_P * BR), (n // BR) % S_P, pid_r * BR + n % BR
    o = (i * S + j) * R + rr
    ok = (i < PER) & (j < S) & (rr < R) & (o < OUT)
    tl.store(y_ptr + t[:, None] * OUT + o[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=(t[:, None] < T) & ok[None, :])


# ---- host side ------------------------------------------------------------------------------------

def _operands(w: QWeight):
    """Pointers for the scale/zero arguments; unused slots get any tensor (never read)."""
    if w.scale is not None:
        s, ss, sz, C, smeta = w.scale, w.W_q, w.W_q, 1, False
    else:
        s, ss, sz, C, smeta = w.scale_q, w.scale_s, w.scale_z, w.scale_s.numel(), True
    if w.zero is not None:
        z, zs, zz, zmeta = w.zero, w.W_q, w.W_q, False
    else:
        z, zs, zz, zmeta = w.zero_q, w.zero_s, w.zero_z, True
    return (w.W_q, s, ss, sz, z, zs, zz), C, smeta, zmeta


# Launch configurations. On the CPU (interpreter) one program covers as much as fits, because the
# interpreter's cost is per program. On a GPU a few candidates are timed once per shape and the fastest
# kept: the lists are short so the first token does not wait on many compiles (Triton caches them on disk).

@dataclass(frozen=True)
class GemvConfig:
    BR: int
    BK: int
    split: int
    warps: int = 4


@dataclass(frozen=True)
class GemmConfig:
    BT: int
    BR: int
    BK: int
    warps: int = 4


def _pow2_floor(n: int) -> int:
    return 1 << max(0, int(n).bit_length() - 1)


def sm_count(device: torch.device) -> Optional[int]:
    """Streaming multiprocessors of a CUDA device; None for the CPU (the interpreter)."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else None


PROGRAMS_PER_SM = 4      # a GEMV launch with fewer programs than this per SM leaves bandwidth unused


def gemv_candidates(g: Geometry, sms: Optional[int]) -> list[GemvConfig]:
    """Launch configurations worth timing on a GPU with ``sms`` SMs (None: the interpreter's one)."""
    rows = g.per_p * g.s_p
    if sms is None:
        BK = min(triton.next_power_of_2(g.K), max(16, _pow2_floor(65536 // (rows * 8))))
        BR = min(triton.next_power_of_2(g.R), max(1, _pow2_floor(65536 // (rows * BK))))
        return [GemvConfig(BR, BK, 1)]
    out = []
    # (rows of r per program, packed bytes per program per step, warps): 2-4 KiB a step keeps 16 B a thread
    # in flight with 4-8 warps; the split makes at least ~4 programs per SM where R alone is too small.
    for want_br, step_bytes, warps in ((1, 2048, 4), (2, 4096, 4), (1, 8192, 8)):
        BR = min(want_br, triton.next_power_of_2(g.R))
        BK = max(16, min(triton.next_power_of_2(g.K), _pow2_floor(step_bytes // (g.s_p * BR))))
        progs = triton.cdiv(g.R, BR)
        split = 1
        while progs * split < PROGRAMS_PER_SM * sms and triton.cdiv(g.K, BK * split * 2) >= 2:
            split *= 2
        cfg = GemvConfig(BR, BK, split, warps)
        if cfg not in out:
            out.append(cfg)
    return out


def token_tile(T: int) -> int:
    """The GEMM's token tile on a GPU; configurations are tuned once per tile size."""
    return 16 if T <= 16 else 32 if T <= 32 else 64


def gemm_candidates(g: Geometry, T: int, gpu: bool) -> list[GemmConfig]:
    rows = g.per_p * g.s_p
    if not gpu:
        BT = max(16, min(64, triton.next_power_of_2(T)))
        BR = max(1, min(triton.next_power_of_2(g.R), _pow2_floor(128 // rows)))
        BK = max(16, min(triton.next_power_of_2(g.K), _pow2_floor(32768 // (rows * BR))))
        return [GemmConfig(BT, BR, BK)]
    BT = token_tile(T)
    BR = max(1, _pow2_floor(64 // rows))        # N = G*BR output rows per tile: 64 (or G when G > 64)
    if BT == 16:
        return [GemmConfig(BT, BR, 32), GemmConfig(BT, BR, 64)]
    # Bigger token tiles: BK 64 would need ~250 registers a thread (tools/compile_kernels.py), so wider N
    # with 8 warps instead.
    return [GemmConfig(BT, BR, 32), GemmConfig(BT, BR * 2 if rows * BR < 128 else BR, 32, 8)]


_best: dict = {}


def _tuned(key, candidates, launch):
    """Run ``launch(cfg)`` with the fastest of ``candidates`` for ``key`` (timed once, on CUDA only)."""
    cfg = _best.get(key)
    if cfg is None:
        if len(candidates) == 1:
            cfg = candidates[0]
        else:
            times = []
            for c in candidates:
                launch(c)                                       # compile + warm
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(5):
                    launch(c)
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            cfg = candidates[min(range(len(candidates)), key=times.__getitem__)]
        _best[key] = cfg
    return launch(cfg)


def chosen_configs() -> list[dict]:
    """What the tuner picked so far (for the benchmark's report)."""
    out = []
    for key, cfg in _best.items():
        kind, g = key[0], key[1]
        row = {"kernel": kind, "bits": g.bits, "out": g.out, "in": g.K, "dtype": str(key[-2]).replace("torch.", "")}
        if kind == "gemm":
            row["token_tile"] = key[2]
        out.append(row | {"config": dict(cfg.__dict__)})
    return out


def qgemv(x: torch.Tensor, w: QWeight, g: Geometry, cfg: Optional[GemvConfig] = None) -> torch.Tensor:
    """x [K] -> [out] in x's dtype."""
    ptrs, C, smeta, zmeta = _operands(w)

    def launch(c: GemvConfig) -> torch.Tensor:
        k_split = triton.cdiv(triton.cdiv(g.K, c.split), c.BK) * c.BK
        splits = triton.cdiv(g.K, k_split)
        y = torch.empty((splits, g.out), device=x.device, dtype=x.dtype if splits == 1 else torch.float32)
        qgemv_kernel[(triton.cdiv(g.R, c.BR), splits)](
            x, y, *ptrs, g.R, g.K, C, g.out, k_split,
            BITS=g.bits, PER=g.per, S=g.S, PER_P=g.per_p, S_P=g.s_p, TOP=g.top, SCALE_META=smeta,
            ZERO_META=zmeta, BR=c.BR, BK=c.BK, num_warps=c.warps)
        return y[0] if splits == 1 else y.sum(0).to(x.dtype)

    if cfg is not None:
        return launch(cfg)
    key = ("gemv", g, smeta, zmeta, x.dtype, x.device)
    return _tuned(key, gemv_candidates(g, sm_count(x.device)), launch)


def swiglu_candidates(g: Geometry, sms: Optional[int]) -> list[GemvConfig]:
    """The GEMV's candidates whose rows alone give every SM enough programs (so no split-K is needed). Empty
    for short weights (R small: experts of 768-1408 rows), where two split-K GEMVs beat one fused launch."""
    cands = gemv_candidates(g, sms)
    if sms is None:
        return cands
    return [c for c in cands if c.split == 1 and triton.cdiv(g.R, c.BR) >= PROGRAMS_PER_SM * sms]


def qgemv_swiglu(x: torch.Tensor, w1: QWeight, w3: QWeight, g: Geometry,
                 cfg: Optional[GemvConfig] = None) -> Optional[torch.Tensor]:
    """x [K] -> silu(W1 x) * (W3 x) [out] in x's dtype, or None where the fused launch does not pay
    (``swiglu_candidates`` is empty). w1 and w3 must share shape and format."""
    ptrs1, C, smeta, zmeta = _operands(w1)
    ptrs3 = _operands(w3)[0]

    def launch(c: GemvConfig) -> torch.Tensor:
        y = torch.empty(g.out, device=x.device, dtype=x.dtype)
        qgemv_swiglu_kernel[(triton.cdiv(g.R, c.BR),)](
            x, y, *ptrs1, *ptrs3, g.R, g.K, C, g.out,
            BITS=g.bits, PER=g.per, S=g.S, PER_P=g.per_p, S_P=g.s_p, TOP=g.top, SCALE_META=smeta,
            ZERO_META=zmeta, BR=c.BR, BK=c.BK, num_warps=c.warps)
        return y

    if cfg is not None:
        return launch(cfg)
    candidates = swiglu_candidates(g, sm_count(x.device))
    if not candidates:
        return None
    key = ("swiglu", g, smeta, zmeta, x.dtype, x.device)
    return _tuned(key, candidates, launch)


def qgemm(x: torch.Tensor, w: QWeight, g: Geometry, cfg: Optional[GemmConfig] = None) -> torch.Tensor:
    """x [T, K] -> [T, out] in x's dtype."""
    ptrs, C, smeta, zmeta = _operands(w)
    T = x.shape[0]

    def launch(c: GemmConfig) -> torch.Tensor:
        y = torch.empty((T, g.out), device=x.device, dtype=x.dtype)
        qgemm_kernel[(triton.cdiv(T, c.BT), triton.cdiv(g.R, c.BR))](
            x, y, *ptrs, T, g.R, g.K, C, g.out,
            BITS=g.bits, PER=g.per, S=g.S, PER_P=g.per_p, S_P=g.s_p, TOP=g.top, SCALE_META=smeta,
            ZERO_META=zmeta, IEEE=x.dtype == torch.float32, BT=c.BT, BR=c.BR, BK=c.BK, num_warps=c.warps)
        return y

    if cfg is not None:
        return launch(cfg)
    key = ("gemm", g, token_tile(T), smeta, zmeta, x.dtype, x.device)
    return _tuned(key, gemm_candidates(g, T, x.device.type == "cuda"), launch)


def qmatmul(x: torch.Tensor, w: QWeight, g: Geometry) -> torch.Tensor:
    """x [T, K] (contiguous) -> x @ W.T [T, out]."""
    if x.shape[0] == 1:
        return qgemv(x[0], w, g)[None]
    if INTERPRETED and x.dtype == torch.bfloat16:
        # Triton 3.9's interpreter computes tl.dot of bf16 operands wrongly (numpy has no bf16); compiled
        # kernels are fine. The interpreter is for tests, so it multiplies in fp32 here.
        return qgemm(x.float(), w, g).to(torch.bfloat16)
    return qgemm(x, w, g)
