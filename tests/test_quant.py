"""Our dequantization against hqq's, bit for bit; packing; our own format round-trips exactly."""
from __future__ import annotations

import pytest
import torch

from mixoff_app.config import ConfigError, QuantConfig, QuantSpec, parse_bits
from mixoff_app.quant import dequantize, pack, quantize, unpack, weight_fields


def hqq_dequantize(q, W_shape):
    """hqq's own chain: Quantizer.dequantize on the scale, the zero, then the weight (compute fp16)."""
    from hqq.core.quantize import Quantizer
    M = q.W_q.shape[1]
    common = dict(nbits=8, packing="8bit_u8", view_as_float=False, axis=0, compute_dtype=torch.float16)
    scale = q.scale if q.scale is not None else Quantizer.dequantize(
        q.scale_q, dict(common, scale=q.scale_s, zero=q.scale_z, shape=torch.Size([1, M]), group_size=q.scale_q.shape[0]))
    zero = q.zero if q.zero is not None else Quantizer.dequantize(
        q.zero_q, dict(common, scale=q.zero_s, zero=q.zero_z, shape=torch.Size([1, M]), group_size=None))
    return Quantizer.dequantize(q.W_q, dict(nbits=q.bits, packing=Quantizer.bit_to_packing[q.bits], view_as_float=False,
                                            axis=0, compute_dtype=torch.float16, scale=scale, zero=zero,
                                            shape=W_shape, group_size=q.group_size))


@pytest.mark.parametrize("bits,group,scale_group", [(2, 16, 128), (3, 64, 128), (4, 64, 256), (8, 64, 128),
                                                     (4, 64, 1000)])
def test_dequantize_equals_hqq_bit_for_bit(bits, group, scale_group):
    torch.manual_seed(bits)
    W = torch.randn(256, 128)
    q = quantize(W, QuantSpec(bits=bits, group_size=group, scale_group=scale_group))
    assert q.bits == bits and q.W_q.dtype == (torch.int32 if bits == 3 else torch.uint8)
    if scale_group == 1000:          # does not divide the scale count: the scale stays fp16
        assert q.scale is not None and q.scale_q is None
    ours = dequantize(q, torch.float16)
    assert torch.equal(ours, hqq_dequantize(q, W.shape))
    err = (ours.float() - W).abs().mean().item()
    assert err < {2: 0.35, 3: 0.2, 4: 0.1, 8: 0.01}[bits]     # and it approximates the weight
    # The stored tensors are exactly the fields the layout promises (names, shapes, dtypes).
    fields = {f.name.split(".", 1)[1]: f for f in weight_fields("w", tuple(W.shape), q and QuantSpec(
        bits=bits, group_size=group, scale_group=scale_group), torch.float16)}
    assert set(fields) == set(q.tensors())
    for name, t in q.tensors().items():
        assert tuple(t.shape) == fields[name].shape and t.dtype == fields[name].dtype, name


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_matches_hqq_bitpack(bits):
    from hqq.core.quantize import Quantizer
    codes = torch.randint(0, 2 ** bits, (40 if bits == 3 else 64, 24), dtype=torch.uint8)
    ours = pack(codes, bits)
    assert torch.equal(ours, Quantizer.pack[Quantizer.bit_to_packing[bits]](codes))
    assert torch.equal(unpack(ours, bits, codes.shape[0], torch.uint8), codes)


def test_unsupported_bits_are_refused_clearly():
    with pytest.raises(ConfigError, match="unsupported bit width 5"):
        parse_bits("5")
    with pytest.raises(ConfigError, match="unsupported bit width 1"):
        QuantSpec(bits=1)
    with pytest.raises(ConfigError, match="or 'none'"):
        parse_bits("two")
    assert parse_bits("none") is None and parse_bits("4") == 4
    with pytest.raises(ValueError, match="group size 48 does not divide"):
        quantize(torch.randn(10, 10), QuantSpec(bits=4, group_size=48))


def test_own_format_round_trips_exactly(tiny_dir, tmp_path):
    from mixoff_app.checkpoints import load_checkpoint, save_quantized
    from mixoff_app.quant import QWeight
    quant = QuantConfig.from_bits(4, 2)
    out = save_quantized(tiny_dir, tmp_path / "q", quant)
    a = load_checkpoint(tiny_dir, quant, "cpu", torch.float16)        # quantized while loading
    b = load_checkpoint(out, QuantConfig.from_bits(None, None), "cpu", torch.float16)   # read back
    assert (a.checkpoint_format, b.checkpoint_format) == ("hf", "mixoff")
    assert b.quant == quant                                              # the file decides, not the flags
    for la, lb in zip(a.trunk.layers, b.trunk.layers):
        for wa, wb in zip((la.wq, la.wk, la.wv, la.wo), (lb.wq, lb.wk, lb.wv, lb.wo)):
            assert isinstance(wb, QWeight)
            assert wa.tensors().keys() == wb.tensors().keys()
            for k in wa.tensors():
                assert torch.equal(wa.tensors()[k], wb.tensors()[k]), k
        assert torch.equal(la.gate, lb.gate)
    for layer in range(a.cfg.num_layers):
        for e in range(a.cfg.num_experts):
            assert torch.equal(a.store.buffer(layer, e), b.store.buffer(layer, e))
    assert torch.equal(a.trunk.embed, b.trunk.embed)
