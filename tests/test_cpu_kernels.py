"""The CPU kernel path (mixoff_app/kernels/cpu.py) and its weight formats (mixoff_app/cpu_weights.py), held to
plain torch: our int4 packing is byte for byte torch's own converter (on this CPU, and under the other dispatch
levels torch can be forced to), and every kernel result to dequantize + matmul on the same codes."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from mixoff_app.config import ConfigError, ModelConfig, QuantConfig, QuantSpec
from mixoff_app.cpu_weights import (
    LAYOUTS,
    Int4Weight,
    Int8Weight,
    cpu_quant,
    dequantize_cpu,
    int4_misfit,
    pack_int4,
    quantize_int4,
    quantize_int8,
    repack_int4,
    unpack_int4,
)
from mixoff_app.kernels import cpu, qlinear, resolve_kernel, swiglu
from mixoff_app.quant import quantize, requantize

from helpers import ROOT

PROBE = cpu.probe()
needs_kernel = pytest.mark.skipif(not PROBE.ok, reason=f"no CPU kernel here: {PROBE.reason}")
# (out, in): full 64-row blocks, a partial block of 16/32/48 rows, and only a partial block
SHAPES = [(64, 64), (80, 128), (48, 256), (144, 96), (16, 32)]


def _codes(shape, seed=0):
    return torch.randint(0, 16, shape, generator=torch.Generator().manual_seed(seed), dtype=torch.int32)


@needs_kernel
@pytest.mark.parametrize("shape", SHAPES)
def test_packing_is_torchs_own_on_this_cpu(shape):
    codes = _codes(shape)
    assert torch.equal(pack_int4(codes, PROBE.layout), torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1))


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("shape", SHAPES)
def test_unpack_inverts_pack_and_repacking_is_exact(layout, shape):
    codes = _codes(shape, 1).to(torch.uint8)
    packed = pack_int4(codes, layout)
    assert packed.shape == (shape[0], shape[1] // 2) and packed.dtype == torch.uint8
    assert torch.equal(unpack_int4(packed, shape, layout), codes)
    w = quantize_int4(torch.randn(shape), 32, layout, optimize=False)
    for other in LAYOUTS:
        moved = repack_int4(w, other)
        assert torch.equal(dequantize_cpu(moved), dequantize_cpu(w))


SCRIPT = """
import json, torch
from mixoff_app.cpu_weights import pack_int4
out = {"capability": torch.backends.cpu.get_cpu_capability()}
for n, k in ((80, 128), (48, 64), (64, 32)):
    c = torch.randint(0, 16, (n, k), dtype=torch.int32)
    p = torch.ops.aten._convert_weight_to_int4pack_for_cpu(c, 1)
    out[f"{n}x{k}"] = [name for name in ("64h", "32h", "32p", "16p") if torch.equal(pack_int4(c, name), p)]
