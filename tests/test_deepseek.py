"""DeepSeek-V2 beyond tests/test_families.py: the options its case there leaves at their defaults, held to
transformers' DeepseekV2ForCausalLM on the same weights (a q LoRA, YaRN RoPE with a cos/sin factor and a
softmax mscale, routed_scaling_factor, two dense layers), YaRN's numbers for DeepSeek-V2-Lite's own config, the
latent KV cache (its size, chunked prefill, the activation allowance, one host round trip per expert layer),
the CLI, and the config features mixoff does not compute, each refused in one sentence."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from mixoff_app.checkpoints import ATTN_FIELDS, CheckpointError, read_config
from mixoff_app.config import ConfigError, ModelConfig, QuantConfig
from mixoff_app.quant import QWeight
from mixoff_app.tiny import make_family_checkpoint

from helpers import chat_ids, cli, copy_dequantized_experts, greedy_ids, hf_greedy, load

HUB = Path(__file__).parent / "fixtures" / "hub_configs" / "DeepSeek-V2-Lite-Chat.json"

# q LoRA (q_a_proj -> norm -> q_b_proj); YaRN over an original context of 8 positions, so the prompt runs far
# past it, with mscale != mscale_all_dim (cos/sin factor ~1.07, softmax scale ~1.15x); routed weights x1.7;
# layers 0 and 1 dense; top-4 of 10.
CASE = dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
            num_hidden_layers=4, first_k_dense_replace=2, num_experts=10, num_experts_per_tok=4,
            moe_intermediate_size=16, intermediate_size=40, n_shared_experts=1, kv_lora_rank=24, q_lora_rank=20,
            qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=16, routed_scaling_factor=1.7,
            rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                             "original_max_position_embeddings": 8, "beta_fast": 32, "beta_slow": 1,
                             "mscale": 1.0, "mscale_all_dim": 0.5})


@pytest.fixture(scope="module")
def checkpoint(tiny_dir, tmp_path_factory):
    from transformers import AutoModelForCausalLM
    folder = make_family_checkpoint(tmp_path_factory.mktemp("ds") / "ds", "deepseek_v2", tiny_dir, seed=2, **CASE)
    ref = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    ref.eval()
    return folder, ref


@pytest.fixture(scope="module")
def prompt(tokenizer):
    return chat_ids(tokenizer)


def test_config_reads_the_options(checkpoint):
    cfg = read_config(checkpoint[0])
    assert cfg.mla and cfg.q_lora_rank == 20 and cfg.kv_lora_rank == 24 and cfg.v_head_dim == 16
    assert cfg.head_dim == 16 and cfg.qk_rope_head_dim == 8 and cfg.num_kv_heads == 4
    assert cfg.dense_layers == (0, 1) and cfg.moe_layers == (2, 3) and cfg.dense_intermediate_size == 40
    assert cfg.shared_intermediate_size == 16 and cfg.routed_scaling == 1.7 and not cfg.norm_topk_prob
    assert cfg.rope_yarn.factor == 4.0 and cfg.rope_yarn.original_max_position_embeddings == 8


def test_logits_and_greedy_match_transformers_through_an_offloading_cache(checkpoint, prompt):
    folder, ref = checkpoint
    gen = hf_greedy(ref, prompt, 12)
    full = torch.tensor(prompt + gen)
    assert len(full) > 3 * 8                      # well past YaRN's original context
    with torch.no_grad():
        expected = ref(full[None]).logits[0]
    engine = load(folder, k=10)
    torch.testing.assert_close(engine.model.forward(full, 0, last_only=False), expected, rtol=1e-4, atol=1e-4)
    for size in (2, 5):                           # fewer slots than experts: misses and evictions every token
        engine.model.cache.resize((size,) * 2, "lru")
        steps = [engine.model.forward(full[:len(prompt)], 0)]
        for pos in range(len(prompt), len(full) - 1):
            steps.append(engine.model.forward(full[pos:pos + 1], pos))
        torch.testing.assert_close(torch.cat(steps), expected[len(prompt) - 1:-1], rtol=1e-4, atol=1e-4)
        assert greedy_ids(engine, prompt, 12) == gen, f"cache size {size}"
        s = engine.stats()
        assert s.misses > 0 and s.evictions > 0 and s.num_moe_layers == 2


def test_quantized_runtime_matches_transformers_on_dequantized_weights(checkpoint, prompt):
    """q_a_proj, q_b_proj, kv_a_proj_with_mqa and o_proj 4-bit, experts 2-bit, through qlinear; the latent's
    kv_b_proj stays in the model's dtype (the absorbed attention multiplies by it per head)."""
    folder, hf = checkpoint
    engine = load(folder, k=3, quant=QuantConfig.from_bits(4, 2))
    ref = copy.deepcopy(hf)
    sd = ref.state_dict()
    for i, lw in enumerate(engine.model.trunk.layers):
        for n in ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "o_proj"):
            w = getattr(lw, ATTN_FIELDS[n])
            assert isinstance(w, QWeight) and w.bits == 4
            sd[f"model.layers.{i}.self_attn.{n}.weight"].copy_(w.dequantize(torch.float32))
        assert lw.wq is None and not isinstance(lw.wk_b, QWeight)
        for prefix, mlp in ((f"model.layers.{i}.mlp", lw.mlp), (f"model.layers.{i}.mlp.shared_experts", lw.shared)):
            if mlp is not None:
                for n, w in zip(("gate_proj", "up_proj", "down_proj"), mlp):
                    sd[f"{prefix}.{n}.weight"].copy_(w.dequantize(torch.float32))
    copy_dequantized_experts(sd, engine)
    full = torch.tensor(prompt)
    with torch.no_grad():
        expected = ref(full[None]).logits[0]
    torch.testing.assert_close(engine.model.forward(full, 0, last_only=False), expected, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(expected, hf(full[None]).logits[0], atol=1e-3)
    assert len(greedy_ids(engine, prompt, 8)) == 8


def test_yarn_numbers_are_transformers_for_deepseek_v2_lite():
    """Frequencies, the cos/sin factor and the softmax scale of the real model's config."""
    from transformers import DeepseekV2Config
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import yarn_apply_mscale

    from mixoff_app.presets import PRESETS
    from mixoff_app.rope import frequencies, softmax_scale
    raw = json.loads(HUB.read_text())
    cfg = ModelConfig.from_hf(raw)
    assert cfg == PRESETS["deepseek-v2-lite"]
    hf = DeepseekV2Config(**{k: v for k, v in raw.items() if k not in ("auto_map", "torch_dtype")})
    inv, factor = ROPE_INIT_FUNCTIONS["yarn"](hf, "cpu")
    ours, our_factor = frequencies(cfg)
    torch.testing.assert_close(ours, inv, rtol=0, atol=0)
    assert our_factor == pytest.approx(factor) == pytest.approx(1.0)       # mscale == mscale_all_dim
    assert softmax_scale(cfg) == pytest.approx(yarn_apply_mscale(hf.rope_parameters, 192 ** -0.5))
    assert softmax_scale(cfg) == pytest.approx(192 ** -0.5 * (0.1 * 0.707 * torch.tensor(40.0).log().item() + 1) ** 2)
    plain = ModelConfig.from_hf({**raw, "rope_scaling": None})
    assert not torch.allclose(frequencies(plain)[0], ours)                 # YaRN really changes them


def test_the_kv_cache_is_the_latent(checkpoint):
    engine = load(checkpoint[0], k=4, max_context=256)
    m, cfg = engine.model, engine.model.cfg
    assert m.kv.data.shape == (1, cfg.num_layers, 256, 24 + 8)       # latent + rotated key, no heads
    assert cfg.kv_width * 2 < 2 * cfg.num_heads * (cfg.head_dim + cfg.v_head_dim)


def test_chunked_prefill_equals_one_pass(checkpoint):
    m = load(checkpoint[0], k=10, max_context=256).model
    ids = torch.randint(0, m.cfg.vocab_size, (150,), generator=torch.Generator().manual_seed(0))
    whole = m.forward(ids, 0, last_only=False)
    kv = m.kv.data[0, :, :150].clone()
    m.kv.data.zero_()
    m.prefill_chunk = 32                         # chunks after the first are masked with an offset
    chunked = m.forward(ids, 0, last_only=False)
    last = m.forward(ids[:100], 0)
    cont = m.forward(ids[100:], 100)
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(m.kv.data[0, :, :150], kv, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(last, whole[99:100], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cont, whole[-1:], rtol=1e-5, atol=1e-5)


def test_activation_allowance_covers_the_measured_peak(checkpoint):
    from mixoff_app.op_counts import track_live_bytes
    from mixoff_app.plan import prefill_activations
    m = load(checkpoint[0], k=10, max_context=512).model
    ids = torch.randint(0, m.cfg.vocab_size, (400,), generator=torch.Generator().manual_seed(1))
    m.forward(ids[:8], 0)
    m.prefill_chunk = 64
    with track_live_bytes() as live:
        m.forward(ids[:300], 100)
    assert live.peak <= prefill_activations(m.cfg, 512, torch.float32, chunk=64), live.peak


def test_one_host_round_trip_per_expert_layer_when_decoding(checkpoint):
    from mixoff_app.op_counts import count_syncs
    m = load(checkpoint[0], k=3, prefetch=2).model
    m.forward(torch.arange(10), 0)
    m.forward(torch.tensor([1]), 10)
    with count_syncs() as syncs:
        for p in range(11, 15):
            m.forward(torch.tensor([p]), p)
    assert syncs.total == 4 * m.cfg.num_moe_layers          # dense layers bring nothing back


def test_generate_cli_runs_a_deepseek_checkpoint(checkpoint):
    out = json.loads(cli("generate", "--model", checkpoint[0], "--prompt", "Hello", "--max-new-tokens", 6, "--greedy",
                         "--device", "cpu", "--cache-size", 2, "--json", "--quiet").stdout)
    assert len(out["token_ids"]) == 6 and out["stats"]["misses"] > 0
    assert all(len(tok) == 2 and all(len(set(es)) == 4 for es in tok) for tok in out["routing"])


REFUSED = [
    ({"topk_method": "group_limited_greedy", "n_group": 8, "topk_group": 3}, "topk_method 'group_limited_greedy'"),
    ({"norm_topk_prob": True}, "norm_topk_prob is set"),
    ({"scoring_func": "sigmoid"}, "scoring_func 'sigmoid'"),
    ({"moe_layer_freq": 2}, "moe_layer_freq 2"),
    ({"attention_bias": True}, "attention_bias / mlp_bias"),
    ({"num_key_value_heads": 8}, "num_key_value_heads \\(8\\) must equal num_attention_heads \\(16\\)"),
    ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "rope_type 'dynamic' is not supported \\(the default RoPE or YaRN\\)"),
    ({"rope_scaling": {"type": "yarn", "original_max_position_embeddings": 4096}}, "needs its factor"),
]


@pytest.mark.parametrize("patch,sentence", REFUSED, ids=[p[1].split()[0] for p in REFUSED])
def test_what_is_not_computed_is_refused_in_one_sentence(tmp_path, patch, sentence):
    raw = json.loads(HUB.read_text()) | patch
    with pytest.raises(ConfigError, match=sentence) as e:
        ModelConfig.from_hf(raw)
    assert "\n" not in str(e.value)
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match=sentence):
        read_config(tmp_path)


