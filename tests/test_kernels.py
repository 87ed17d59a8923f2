"""Fused quantized matmul (mixoff_app/kernels) against the plain torch reference: dequantize, then matmul.

On the CPU the Triton kernels run in Triton's interpreter (shapes are small: it is slow); the tests marked
``gpu`` run the compiled kernels at Mixtral-8x7B's shapes and skip without CUDA.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mixoff_app.config import ConfigError, EngineConfig, QuantSpec
from mixoff_app.engine import Engine
from mixoff_app.kernels import backend, fused, qlinear, resolve_kernel, swiglu
from mixoff_app.kernels.geometry import geometry
from mixoff_app.quant import QWeight, dequantize, pack, quantize

pytest.importorskip("triton", reason="the kernel tests need triton (.ci/run installs it)")

ROOT = Path(__file__).resolve().parent.parent
REFERENCE = Path(__file__).parent / "fixtures" / "reference_tiny"


def random_qweight(shape, bits, group, scale_group=None, quant_zero=True, device="cpu", seed=0) -> QWeight:
    """A QWeight with random codes, scales and zeros in our layout (fast: no optimiser)."""
    gen = torch.Generator().manual_seed(seed)
    out, inp = shape
    M = out * inp // group
    codes = torch.randint(0, 2 ** bits, (group, M), generator=gen, dtype=torch.int32)
    q = QWeight(shape=tuple(shape), bits=bits, group_size=group, W_q=pack(codes, bits))
    if scale_group:
        assert M % scale_group == 0
        q.scale_q = torch.randint(0, 256, (scale_group, M // scale_group), generator=gen, dtype=torch.uint8)
        q.scale_z = (-40 - 20 * torch.rand((1, M // scale_group), generator=gen)).half()
        q.scale_s = (1e-3 * (1 + torch.rand((1, M // scale_group), generator=gen))).half()
    else:
        q.scale = (0.02 + 0.1 * torch.rand((1, M), generator=gen)).half()
    if quant_zero:
        q.zero_q = torch.randint(0, 256, (1, M), generator=gen, dtype=torch.uint8)
        q.zero_s, q.zero_z = torch.tensor((2 ** bits - 1) / 255).half(), torch.tensor(-3.0).half()
    else:
        q.zero = ((2 ** bits - 1) * torch.rand((1, M), generator=gen)).half()
    for name, t in q.tensors().items():
        setattr(q, name, t.to(device))
    return q


def check(y: torch.Tensor, x: torch.Tensor, w: QWeight) -> None:
    ref = F.linear(x, dequantize(w, x.dtype))
    assert y.dtype == x.dtype and y.shape == ref.shape
    scale = ref.float().abs().max().item()
    # fp32: only summation order differs. fp16: the reference rounds every weight to fp16 (we keep fp32).
    tol = 2e-6 if x.dtype == torch.float32 else 4e-3
    torch.testing.assert_close(y.float(), ref.float(), rtol=tol, atol=tol * scale)


# (bits, group, scale_group, quant_zero, shape): out a multiple of the group, never of a block; in odd.
CASES = [
    (2, 16, 24, True, (48, 40)),         # the experts' format (R = 3)
    (2, 16, None, False, (80, 24)),      # plain fp16 scale/zero
    (4, 64, 54, True, (192, 72)),        # the attention format (R = 3)
    (4, 32, None, True, (96, 20)),
    (3, 16, 16, True, (64, 36)),         # 10 codes per int32, rows padded
    (3, 128, None, False, (128, 12)),
    (8, 128, 8, True, (256, 20)),
    (8, 16, None, False, (32, 28)),
]


@pytest.mark.parametrize("bits,group,sg,qz,shape", CASES, ids=[f"{c[0]}bit-g{c[1]}-{c[4][0]}x{c[4][1]}" for c in CASES])
@pytest.mark.parametrize("T", [1, 3, 17])
def test_kernel_matches_dequantize_then_matmul(bits, group, sg, qz, shape, T):
    w = random_qweight(shape, bits, group, sg, qz, seed=bits * 1000 + group + T)
    assert fused(w)
    gen = torch.Generator().manual_seed(T)
    for dtype in (torch.float32, torch.float16):
        x = torch.randn((T, shape[1]), generator=gen).to(dtype)
        check(qlinear(x, w, "triton"), x, w)


@pytest.mark.parametrize("bits,group,sg,qz,shape", CASES, ids=[f"{c[0]}bit-g{c[1]}-{c[4][0]}x{c[4][1]}" for c in CASES])
def test_fused_gate_and_up_match_two_matmuls(bits, group, sg, qz, shape):
    """swiglu: one launch for a token (the product in fp32, rounded once), two matmuls for more tokens."""
    w1 = random_qweight(shape, bits, group, sg, qz, seed=bits * 100 + group)
    w3 = random_qweight(shape, bits, group, sg, qz, seed=bits * 100 + group + 1)
    gen = torch.Generator().manual_seed(bits)
    for dtype in (torch.float32, torch.float16):
        for T in (1, 3):
            x = (0.05 * torch.randn((T, shape[1]), generator=gen)).to(dtype)    # products stay within fp16
            a, b = (F.linear(x.float(), dequantize(w, torch.float32)) for w in (w1, w3))
            ref = F.silu(a) * b
            y = swiglu(x, w1, w3, "triton")
            assert y.dtype == dtype and y.shape == ref.shape
            tol = 2e-6 if dtype == torch.float32 else 4e-3
            scale = max(a.abs().max().item(), 1.0) * max(b.abs().max().item(), 1.0)
            torch.testing.assert_close(y.float(), ref, rtol=tol, atol=tol * scale)


def test_fused_gate_and_up_is_one_launch_only_where_it_fits():
    from mixoff_app.op_counts import count_ops

    w1, w3 = random_qweight((48, 40), 2, 16, 24, True, seed=1), random_qweight((48, 40), 2, 16, 24, True, seed=2)
    x = torch.randn(1, 40)
    swiglu(x, w1, w3, "triton")                     # loads the interpreted kernels before counting
    with count_ops() as c:
        y = swiglu(x, w1, w3, "triton")
    assert c.by_op == {"empty": 1, "triton.qgemv_swiglu_kernel": 1}, c.by_op
    other = random_qweight((48, 40), 2, 16, None, True, seed=3)     # another scale format: two launches
    with count_ops() as c:
        y2 = swiglu(x, w1, other, "triton")
    assert c.by_op["triton.qgemv_kernel"] == 2 and "triton.qgemv_swiglu_kernel" not in c.by_op
    torch.testing.assert_close(y2, F.silu(qlinear(x, w1, "torch")) * qlinear(x, other, "torch"), rtol=2e-6, atol=1e-5)
    assert torch.equal(swiglu(x, w1, w3, "torch"), F.silu(qlinear(x, w1, "torch")) * qlinear(x, w3, "torch"))
    # No configuration without split-K (a GPU with many SMs and a short weight): two split GEMVs instead.
    mod = backend("cpu")
    assert mod.swiglu_candidates(geometry((48, 4096), 2, 16), 132) == []          # R = 3 rows of groups
    assert mod.swiglu_candidates(geometry((14336, 4096), 2, 16), 132)            # Mixtral's w1/w3: fused
    g = geometry((48, 40), 2, 16)
    torch.testing.assert_close(y[0], mod.qgemv_swiglu(x[0], w1, w3, g, mod.GemvConfig(BR=1, BK=16, split=1)),
                               rtol=2e-6, atol=1e-5)


def test_prefill_sized_batch_and_hqq_quantized_weights():
    """T = 64 on weights from hqq's own optimiser, in both formats the model uses."""
    torch.manual_seed(0)
    for spec, shape in ((QuantSpec(bits=2, group_size=16, scale_group=128), (64, 64)),
                        (QuantSpec(bits=4, group_size=64, scale_group=256), (128, 64))):
        w = quantize(torch.randn(shape), spec)
        x = torch.randn(64, shape[1])
        check(qlinear(x, w, "triton"), x, w)
        check(qlinear(x[:1], w, "triton"), x[:1], w)


