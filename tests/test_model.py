"""The runtime's logits and greedy tokens against transformers' MixtralForCausalLM on the same weights."""
from __future__ import annotations

import pytest
import torch

from mixoff_app.config import QuantConfig
from mixoff_app.quant import QWeight

from helpers import chat_ids, copy_dequantized_experts, greedy_ids, hf_greedy, load


@pytest.fixture(scope="module")
def prompt(tokenizer):
    return chat_ids(tokenizer)


@pytest.fixture(scope="module")
def reference(hf_model, prompt):
    gen = hf_greedy(hf_model, prompt, 32)
    full = torch.tensor([prompt + gen])
    with torch.no_grad():
        logits = hf_model(full).logits[0]
    return gen, full[0], logits


@pytest.mark.parametrize("k", [1, 2, 4, 8])
def test_logits_and_greedy_match_transformers(tiny_dir, reference, prompt, k):
    gen, full, ref_logits = reference
    engine = load(tiny_dir, k=k)
    # Prefill the whole sequence at once: every position's logits.
    logits = engine.model.forward(full, 0, last_only=False)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4)
    # Token-by-token decode through the cache (with evictions for k < 8) gives the same logits.
    engine.model.cache.resize(engine.model.cache.sizes, "lru")
    step_logits = [engine.model.forward(full[:len(prompt)], 0)]
    for pos in range(len(prompt), len(full) - 1):
        step_logits.append(engine.model.forward(full[pos:pos + 1], pos))
    torch.testing.assert_close(torch.cat(step_logits), ref_logits[len(prompt) - 1:-1], rtol=1e-4, atol=1e-4)
    # And greedy generation yields transformers' 32 tokens.
    assert greedy_ids(engine, prompt, 32) == gen


def test_prefetch_does_not_change_outputs(tiny_dir, prompt):
    plain = load(tiny_dir, k=2)
    fetching = load(tiny_dir, k=2, prefetch=2)
    a = greedy_ids(plain, prompt, 24)
    b = greedy_ids(fetching, prompt, 24)
    assert a == b
    assert fetching.stats().prefetch_issued > 0
    full = torch.tensor(prompt + a)
    la = torch.cat([plain.model.forward(full[:len(prompt)], 0)] +
                   [plain.model.forward(full[p:p + 1], p) for p in range(len(prompt), len(full))])
    lb = torch.cat([fetching.model.forward(full[:len(prompt)], 0)] +
                   [fetching.model.forward(full[p:p + 1], p) for p in range(len(prompt), len(full))])
    assert torch.equal(la, lb)      # bit for bit: expert outputs are summed in a fixed order


def test_quantized_runtime_matches_transformers_on_dequantized_weights(tiny_dir, hf_model, prompt):
    """With quantization on, our logits equal transformers' run on the weights we dequantize (the reference path,
    which holds the hqq formats as asked; the CPU kernels' formats: tests/test_cpu_model.py)."""
    import copy
    quant = QuantConfig.from_bits(4, 2)
    engine = load(tiny_dir, k=3, quant=quant, kernel="torch")
    ref = copy.deepcopy(hf_model)
    sd = ref.state_dict()
    for i, lw in enumerate(engine.model.trunk.layers):
        for name, w in zip(("q_proj", "k_proj", "v_proj", "o_proj"), (lw.wq, lw.wk, lw.wv, lw.wo)):
            assert isinstance(w, QWeight) and w.bits == 4
            sd[f"model.layers.{i}.self_attn.{name}.weight"].copy_(w.dequantize(torch.float32))
    copy_dequantized_experts(sd, engine, bits=2, group=16)
    full = torch.tensor(prompt)
    with torch.no_grad():
        expected = ref(full[None]).logits[0]
    got = engine.model.forward(full, 0, last_only=False)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    # Quantization really happened: the dequantized weights differ from the originals.
    assert not torch.allclose(ref.model.layers[0].mlp.experts.down_proj, hf_model.model.layers[0].mlp.experts.down_proj)
