"""Every family in families.py against transformers' own implementation of its ``model_type``.

Tiny random checkpoints are written by transformers' ``save_pretrained`` (so the files hold the hub's
per-expert names) with shapes beyond the defaults: top-k 3, 4 and 8; 10 to 64 experts; intermediate sizes
that are not powers of two; a shared expert on and off, gated and not; both ``norm_topk_prob`` values; dense
layers (``mlp_only_layers``, ``decoder_sparse_step``, ``first_k_dense_replace``); q/k/v biases, q/k norms per
head and per projection, ``clip_qkv``; DeepSeek-V2's multi-head latent attention (tests/test_deepseek.py has
its own options: the q LoRA, YaRN, routed_scaling_factor, and what is refused). Logits are compared in float32 for a whole-sequence prefill and a token-by-token decode
through a cache with evictions, greedy tokens at several cache sizes, and with quantization on against
transformers run on the weights we dequantized.
"""
from __future__ import annotations

import copy
import json

import pytest
import torch

from mixoff_app.checkpoints import ATTN_FIELDS
from mixoff_app.config import ConfigError, ModelConfig, QuantConfig
from mixoff_app.quant import QWeight
from mixoff_app.tiny import make_family_checkpoint

from helpers import chat_ids, copy_dequantized_experts, graph_path_matches_eager, greedy_ids, hf_greedy, load

COMMON = dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
              rope_parameters={"rope_type": "default", "rope_theta": 10000.0})

CASES = {
    # shared expert, q/k/v bias, norm_topk_prob off, a dense layer by mlp_only_layers, top-3 of 10
    "qwen2_moe": dict(COMMON, num_hidden_layers=3, num_experts=10, num_experts_per_tok=3,
                      moe_intermediate_size=24, shared_expert_intermediate_size=40, intermediate_size=56,
                      mlp_only_layers=[1], norm_topk_prob=False, qkv_bias=True),
    # per-head q/k norm, explicit head_dim != hidden/heads, norm_topk_prob on, dense layers by
    # decoder_sparse_step (layers 0 and 2), top-8 of 64
    "qwen3_moe": dict(COMMON, num_hidden_layers=4, head_dim=12, num_experts=64, num_experts_per_tok=8,
                      moe_intermediate_size=20, intermediate_size=48, decoder_sparse_step=2,
                      norm_topk_prob=True),
    # q/k norm over the whole projection, clip_qkv (low enough to bite), top-4 of 16, no renorm
    "olmoe": dict(COMMON, num_hidden_layers=2, num_experts=16, num_experts_per_tok=4, intermediate_size=24,
                  clip_qkv=1.5, norm_topk_prob=False),
    # multi-head latent attention (latent 16, rope 8 of a 20-wide q/k head, v 12), a dense first layer, two
    # ungated shared experts, rms_norm_eps unlike the latent norm's fixed 1e-6; top-3 of 12
    "deepseek_v2": dict(COMMON, num_key_value_heads=4, num_hidden_layers=3, num_experts=12, num_experts_per_tok=3,
                        moe_intermediate_size=24, intermediate_size=56, n_shared_experts=2, first_k_dense_replace=1,
                        kv_lora_rank=16, q_lora_rank=None, qk_nope_head_dim=12, qk_rope_head_dim=8, v_head_dim=12,
                        rms_norm_eps=1e-5, norm_topk_prob=False),
}


@pytest.fixture(scope="module", params=list(CASES))
def family(request, tiny_dir, tmp_path_factory):
    """(model_type, checkpoint folder, transformers reference model)."""
    from transformers import AutoModelForCausalLM
    name = request.param
    folder = make_family_checkpoint(tmp_path_factory.mktemp(name) / name, name, tiny_dir, seed=1, **CASES[name])
    ref = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    ref.eval()
    return name, folder, ref


@pytest.fixture(scope="module")
def prompt(tokenizer):
    return chat_ids(tokenizer)


def test_config_reads_the_family(family):
    name, folder, ref = family
    cfg = ModelConfig.from_hf(json.loads((folder / "config.json").read_text()))
    c = CASES[name]
    assert cfg.family == name and cfg.top_k == c["num_experts_per_tok"] and cfg.num_experts == c["num_experts"]
    assert cfg.intermediate_size == c.get("moe_intermediate_size", c["intermediate_size"])
    assert cfg.norm_topk_prob == c["norm_topk_prob"]
    # Where transformers put an MoE block is where we route; everything else is a dense layer.
    moe = tuple(i for i, layer in enumerate(ref.model.layers) if hasattr(layer.mlp, "experts"))
    assert cfg.moe_layers == moe and cfg.num_moe_layers == len(moe)
    assert bool(cfg.shared_intermediate_size) == (name in ("qwen2_moe", "deepseek_v2"))