@pytest.mark.parametrize("key,value", [("kv_lora_rank", "512"), ("qk_rope_head_dim", -64), ("v_head_dim", 1.5)])
def test_a_latent_size_of_the_wrong_kind_is_named(tmp_path, key, value):
    (tmp_path / "config.json").write_text(json.dumps(json.loads(HUB.read_text()) | {key: value}))
    with pytest.raises(CheckpointError, match=f"{key} must be a whole number >= 0, not {value!r}"):
        read_config(tmp_path)


def test_the_cli_refuses_grouped_routing_with_its_sentence(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(json.loads(HUB.read_text()) | {"topk_method": "noaux_tc"}))
    p = cli("generate", "--model", tmp_path, "--prompt", "Hi", "--device", "cpu", check=False)
    assert p.returncode != 0 and "topk_method 'noaux_tc' is not supported" in p.stderr
    assert "Traceback" not in p.stderr


def test_yarn_stays_refused_for_the_other_families():
    with pytest.raises(ConfigError, match="only the default RoPE"):
        ModelConfig.from_hf({"model_type": "qwen3_moe", "hidden_size": 8, "num_attention_heads": 2,
                             "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})


def test_the_app_chats_with_a_deepseek_model(checkpoint):
    """The Gradio app on a quantized DeepSeek-V2 engine with fewer slots than experts: what streams back is the
    engine's greedy answer."""
    from gradio_client import Client
    from test_ui_layout import engine_answer, stream

    from mixoff_app.ui import build_ui, launch_kwargs

    from helpers import free_port
    engine = load(checkpoint[0], k=3, quant=QuantConfig.from_bits(4, 4))
    demo = build_ui(engine, max_new_tokens=10, examples=["hello"])
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, **launch_kwargs())
    try:
        outs = stream(Client(f"http://127.0.0.1:{port}/", verbose=False), "What is a list?", max_new_tokens=10)
    finally:
        demo.close()
    assert outs and outs[-1] and outs[-1] == engine_answer(engine, [{"role": "user", "content": "What is a list?"}], 10)
    assert engine.info.family == "deepseek_v2" and engine.stats().misses > 0


# Shapes the fused kernels take (every quantized linear's rows a multiple of its group), as DeepSeek-V2-Lite's
# are: q 3072, kv_a 512 + 64, o 2048 rows; experts 1408 and 2048.
FUSED = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
             num_hidden_layers=2, first_k_dense_replace=1, num_experts=8, num_experts_per_tok=2,
             moe_intermediate_size=64, intermediate_size=128, n_shared_experts=1, kv_lora_rank=48, q_lora_rank=None,
             qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=16)


