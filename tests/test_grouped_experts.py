"""The decode step's grouped expert loop (``MoEModel._experts_grouped``: h converted once per layer, direct calls
into the CPU kernels, outputs added rank by rank over all rows) against the per-expert loop it replaced
(``_experts_decode``), bit for bit: the same logits at every step, one row and several, through a cache with
evictions, and the same cache and routing counters. Both loops add each row's expert outputs in routing-rank
order with the same elementwise op, so nothing may move, not even a rounding.

Formats: the CPU kernels' int4 (a direct call), float32 under the CPU kernels (direct for one row, the seam for
several), hqq 4/2-bit on the reference path (the seam throughout: what a GPU without a direct call takes)."""
from __future__ import annotations

import pytest
import torch

from mixoff_app.config import NO_QUANT, CacheConfig, EngineConfig, QuantConfig
from mixoff_app.engine import Engine
from mixoff_app.kernels import cpu
from mixoff_app.tiny import make_family_checkpoint

COMMON = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
              rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
FAMILIES = {
    # fine-grained: top-8 of 32, the shape the grouped loop is for
    "qwen3_moe": dict(COMMON, num_hidden_layers=2, head_dim=16, num_experts=32, num_experts_per_tok=8,
                      moe_intermediate_size=64, intermediate_size=128, norm_topk_prob=True),
    # a gated shared expert beside the routed ones, a dense layer
    "qwen2_moe": dict(COMMON, num_hidden_layers=3, num_experts=10, num_experts_per_tok=3, moe_intermediate_size=64,
                      shared_expert_intermediate_size=128, intermediate_size=128, mlp_only_layers=[1],
                      norm_topk_prob=False, qkv_bias=True),
}
INT4 = QuantConfig.from_bits(4, 4)
FORMATS = {"int4-cpu": (INT4, "cpu"), "fp32-cpu": (NO_QUANT, "cpu"), "hqq-torch": (QuantConfig.from_bits(4, 2), "torch")}
PROMPTS = [[1, 5, 9, 200, 31], [1, 7, 7, 7, 2, 100, 50, 60], [1, 300, 301]]


@pytest.fixture(scope="module")
def folders(tiny_dir, tmp_path_factory):
    out = {"mixtral": tiny_dir}
    for name, config in FAMILIES.items():
        out[name] = make_family_checkpoint(tmp_path_factory.mktemp(name) / name, name, tiny_dir, seed=3, **config)
    return out


def decode_trace(folder, quant, kernel: str, grouped: bool, k: int, prefetch: int) -> tuple[list[torch.Tensor], tuple]:
    """Three prompts prefilled, six steps over all three rows, then four one-row steps: every step's logits,
    and the counters (the grouped loop's steps where every expert is resident take the cache's list; the
    per-expert loop always takes its generator)."""
    eng = Engine.load(EngineConfig(model=str(folder), device="cpu", quant=quant, kernel=kernel, max_context=128,
                                   max_batch=3, cache=CacheConfig(sizes=(k,), prefetch=prefetch)))
    m = eng.model
    m.grouped_experts = grouped
    pos = []
    for s, p in enumerate(PROMPTS):
        m.forward(torch.tensor(p), 0, seq=s)
        pos.append(len(p))
    ids, got = torch.tensor([11, 12, 13]), []
    for _ in range(6):
        logits = m.decode(ids, pos, [0, 1, 2])
        got.append(logits)
        ids, pos = logits.argmax(-1), [p + 1 for p in pos]
    one = ids[:1]
    for _ in range(4):
        logits = m.decode(one, pos[:1], [0])
        got.append(logits)
        one, pos = logits.argmax(-1), [pos[0] + 1] + pos[1:]
    s = eng.stats()
    return got, (s.hits, s.misses, s.evictions, s.layer_hits, s.layer_misses, s.prefetch_issued, s.prefetch_used,
                 s.prefetch_wasted, s.resident, s.last_token)


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("family", ["mixtral"] + list(FAMILIES))
def test_grouped_loop_is_the_per_expert_loop_bit_for_bit(folders, family, fmt):
    quant, kernel = FORMATS[fmt]
    if kernel == "cpu" and not cpu.probe().ok:
        pytest.skip(f"no CPU kernel here: {cpu.probe().reason}")
    k = 3 if family != "qwen3_moe" else 12          # fewer slots than the experts a step asks for: evictions
    prefetch = 1 if family == "qwen3_moe" else 0      # its 2 MoE layers: layer 0 guesses layer 1
    want, want_counts = decode_trace(folders[family], quant, kernel, False, k, prefetch)
    got, got_counts = decode_trace(folders[family], quant, kernel, True, k, prefetch)
    assert got_counts == want_counts
    assert want_counts[2] > 0                         # the cache really evicted
    for step, (g, w) in enumerate(zip(got, want)):
        assert torch.equal(g, w), f"step {step}: max diff {(g - w).abs().max().item()}"


def test_the_direct_call_is_the_seam_bit_for_bit():
    """``cpu.expert`` (bf16 rows in) is what ``swiglu`` then ``qlinear`` make from the same weights, for one
    row and several (where the kernels are row-invariant); ``cpu.dense_expert`` likewise for one float32 row."""
    if not cpu.probe().ok:
        pytest.skip(f"no CPU kernel here: {cpu.probe().reason}")
    from mixoff_app.cpu_weights import quantize_int4, quantize_int8
    from mixoff_app.kernels import qlinear, swiglu
    gen = torch.Generator().manual_seed(4)
    F_, H = 128, 64
    w1, w3, w2 = (torch.randn(F_, H, generator=gen), torch.randn(F_, H, generator=gen),
                  torch.randn(H, F_, generator=gen))
    lay = cpu.probe().layout
    for quantize in (lambda w: quantize_int4(w, 64, lay, optimize=False), quantize_int8):
        q1, q3, q2 = quantize(w1), quantize(w3), quantize(w2)
        for rows in (1, 3) if cpu.probe().rows_alone else (1,):
            x = torch.randn(rows, H, generator=gen)
            seam = qlinear(swiglu(x, q1, q3, "cpu"), q2, "cpu")
            assert torch.equal(cpu.expert(x.to(torch.bfloat16), q1, q3, q2), seam)
    x = torch.randn(1, H, generator=gen)
    assert torch.equal(cpu.dense_expert(x, w1, w3, w2), qlinear(swiglu(x, w1, w3, "cpu"), w2, "cpu"))