def test_logits_and_greedy_match_transformers(family, prompt):
    name, folder, ref = family
    gen = hf_greedy(ref, prompt, 12)
    full = torch.tensor(prompt + gen)
    with torch.no_grad():
        ref_logits = ref(full[None]).logits[0]
    E, k = CASES[name]["num_experts"], CASES[name]["num_experts_per_tok"]
    engine = load(folder, k=E)
    got = engine.model.forward(full, 0, last_only=False)                 # prefill, every position
    torch.testing.assert_close(got, ref_logits, rtol=1e-4, atol=1e-4)
    for size in (1, k + 1, E):
        cache = engine.model.cache
        cache.resize((size,) * cfg_layers(engine), "lru")
        steps = [engine.model.forward(full[:len(prompt)], 0)]
        for pos in range(len(prompt), len(full) - 1):                    # decode through the cache
            steps.append(engine.model.forward(full[pos:pos + 1], pos))
        torch.testing.assert_close(torch.cat(steps), ref_logits[len(prompt) - 1:-1], rtol=1e-4, atol=1e-4)
        assert greedy_ids(engine, prompt, 12) == gen, f"cache size {size}"
    s = engine.stats()
    assert s.num_moe_layers == engine.model.cfg.num_moe_layers and s.top_k == k
    assert all(len(ex) == k for tok in engine.last_routing for ex in tok)


def test_the_cuda_graph_path_is_the_eager_path(family, prompt):
    """``--cuda-graphs`` replays the model's own layer halves (``layer_device`` over a static step, then
    ``layer_host``) for every family: uncaptured on the CPU, the same logits and counters as eager decode."""
    name, folder, ref = family
    graph_path_matches_eager(folder, prompt, k=2, prefetch=2)


def cfg_layers(engine) -> int:
    return engine.model.cfg.num_moe_layers


@pytest.fixture(scope="module")
def quantized(family):
    """The family's checkpoint quantized while loading (attention 4-bit g64, experts 2-bit g16)."""
    return load(family[1], k=3, quant=QuantConfig.from_bits(4, 2))


def test_quantized_runtime_matches_transformers_on_dequantized_weights(family, quantized, prompt):
    name, folder, hf = family
    engine = quantized
    cfg = engine.model.cfg
    ref = copy.deepcopy(hf)
    sd = ref.state_dict()
    n_quant = 0

    def put(key, w):
        nonlocal n_quant
        assert isinstance(w, QWeight)
        sd[key].copy_(w.dequantize(torch.float32))
        n_quant += 1

    for i, lw in enumerate(engine.model.trunk.layers):
        p = f"model.layers.{i}."
        for n in cfg.attention_shapes():          # q/k/v/o, or MLA's q, kv_a_proj_with_mqa and o
            put(f"{p}self_attn.{n}.weight", getattr(lw, ATTN_FIELDS[n]))
        for prefix, mlp in ((f"{p}mlp", lw.mlp), (f"{p}mlp.{cfg.traits.shared_name}", lw.shared)):
            if mlp is not None:
                for n, w in zip(("gate_proj", "up_proj", "down_proj"), mlp):
                    put(f"{prefix}.{n}.weight", w)
    copy_dequantized_experts(sd, engine, bits=2, group=16)
    expected_mlps = len(cfg.dense_layers) + (cfg.num_moe_layers if cfg.shared_intermediate_size else 0)
    assert n_quant == len(cfg.attention_shapes()) * cfg.num_layers + 3 * expected_mlps
    full = torch.tensor(prompt)
    with torch.no_grad():
        expected = ref(full[None]).logits[0]
    got = engine.model.forward(full, 0, last_only=False)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(expected, hf(full[None]).logits[0], atol=1e-3)   # quantization really happened


def test_own_format_records_the_family_and_reloads_identically(family, quantized, prompt, tmp_path):
    from mixoff_app.checkpoints import save_quantized
    name, folder, _ = family
    out = save_quantized(folder, tmp_path / "q", QuantConfig.from_bits(4, 2))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert any(".mlp.experts.0.packed" in k for k in index["weight_map"])
    from safetensors import safe_open
    with safe_open(str(out / "trunk.safetensors"), "pt") as fh:
        assert fh.metadata()["mixoff.family"] == name
    b = load(out, k=2)
    assert b.info.checkpoint_format == "mixoff" and b.info.family == name
    ids = torch.tensor(prompt)
    # Same codes; the format stores the unquantized trunk (norms, biases, embeddings) in float16.
    torch.testing.assert_close(b.model.forward(ids, 0, last_only=False),
                               quantized.model.forward(ids, 0, last_only=False), rtol=1e-2, atol=1e-2)
    disk = load(out, k=2, placement="disk")
    assert greedy_ids(disk, prompt, 8) == greedy_ids(b, prompt, 8)


def test_other_model_types_are_refused_with_the_supported_list():
    with pytest.raises(ConfigError, match=r"'deepseek_v3'.*mixtral, qwen2_moe, qwen3_moe, olmoe, deepseek_v2"):
        ModelConfig.from_hf({"model_type": "deepseek_v3", "hidden_size": 8})


HUB_CONFIGS = {"Qwen/Qwen3-30B-A3B-Instruct-2507": "qwen3-30b-a3b", "Qwen/Qwen1.5-MoE-A2.7B-Chat": "qwen1.5-moe-a2.7b",
               "allenai/OLMoE-1B-7B-0924-Instruct": "olmoe-1b-7b",
               "mistralai/Mixtral-8x22B-Instruct-v0.1": "mixtral-8x22b",
               "mistralai/Mixtral-8x7B-Instruct-v0.1": "mixtral-8x7b",
               "deepseek-ai/DeepSeek-V2-Lite-Chat": "deepseek-v2-lite"}