def test_bfloat16_activations():
    w = random_qweight((48, 40), 2, 16, 24, True)
    for T in (1, 5):
        x = torch.randn(T, 40).to(torch.bfloat16)
        y = qlinear(x, w, "triton")
        ref = F.linear(x.float(), dequantize(w, torch.float32))
        assert y.dtype == torch.bfloat16
        torch.testing.assert_close(y.float(), ref, rtol=2e-2, atol=2e-2 * ref.abs().max().item())


def test_split_k_and_multi_tile_launches():
    """The GPU's launch shapes, forced on the CPU: K split across programs, several r tiles and K steps,
    several token tiles."""
    mod = backend("cpu")
    w = random_qweight((96, 200), 2, 16, 48, True, seed=7)      # R = 6, K = 200
    g = geometry(tuple(w.shape), w.bits, w.group_size)
    x = torch.randn(40, 200)
    ref = F.linear(x, dequantize(w, x.dtype))
    for cfg in (mod.GemvConfig(BR=4, BK=16, split=3), mod.GemvConfig(BR=2, BK=64, split=1)):
        torch.testing.assert_close(mod.qgemv(x[0], w, g, cfg), ref[0], rtol=2e-6, atol=1e-5)
    y = mod.qgemm(x, w, g, mod.GemmConfig(BT=16, BR=2, BK=32))
    torch.testing.assert_close(y, ref, rtol=2e-6, atol=1e-5)