def test_fused_kernels_run_the_latent_attention(tiny_dir, tmp_path):
    pytest.importorskip("triton", reason="the kernel tests need triton (.ci/run installs it)")
    from test_kernels import _parity

    from mixoff_app.kernels import fused
    folder = make_family_checkpoint(tmp_path / "dsf", "deepseek_v2", tiny_dir, seed=3, **FUSED)
    eng = _parity(folder, new=4)
    lw = eng.model.trunk.layers[1]
    ew = eng.model.cache.store.weights(0, 0)
    assert all(fused(w) for w in (lw.wq, lw.wkv_a, lw.wo, *lw.shared, ew.w1, ew.w2, ew.w3))


@pytest.mark.gpu
def test_cuda_runs_the_latent_attention(tiny_dir, tokenizer, tmp_path):
    """On a GPU: float32 logits equal the CPU's through a cache with misses; float16 with the fused kernels
    answers with finite logits."""
    from mixoff_app.config import NO_QUANT, CacheConfig, EngineConfig
    from mixoff_app.engine import Engine
    folder = make_family_checkpoint(tmp_path / "dsg", "deepseek_v2", tiny_dir, seed=3, **FUSED)
    ids = torch.tensor(chat_ids(tokenizer))

    def eng(device, dtype=None, quant=NO_QUANT):
        return Engine.load(EngineConfig(model=str(folder), device=device, quant=quant, dtype=dtype,
                                        cache=CacheConfig(sizes=(3,)), max_context=256))
    cpu, gpu = eng("cpu"), eng("cuda", "float32")
    ref = torch.cat([cpu.model.forward(ids[:5], 0)] + [cpu.model.forward(ids[p:p + 1], p) for p in range(5, len(ids))])
    got = torch.cat([gpu.model.forward(ids[:5].cuda(), 0)] +
                    [gpu.model.forward(ids[p:p + 1].cuda(), p) for p in range(5, len(ids))]).cpu()
    torch.testing.assert_close(got, ref, rtol=1e-3, atol=1e-3)
    half = eng("cuda", "float16", QuantConfig.from_bits(4, 4))
    assert half.info.kernel == "triton"
    assert torch.isfinite(half.model.forward(ids.cuda(), 0, last_only=False)).all()
    half.forget_kv()
    assert len(greedy_ids(half, ids.tolist(), 8)) == 8 and half.stats().misses > 0