@pytest.mark.parametrize("repo", list(HUB_CONFIGS))
def test_hub_configs_read_as_the_presets(repo):
    from pathlib import Path

    from mixoff_app.presets import PRESETS, preset_name
    hf = json.loads((Path(__file__).parent / "fixtures" / "hub_configs" / f"{repo.split('/')[1]}.json").read_text())
    cfg = ModelConfig.from_hf(hf)
    preset = PRESETS[HUB_CONFIGS[repo]]
    # The runtime's shapes equal the preset's (token ids and the context length are not shapes).
    same = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
            "num_experts", "top_k", "family", "norm_topk_prob", "shared_intermediate_size", "dense_layers",
            "attn_bias", "clip_qkv", "rope_theta", "rms_norm_eps", "kv_lora_rank", "q_lora_rank", "qk_rope_head_dim",
            "v_head_dim", "routed_scaling", "rope_yarn", "dense_intermediate_size")
    assert {k: getattr(cfg, k) for k in same} == {k: getattr(preset, k) for k in same}
    assert preset_name(repo) == HUB_CONFIGS[repo]          # the planner answers before a download


def test_a_hub_family_model_is_planned_from_its_config_before_any_weight(tmp_path):
    """The hub path: config.json alone is read (here from a folder that has nothing else) and a model that
    cannot fit the budget is refused before a weight is fetched or read."""
    import shutil
    from pathlib import Path

    from mixoff_app.config import CacheConfig, EngineConfig
    from mixoff_app.engine import Engine
    shutil.copy2(Path(__file__).parent / "fixtures" / "hub_configs" / "Qwen3-30B-A3B-Instruct-2507.json",
                 tmp_path / "config.json")
    with pytest.raises(ConfigError, match="does not fit"):
        Engine.load(EngineConfig(model=str(tmp_path), device="cpu", vram_budget=2 << 30, ram_budget=4 << 30,
                                 cache=CacheConfig()))


def test_a_family_checkpoint_without_tokenizer_asks_for_its_family_base(family, tmp_path, monkeypatch):
    import shutil

    from mixoff_app.hub import ModelNotAvailable, tokenizer_source
    name, folder, _ = family
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy2(folder / "config.json", bare / "config.json")
    from mixoff_app.families import FAMILIES
    with pytest.raises(ModelNotAvailable, match=FAMILIES[name].example):
        tokenizer_source(bare, None, None, lambda m: None)


def test_prefetch_guesses_k_experts_across_dense_layers_without_changing_outputs(family, prompt):
    """The prefetcher guesses ``top_k`` experts of the next expert layer (dense layers in between have none),
    and its copies never change what is computed."""
    name, folder, _ = family
    k = CASES[name]["num_experts_per_tok"]
    plain, fetching = load(folder, k=k + 1), load(folder, k=k + 1, prefetch=k)
    assert greedy_ids(plain, prompt, 8) == greedy_ids(fetching, prompt, 8)
    s = fetching.stats()
    if fetching.model.cfg.num_moe_layers > 1:
        assert s.prefetch_issued > 0
    assert s.num_moe_layers == fetching.model.cfg.num_moe_layers == len(s.layer_hits)


def test_plan_presets_table_has_a_row_per_model_with_its_family_quantization():
    from mixoff_app.config import FAMILY_QUANT
    from mixoff_app.plan import presets_markdown
    table = presets_markdown(FAMILY_QUANT, 12, 32)
    rows = {line.split(" | ")[0].lstrip("| ").split(" (")[0]: line for line in table.splitlines()[2:]}
    assert set(rows) == {"mixtral-8x7b", "mixtral-8x22b", "qwen3-30b-a3b", "qwen1.5-moe-a2.7b", "olmoe-1b-7b",
                         "deepseek-v2-lite"}
    assert "2-bit g16" in rows["mixtral-8x7b"] and "4-bit g64" in rows["qwen3-30b-a3b"]
    assert "/6144 |" in rows["qwen3-30b-a3b"] and "1440/1440" in rows["qwen1.5-moe-a2.7b"]


def test_planner_sizes_are_the_family_models_bytes(family, quantized):
    """The planner's device bytes (trunk with biases, q/k norms, dense MLPs and shared experts; slots; KV)
    equal what the loaded engine holds, tensor by tensor."""
    from mixoff_app.memory import device_tensor_bytes
    from mixoff_app.plan import device_need, model_sizes
    m = quantized.model
    s = model_sizes(m.cfg, quantized.quant, m.max_seq, torch.float32)
    assert s.num_moe_layers == m.cfg.num_moe_layers and s.expert == m.cache.store.layout.nbytes
    assert s.all_experts == m.cache.store.nbytes
    assert device_tensor_bytes(m) == device_need(s, "inclusive", m.cache.sizes, cuda=False)