def test_leading_dims_dense_weights_and_the_stated_fallback():
    x = torch.randn(2, 3, 64)
    w = random_qweight((32, 64), 4, 64, None, True)     # out % group != 0 (the tiny model's k/v): a group
    assert not fused(w)                                  # straddles two rows -> dequantize + matmul
    assert torch.equal(qlinear(x, w, "triton"), F.linear(x, dequantize(w, x.dtype)))
    dense = torch.randn(8, 64)
    assert torch.equal(qlinear(x, dense, "triton"), F.linear(x, dense))
    w = random_qweight((32, 64), 2, 16, None, True)
    y = qlinear(x, w, "triton")
    assert y.shape == (2, 3, 32)
    check(y.reshape(6, 32), x.reshape(6, 64), w)


def test_resolving_the_kernel_flag(monkeypatch):
    from mixoff_app.kernels.cpu import probe
    assert resolve_kernel("auto", "cpu") == ("cpu" if probe().ok else "torch")      # tests/test_cpu_kernels.py
    assert resolve_kernel("torch", "cpu") == "torch"
    assert resolve_kernel("triton", "cpu") == "triton"
    with pytest.raises(ConfigError, match="unknown kernel 'cuda'"):
        resolve_kernel("cuda", "cpu")
    from mixoff_app import kernels

    def missing(interpret):
        raise ImportError("No module named 'triton'")
    monkeypatch.setattr(kernels, "_load", missing)
    kernels.backend.cache_clear()
    try:
        with pytest.raises(ConfigError, match=r"needs the triton package.*pip install triton"):
            resolve_kernel("triton", "cpu")
        assert resolve_kernel("auto", "cpu") in ("cpu", "torch")       # never triton without it
    finally:
        kernels.backend.cache_clear()


# ---- whole model ---------------------------------------------------------------------------------

def _engine(model, kernel, **kw):
    return Engine.load(EngineConfig(model=str(model), device="cpu", kernel=kernel, max_context=128, **kw))


def _parity(model, prompt_len=7, new=5):
    torch_eng, triton_eng = _engine(model, "torch"), _engine(model, "triton")
    assert (torch_eng.info.kernel, triton_eng.info.kernel) == ("torch", "triton")
    ids = torch.arange(3, 3 + prompt_len) % torch_eng.model.cfg.vocab_size
    a = torch_eng.model.forward(ids, 0, last_only=False)                  # prefill: the GEMM kernel
    b = triton_eng.model.forward(ids, 0, last_only=False)
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
    a = torch_eng.model.forward(ids[-1:], prompt_len)                       # decode: the GEMV kernel
    b = triton_eng.model.forward(ids[-1:], prompt_len)
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
    from helpers import greedy_ids
    for eng in (torch_eng, triton_eng):
        eng.forget_kv()
    assert greedy_ids(triton_eng, ids.tolist(), new) == greedy_ids(torch_eng, ids.tolist(), new)
    return triton_eng


