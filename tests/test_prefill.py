"""Chunked prefill: the same logits and KV cache as one pass, with activations bounded by the chunk, and the
planner's activation allowance above the measured peak of a chunk (model and dequantization, on the CPU)."""
from __future__ import annotations

import pytest
import torch

from mixoff_app.config import NO_QUANT, QuantConfig
from mixoff_app.op_counts import track_live_bytes
from mixoff_app.plan import dequant_scratch, model_sizes, prefill_activations

from helpers import load


@pytest.fixture(scope="module")
def plain(tiny_dir):
    return load(tiny_dir, k=8, max_context=512)


def test_chunked_prefill_equals_one_pass(plain):
    m = plain.model
    ids = torch.randint(0, m.cfg.vocab_size, (150,), generator=torch.Generator().manual_seed(0))
    m.prefill_chunk = 512
    whole = m.forward(ids, 0, last_only=False)
    kv = m.kv.data[0, :, :, :, :150].clone()
    m.kv.data.zero_()
    m.prefill_chunk = 32                           # 5 chunks, the last one short; chunks after the first are masked
    try:
        chunked = m.forward(ids, 0, last_only=False)
        last = m.forward(ids[:100], 0)
        cont = m.forward(ids[100:], 100)           # a continued prompt (a later chat turn): an offset mask
    finally:
        m.prefill_chunk = 512
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(m.kv.data[0, :, :, :, :150], kv, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(last, whole[99:100], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cont, whole[-1:], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("quantized", [False, True])
def test_activation_allowance_covers_the_measured_peak(tiny_dir, quantized):
    quant = QuantConfig() if quantized else NO_QUANT
    eng = load(tiny_dir, k=8, quant=quant, max_context=512)
    m, cfg = eng.model, eng.model.cfg
    ids = torch.randint(0, cfg.vocab_size, (400,), generator=torch.Generator().manual_seed(1))
    m.forward(ids[:8], 0)                                  # first-use buffers (unpack shifts) are not activations
    m.prefill_chunk = 64
    peaks = {}
    for name, t, pos in (("first", ids[:400], 0), ("continued", ids[:300], 100)):
        with track_live_bytes() as live:
            m.forward(t, pos)
        peaks[name] = live.peak
    s = model_sizes(cfg, quant, 512, torch.float32)
    allowance = prefill_activations(cfg, 512, torch.float32, chunk=64) + (s.scratch if quantized else 0)
    assert max(peaks.values()) <= allowance, (peaks, allowance)
    # A 400-token prompt in 64-token chunks needs what one chunk needs, not what the prompt would.
    assert allowance < prefill_activations(cfg, 512, torch.float32, chunk=400)
    if quantized:
        assert s.scratch == max(dequant_scratch(shape, quant.experts, torch.float32)
                                for shape in m.cache.store.layout.shapes) or s.scratch > 0


def test_expert_outputs_stay_in_the_activation_dtype(tiny_dir):
    """No float32 rows of H or F in the MoE of a bfloat16 model, prefill or decode, beyond the RMSNorm's
    float32 statistics (the reference computes those in float32 too)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from mixoff_app.config import CacheConfig, EngineConfig
    from mixoff_app.engine import Engine

    eng = Engine.load(EngineConfig(model=str(tiny_dir), device="cpu", quant=NO_QUANT, dtype="bfloat16",
                                   cache=CacheConfig(sizes=(2,)), max_context=64))
    m, cfg = eng.model, eng.model.cfg
    wide = []
    aten = torch.ops.aten
    norm_ops = {aten._to_copy.default, aten.to.dtype, aten.rms_norm.default, aten.pow.Tensor_Scalar, aten.mean.dim, aten.add.Tensor, aten.add_.Tensor,
                aten.rsqrt.default, aten.mul.Tensor}

    class Watch(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if isinstance(out, torch.Tensor) and out.dtype == torch.float32 and out.dim() \
                    and out.shape[-1] in (cfg.hidden_size, cfg.intermediate_size) and func not in norm_ops:
                wide.append(str(func))
            return out

    def watched(fn):
        def run(*a):
            with Watch():
                return fn(*a)
        return run

    m._moe_prefill, m.layer_host = watched(m._moe_prefill), watched(m.layer_host)
    m.forward(torch.arange(10), 0)
    m.forward(torch.tensor([3]), 10)
    assert wide == [], wide
