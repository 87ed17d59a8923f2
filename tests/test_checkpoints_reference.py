"""The reference project's pre-quantized layout (made by the real hqq 0.1.1; see tests/fixtures/reference_tiny)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mixoff_app.checkpoints import load_checkpoint
from mixoff_app.config import NO_QUANT, CacheConfig, EngineConfig, SamplingParams
from mixoff_app.engine import Engine

FIXTURE = Path(__file__).parent / "fixtures" / "reference_tiny"


@pytest.fixture(scope="module")
def reference():
    return load_file(str(FIXTURE / "reference.safetensors"))


@pytest.fixture(scope="module")
def loaded():
    # The flags ask for no quantization: a pre-quantized checkpoint decides, and is never re-quantized.
    return load_checkpoint(FIXTURE, NO_QUANT, "cpu", torch.float16)


def test_layout_and_quantization_are_recognised(loaded):
    assert loaded.checkpoint_format == "reference"
    assert (loaded.quant.attn.bits, loaded.quant.attn.group_size, loaded.quant.attn.scale_group) == (4, 64, 256)
    assert (loaded.quant.experts.bits, loaded.quant.experts.group_size, loaded.quant.experts.scale_group) == (2, 16, 128)
    assert loaded.quant.attn.quant_zero and loaded.quant.experts.quant_zero


def test_every_linear_dequantizes_to_hqq_011s_weights(loaded, reference):
    checked = 0
    for i, lw in enumerate(loaded.trunk.layers):
        for name, w in zip(("q_proj", "k_proj", "v_proj", "o_proj"), (lw.wq, lw.wk, lw.wv, lw.wo)):
            assert torch.equal(w.dequantize(torch.float16), reference[f"model.layers.{i}.self_attn.{name}.weight"])
            checked += 1
        for e in range(loaded.cfg.num_experts):
            ew = loaded.store.weights(i, e)
            for name in ("w1", "w2", "w3"):
                ref = reference[f"model.layers.{i}.block_sparse_moe.experts.{e}.{name}.weight"]
                assert torch.equal(getattr(ew, name).dequantize(torch.float16), ref), (i, e, name)
                checked += 1
    assert checked == 32


def test_dequantized_weights_are_close_to_the_originals(loaded, reference):
    orig = reference["original.model.layers.0.block_sparse_moe.experts.0.w1.weight"]
    got = loaded.store.weights(0, 0).w1.dequantize(torch.float32)
    rel = (got - orig).norm() / orig.norm()
    assert rel < 0.4          # 2-bit group-16 experts
    orig = reference["original.model.layers.0.self_attn.k_proj.weight"]
    rel = (loaded.trunk.layers[0].wk.dequantize(torch.float32) - orig).norm() / orig.norm()
    assert rel < 0.15         # 4-bit group-64 attention


def test_engine_chats_on_the_reference_layout():
    engine = Engine.load(EngineConfig(model=str(FIXTURE), device="cpu", cache=CacheConfig(sizes=(2,))))
    assert engine.info.checkpoint_format == "reference" and "experts 2-bit g16" in engine.info.quant
    events = list(engine.stream_chat([{"role": "user", "content": "hello"}],
                                     SamplingParams(max_new_tokens=8, greedy=True)))
    assert events[-1].kind == "done"
    assert sum(ev.token_id is not None for ev in events if ev.kind == "token") >= 1