def test_whole_model_parity_on_the_reference_layout():
    eng = _parity(REFERENCE)
    lw = eng.model.trunk.layers[0]
    ew = eng.model.cache.store.weights(0, 0)
    # Every quantized linear of the reference layout takes the fused path.
    assert all(fused(w) for w in (lw.wq, lw.wk, lw.wv, lw.wo, ew.w1, ew.w2, ew.w3))


def test_load_time_warm_up_covers_each_weight_format_once():
    from mixoff_app.engine import _warm_up_kernels
    eng = _engine(REFERENCE, "triton")
    # q/o (256x256) and k/v (64x256) at 4-bit, w1/w3 (64x256) and w2 (256x64) at 2-bit: 4 formats x 4 token
    # tiles, and the experts' fused gate/up launch once.
    assert _warm_up_kernels(eng.model, eng.model.cache.store.layout, torch.device("cpu"), torch.float32) == 17
    # A trunk MLP (a dense layer's, or a shared expert) of its own shape: its w1/w3 and w2 formats (4 token
    # tiles each) and its fused gate/up launch are warmed too, once however many layers have one.
    from mixoff_app.stores import ExpertWeights
    w1, w3 = random_qweight((48, 256), 2, 16, None, True, seed=1), random_qweight((48, 256), 2, 16, None, True, seed=2)
    shared = ExpertWeights(w1, w3, random_qweight((256, 48), 2, 16, None, True, seed=3))
    for lw in eng.model.trunk.layers:
        lw.shared = shared
    try:
        assert _warm_up_kernels(eng.model, eng.model.cache.store.layout, torch.device("cpu"), torch.float32) == 26
    finally:
        for lw in eng.model.trunk.layers:
            lw.shared = None


def test_whole_model_parity_on_our_format(tiny_dir, tmp_path):
    from mixoff_app.cli import main
    out = tmp_path / "q"
    assert main(["quantize", str(tiny_dir), str(out)]) == 0          # python -m mixoff_app quantize, in-process
    eng = _parity(out, new=4)
    ew = eng.model.cache.store.weights(0, 0)
    assert all(fused(w) for w in (eng.model.trunk.layers[0].wq, ew.w1, ew.w2, ew.w3))