print(json.dumps(out))
"""


@needs_kernel
@pytest.mark.skipif(PROBE.capability != "AVX512", reason="forcing the other levels needs an AVX-512 CPU")
def test_packing_matches_torch_under_the_other_x86_dispatch_levels():
    """torch can be forced down to AVX2 and to its scalar code: each packs in the layout we name for it."""
    for level, layout in (("avx2", "32h"), ("default", "32p")):
        env = dict(os.environ, ATEN_CPU_CAPABILITY=level, PYTHONPATH=str(ROOT))
        got = json.loads(subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True,
                                        check=True, timeout=120).stdout)
        assert got.pop("capability") == level.upper()
        assert all(v == [layout] for v in got.values()), got


def _check(y, x, w):
    """The kernel against dequantize + matmul on the same codes, x rounded to bfloat16 as the kernel takes it.
    What may differ: the kernel rounds its output to bfloat16 (2^-9 relative) and sums in another order."""
    ref = F.linear(x.to(torch.bfloat16).float(), dequantize_cpu(w))
    assert y.dtype == x.dtype and y.shape == ref.shape
    scale = ref.abs().max().item()
    torch.testing.assert_close(y.float(), ref, rtol=4e-3, atol=1e-3 * scale)


@needs_kernel
@pytest.mark.parametrize("group", [32, 64, 128, 256])
@pytest.mark.parametrize("T", [1, 3, 17])
def test_int4_kernel_matches_dequantize_then_matmul(group, T):
    gen = torch.Generator().manual_seed(group + T)
    for shape in ((80, 256), (144, 512)):
        w = quantize_int4(torch.randn(shape, generator=gen), group, PROBE.layout)
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn((T, shape[1]), generator=gen).to(dtype)
            _check(qlinear(x, w, "cpu"), x, w)
        x3 = torch.randn((2, T, shape[1]), generator=gen)        # leading dimensions pass through
        assert qlinear(x3, w, "cpu").shape == (2, T, shape[0])


@needs_kernel
def test_int8_kernel_gate_up_and_dense_weights():
    gen = torch.Generator().manual_seed(7)
    w8 = quantize_int8(torch.randn(96, 160, generator=gen))
    x = torch.randn(5, 160, generator=gen)
    _check(qlinear(x, w8, "cpu"), x, w8)
    w1, w3 = (quantize_int4(torch.randn(128, 160 * 2, generator=gen), 64, PROBE.layout) for _ in range(2))
    x = torch.randn(2, 320, generator=gen)
    a, b = (F.linear(x.bfloat16().float(), dequantize_cpu(w)) for w in (w1, w3))
    y = swiglu(x, w1, w3, "cpu")                       # bfloat16: what the down projection's kernel reads
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), F.silu(a) * b, rtol=1e-2, atol=1e-2 * (F.silu(a) * b).abs().max().item())
    dense = torch.randn(48, 160, generator=gen)
    x = torch.randn(3, 160, generator=gen)
    torch.testing.assert_close(qlinear(x, dense, "cpu"), F.linear(x, dense), rtol=1e-5, atol=1e-5)
    assert qlinear(x[:0], dense, "cpu").shape == (0, 48)


def test_a_cpu_format_under_another_kernel_is_dequantized():
    w = quantize_int4(torch.randn(64, 128), 64, "32p")         # a layout this CPU need not read
    x = torch.randn(2, 128)
    torch.testing.assert_close(qlinear(x, w, "torch"), F.linear(x, dequantize_cpu(w)), rtol=0, atol=0)


def test_quantizer_error_scales_and_zeros_are_the_kernels():
    """hqq's (q - z) s along the input dimension as the kernel's (q - 8) S + Z, rounded to bfloat16: codes in 0..15,
    and the error of an RTN 4-bit quantizer at most (the optimiser only lowers it)."""
    W = torch.randn(128, 256, generator=torch.Generator().manual_seed(3))
    for group in (32, 64, 128):
        w = quantize_int4(W, group, "64h")
        rtn = quantize_int4(W, group, "64h", optimize=False)
        assert w.scale_zero.dtype == torch.bfloat16 and w.scale_zero.shape == (256 // group, 128, 2)
        codes = unpack_int4(w.W_int4, w.shape, w.layout)
        assert int(codes.max()) <= 15
        err, err_rtn = ((dequantize_cpu(v) - W).abs().mean().item() for v in (w, rtn))
        assert err <= err_rtn * 1.01 and err < 0.13 * W.abs().mean().item()     # a step is ~range / 15
    w8 = quantize_int8(W)
    assert w8.W_int8.dtype == torch.int8 and (dequantize_cpu(w8) - W).abs().max() <= w8.scale_int8.float().max()


def test_requantize_converts_hqq_and_changes_layouts_exactly():
    W = torch.randn(64, 128, generator=torch.Generator().manual_seed(5))
    hqq = quantize(W, QuantSpec(bits=2, group_size=16, scale_group=None))
    spec = QuantSpec(bits=4, group_size=32, packing="int4", int4_layout="64h")
    w = requantize(hqq, spec)
    assert isinstance(w, Int4Weight) and w.layout == "64h"
    # the 4-bit container holds the 2-bit weights closely, not exactly (their groups run along the other axis)
    d2 = hqq.dequantize(torch.float32)
    assert 0 < (dequantize_cpu(w) - d2).abs().max() < 0.25 * d2.abs().max()
    moved = requantize(w, QuantSpec(bits=4, group_size=32, packing="int4", int4_layout="32h"))
    assert moved.layout == "32h" and torch.equal(moved.scale_zero, w.scale_zero)
    assert torch.equal(dequantize_cpu(moved), dequantize_cpu(w))
    assert isinstance(requantize(W, QuantSpec(bits=8, packing="int8")), Int8Weight)


def test_what_the_int4_kernel_cannot_take_stays_hqq_and_is_named():
    assert int4_misfit((64, 96), 64) == "in-features 96 are not a multiple of the group 64"
    assert int4_misfit((40, 64), 64) == "out-features 40 are not a multiple of 16"
    assert int4_misfit((64, 64), 64) is None
    cfg = ModelConfig(vocab_size=64, hidden_size=96, intermediate_size=128, num_layers=1, num_heads=4,
                      num_kv_heads=2, head_dim=24, num_experts=4, top_k=2)
    held, notes = cpu_quant(QuantConfig.from_bits(4, 2), cfg, "64h")
    assert held.attn.packing == "hqq" and held.experts.packing == "hqq"      # 96 in-features, group 64
    assert len(notes) == 2 and "in-features 96" in notes[0]
    held, notes = cpu_quant(QuantConfig(attn=QuantSpec(bits=4, group_size=32), experts=QuantSpec(bits=8)), cfg, "64h")
    assert (held.attn.packing, held.attn.group_size, held.experts.packing, notes) == ("int4", 32, "int8", [])
    with pytest.raises(ConfigError):
        QuantSpec(bits=2, group_size=64, packing="int4", int4_layout="64h")


def test_resolving_the_cpu_kernel(monkeypatch):
    assert resolve_kernel("torch", "cpu") == "torch"
    assert resolve_kernel("auto", "cpu") == ("cpu" if PROBE.ok else "torch")
    with pytest.raises(ConfigError, match="--device cpu"):
        resolve_kernel("cpu", "cuda")
    down = cpu.Probe(False, "", "DEFAULT", "torch dispatches this CPU at DEFAULT (no AVX2)", True)
    monkeypatch.setattr(cpu, "probe", lambda: down)
    assert resolve_kernel("auto", "cpu") == "torch"
    with pytest.raises(ConfigError, match="no AVX2"):
        resolve_kernel("cpu", "cpu")


@needs_kernel
def test_weights_read_from_files_are_aligned_before_the_kernels_see_them():
    """safetensors packs tensors back to back, so one read from a file may start anywhere; the int8 kernel
    crashes on such a weight for more than one row of x (measured: torch 2.13), so loading aligns it."""
    from mixoff_app.cpu_weights import ALIGN, aligned
    w = quantize_int8(torch.randn(96, 64))
    buf = torch.zeros(w.W_int8.numel() + 8, dtype=torch.int8)
    w.W_int8 = buf[8:].view(96, 64)
    w.W_int8.copy_(quantize_int8(torch.randn(96, 64, generator=torch.Generator().manual_seed(0))).W_int8)
    assert w.W_int8.data_ptr() % ALIGN
    moved = aligned(w)
    assert all(t.data_ptr() % ALIGN == 0 for t in moved.tensors().values())
    x = torch.randn(4, 64)
    _check(qlinear(x, moved, "cpu"), x, moved)


def test_many_rows_at_once_only_where_the_kernel_gives_each_row_its_bits_alone():
    """A batched decode multiplies all rows at once through the int4/int8 kernels when the probe measured that
    each row gets the bits of its one-row call; the result is then row by row the one-row results."""
    from mixoff_app.cpu_weights import quantize_int4, quantize_int8
    from mixoff_app.kernels import _row_invariant, qlinear_rows
    p = PROBE
    if not p.ok:
        pytest.skip(p.reason)
    gen = torch.Generator().manual_seed(5)
    W = torch.randn(320, 512, generator=gen)
    x = torch.randn(4, 512, generator=gen)
    for w in (quantize_int4(W, 64, p.layout, optimize=False), quantize_int8(W)):
        assert _row_invariant("cpu", w) == p.rows_alone
        assert not _row_invariant("torch", w)
        alone = torch.cat([cpu.qlinear(x[i:i + 1], w) for i in range(4)])
        assert torch.equal(qlinear_rows(x, w, "cpu"), alone)
    assert not _row_invariant("cpu", W)          # dense fp32: GEMM and GEMV round differently
