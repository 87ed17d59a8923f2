"""The CUDA path (pinned host buffers, copy stream, events, fp16): checked against the CPU path.

Skipped without a CUDA GPU (CI has none); run on a GPU machine with ``python -m pytest -m gpu``.
"""
from __future__ import annotations

import pytest
import torch

from mixoff_app.config import NO_QUANT, CacheConfig, EngineConfig, QuantConfig, SamplingParams
from mixoff_app.engine import Engine

from helpers import chat_ids

pytestmark = pytest.mark.gpu


def load(tiny_dir, device, k, quant=NO_QUANT, dtype=None, prefetch=0, placement="inclusive"):
    return Engine.load(EngineConfig(model=str(tiny_dir), device=device, quant=quant, dtype=dtype,
                                    cache=CacheConfig(sizes=(k,), prefetch=prefetch, placement=placement),
                                    max_context=256))


@pytest.mark.parametrize("k", [1, 2, 8])
def test_cuda_logits_match_cpu_in_fp32(tiny_dir, tokenizer, k):
    ids = torch.tensor(chat_ids(tokenizer))
    cpu = load(tiny_dir, "cpu", k)
    gpu = load(tiny_dir, "cuda", k, dtype="float32")
    ref = torch.cat([cpu.model.forward(ids[:5], 0)] + [cpu.model.forward(ids[p:p + 1], p) for p in range(5, len(ids))])
    got = torch.cat([gpu.model.forward(ids[:5].cuda(), 0)] +
                    [gpu.model.forward(ids[p:p + 1].cuda(), p) for p in range(5, len(ids))]).cpu()
    torch.testing.assert_close(got, ref, rtol=1e-3, atol=1e-3)
    assert gpu.model.cache.store.pinned


@pytest.mark.parametrize("placement", ["inclusive", "exclusive"])
def test_cuda_greedy_is_the_same_with_and_without_prefetch(tiny_dir, tokenizer, placement):
    ids = chat_ids(tokenizer)
    params = SamplingParams(max_new_tokens=24, greedy=True)
    runs = []
    for prefetch in (0, 2):
        eng = load(tiny_dir, "cuda", 2, quant=QuantConfig.from_bits(4, 2), prefetch=prefetch, placement=placement)
        runs.append([e.token_id for e in eng.stream_ids(ids, params) if e.kind == "token" and e.token_id is not None])
        snap = eng.stats()
        assert snap.memory.gpu_name is not None and snap.memory.vram_total > 0
    assert runs[0] == runs[1]


def test_cuda_dequantization_matches_cpu_bit_for_bit():
    from mixoff_app.config import QuantSpec
    from mixoff_app.quant import dequantize, quantize
    torch.manual_seed(0)
    q = quantize(torch.randn(512, 256), QuantSpec(bits=2, group_size=16, scale_group=128))
    cpu = dequantize(q, torch.float16)
    for name, t in q.tensors().items():
        setattr(q, name, t.cuda())
    assert torch.equal(dequantize(q, torch.float16).cpu(), cpu)