def test_cli_kernel_flag_end_to_end(capsys, monkeypatch):
    from mixoff_app.cli import main
    runs = {}
    for kernel in ("torch", "triton"):
        assert main(["generate", "--model", str(REFERENCE), "--prompt", "hello", "--greedy", "--max-new-tokens", "4",
                     "--json", "--quiet", "--device", "cpu", "--kernel", kernel]) == 0
        runs[kernel] = json.loads(capsys.readouterr().out)
    assert runs["triton"]["kernel"] == "triton" and runs["torch"]["kernel"] == "torch"
    assert runs["triton"]["token_ids"] == runs["torch"]["token_ids"] and len(runs["torch"]["token_ids"]) == 4
    from mixoff_app import kernels
    monkeypatch.setattr(kernels, "_load", lambda interpret: (_ for _ in ()).throw(ImportError("no triton")))
    kernels.backend.cache_clear()
    try:
        assert main(["generate", "--model", str(REFERENCE), "--prompt", "hello", "--device", "cpu", "--kernel",
                     "triton"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: --kernel triton needs the triton package") and "Traceback" not in err
    finally:
        kernels.backend.cache_clear()


def test_kernel_benchmark_runs_on_the_cpu():
    p = subprocess.run([sys.executable, "bench/fused_kernels.py", "--tiny", "--repeats", "2"], check=False, cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out["benchmark"] == "kernels" and out["device"] == "cpu" and out["copy_GBps"] > 0
    assert {c["name"] for c in out["cases"]} >= {"expert_w1", "expert_w2", "attn_q", "attn_k"}
    for c in out["cases"]:
        assert c["max_abs_err"] <= c["tolerance"], c
        assert c["fused_s"] > 0 and c["torch_s"] > 0 and c["packed_bytes"] > 0


def test_every_gpu_launch_config_compiles_for_turing_and_hopper():
    """No GPU needed: triton's ptxas compiles each GEMV candidate, the fused gate/up GEMV's, and the GEMM's for
    one token and a prefill chunk at Mixtral's shapes, for sm_75 (T4) and sm_90 (H100/H200), without spilling
    registers."""
    import os
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("TRITON_INTERPRET=1: the kernels are interpreted")
    tools = pytest.importorskip("tools.compile_kernels")
    import triton
    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists():
        pytest.skip("this triton has no NVIDIA ptxas")
    rows = [tools.compile_one(kind, g, c, arch) for kind, _, g, c, arch in tools.configs((75, 90), gemm_tokens=(1, 512))]
    assert {r["kernel"] for r in rows} == {"gemv", "gemm", "swiglu"} and {r["arch"] for r in rows} == {75, 90}
    for r in rows:
        assert r["local_bytes"] == 0 and r["regs"] <= 255, r


# ---- on a GPU: the compiled kernels at Mixtral-8x7B's shapes ----------------------------------------

MIXTRAL = [("expert_w1", (14336, 4096), 2, 16, 128), ("expert_w2", (4096, 14336), 2, 16, 128),
           ("attn_q", (4096, 4096), 4, 64, 256), ("attn_k", (1024, 4096), 4, 64, 256)]


@pytest.mark.gpu
@pytest.mark.parametrize("name,shape,bits,group,sg", MIXTRAL, ids=[m[0] for m in MIXTRAL])
def test_cuda_kernels_match_torch_at_mixtral_shapes(name, shape, bits, group, sg):
    w = random_qweight(shape, bits, group, sg, True, device="cuda")
    assert resolve_kernel("auto", "cuda") == "triton"
    gen = torch.Generator(device="cuda").manual_seed(0)
    for dtype in (torch.float16, torch.bfloat16):
        for T in (1, 5, 64, 300):
            x = torch.randn((T, shape[1]), device="cuda", generator=gen).to(dtype)
            y = qlinear(x, w, "triton")
            ref = F.linear(x.float(), dequantize(w, torch.float32))      # fp32 reference: the kernels keep fp32
            scale = ref.abs().max().item()
            tol = 4e-3 if dtype == torch.float16 else 2e-2                # the output's own rounding
            torch.testing.assert_close(y.float(), ref, rtol=tol, atol=tol * scale)


@pytest.mark.gpu
def test_cuda_fused_gate_up_at_mixtral_shapes():
    """The experts' one-launch gate/up GEMV on the GPU: chosen for Mixtral's 14336-row experts, and equal to
    silu(W1 x) * (W3 x) computed in fp32."""
    w1 = random_qweight((14336, 4096), 2, 16, 128, True, device="cuda", seed=1)
    w3 = random_qweight((14336, 4096), 2, 16, 128, True, device="cuda", seed=2)
    mod = backend("cuda")
    assert mod.swiglu_candidates(geometry((14336, 4096), 2, 16), mod.sm_count(torch.device("cuda")))
    from mixoff_app.op_counts import count_ops
    for dtype in (torch.float16, torch.bfloat16):
        x = (0.05 * torch.randn((1, 4096), device="cuda")).to(dtype)
        swiglu(x, w1, w3, "triton")                       # tunes outside the count
        with count_ops() as c:
            y = swiglu(x, w1, w3, "triton")
        assert c.by_op.get("triton.qgemv_swiglu_kernel") == 1, c.by_op
        a, b = (F.linear(x.float(), dequantize(w, torch.float32)) for w in (w1, w3))
        ref = F.silu(a) * b
        tol = 4e-3 if dtype == torch.float16 else 2e-2
        torch.testing.assert_close(y.float(), ref, rtol=tol, atol=tol * ref.abs().max().item())


@pytest.mark.gpu
def test_cuda_whole_model_greedy_parity_on_the_reference_layout():
    runs = []
    for kernel in ("torch", "triton"):
        eng = Engine.load(EngineConfig(model=str(REFERENCE), device="cuda", kernel=kernel, dtype="float32",
                                       max_context=128))
        assert eng.info.kernel == kernel
        from helpers import greedy_ids
        runs.append(greedy_ids(eng, list(range(3, 12)), 12))
    assert runs[0] == runs[1]
