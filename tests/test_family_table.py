"""Adding a family is one row of ``families.FAMILIES``: a sixth family, registered here in one row, is written,
read, planned, quantized by its own default, converted to mixoff's format and served from disk, with nothing
else edited. Its checkpoint is transformers' Qwen2-MoE under a new ``model_type`` (the row names the config
class), so transformers still runs the reference."""
from __future__ import annotations

import json

import pytest
import torch

from mixoff_app.config import FAMILY_QUANT, NO_QUANT, ConfigError, ModelConfig, QuantConfig, SamplingParams
from mixoff_app.families import FAMILIES, Family
from mixoff_app.tiny import make_family_checkpoint

from helpers import chat_ids, greedy_ids, hf_greedy, load

SIXTH = Family("sixth_moe", "mlp", ("gate_proj", "up_proj", "down_proj"), qk_norm="none", shared_expert=True,
               renorm=None, bias_key="qkv_bias", bias_default=True, bias_o=False, dense_layers="sparse_step",
               experts_key=("num_experts",), expert_size_key="moe_intermediate_size", clip_qkv=False,
               example="example-org/Sixth-MoE-Chat", hf_config="Qwen2MoeConfig", expert_bits=3, expert_group_size=64)

SHAPE = dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
             rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, num_hidden_layers=3, num_experts=12,
             num_experts_per_tok=3, moe_intermediate_size=24, shared_expert_intermediate_size=40,
             intermediate_size=56, mlp_only_layers=[1], norm_topk_prob=True, qkv_bias=True)


@pytest.fixture(scope="module")
def row():
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(FAMILIES, SIXTH.model_type, SIXTH)
        yield SIXTH


@pytest.fixture(scope="module")
def sixth(row, tiny_dir, tmp_path_factory):
    return make_family_checkpoint(tmp_path_factory.mktemp("sixth") / "sixth", row.model_type, tiny_dir, seed=3,
                                  **SHAPE)


def test_the_row_is_read_from_config_json(sixth):
    data = json.loads((sixth / "config.json").read_text())
    assert data["model_type"] == "sixth_moe"           # the family as its row names it
    cfg = ModelConfig.from_hf(data)
    assert cfg.family == "sixth_moe" and cfg.traits is SIXTH
    assert cfg.dense_layers == (1,) and cfg.shared_intermediate_size == 40 and cfg.attn_bias


def test_it_runs_as_transformers_does(sixth, tokenizer, tmp_path):
    import shutil

    from transformers import AutoModelForCausalLM
    # transformers reads the same files under its own model_type (its loader converts per-expert names by it)
    shutil.copytree(sixth, tmp_path / "as_qwen2_moe")
    conf = tmp_path / "as_qwen2_moe" / "config.json"
    conf.write_text(json.dumps(json.loads(conf.read_text()) | {"model_type": "qwen2_moe"}))
    ref = AutoModelForCausalLM.from_pretrained(str(conf.parent), dtype=torch.float32).eval()
    prompt = chat_ids(tokenizer)
    engine = load(sixth, k=2, quant=NO_QUANT)
    assert greedy_ids(engine, prompt, 16) == hf_greedy(ref, prompt, 16)
    events = list(engine.stream_chat([{"role": "user", "content": "What does len do?"}],
                                     SamplingParams(max_new_tokens=4, greedy=True)))
    assert events[-1].kind == "done" and sum(ev.kind == "token" for ev in events) >= 1


def test_its_experts_get_the_rows_default_quantization(sixth):
    engine = load(sixth, k=2, quant=FAMILY_QUANT)
    assert (engine.quant.experts.bits, engine.quant.experts.group_size) == (3, 64)
    assert "3-bit g64" in engine.info.quant and engine.info.family == "sixth_moe"
    assert QuantConfig.from_bits(4, 2).for_family("sixth_moe").experts.bits == 2     # given bits still win


def test_its_own_format_is_served_from_disk(sixth, tmp_path):
    from safetensors import safe_open

    from mixoff_app.checkpoints import save_quantized
    out = save_quantized(sixth, tmp_path / "q", FAMILY_QUANT)
    keys = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert SIXTH.expert_blob_key(2, 11) in keys and SIXTH.expert_blob_key(1, 0) not in keys   # layer 1 is dense
    with safe_open(str(out / "trunk.safetensors"), "pt") as fh:
        assert fh.metadata()["mixoff.family"] == "sixth_moe"
    prompt = list(range(5, 25))
    inclusive, disk = load(out, k=2), load(out, k=2, placement="disk")
    assert disk.info.checkpoint_format == "mixoff" and disk.quant.experts.bits == 3
    assert greedy_ids(disk, prompt, 8) == greedy_ids(inclusive, prompt, 8)


def test_a_checkpoint_without_tokenizer_asks_for_the_rows_example(sixth, tmp_path, monkeypatch):
    import shutil

    from mixoff_app.hub import ModelNotAvailable, tokenizer_source
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    (tmp_path / "bare").mkdir()
    shutil.copy2(sixth / "config.json", tmp_path / "bare" / "config.json")
    with pytest.raises(ModelNotAvailable, match="example-org/Sixth-MoE-Chat"):
        tokenizer_source(tmp_path / "bare", None, None, lambda m: None)


def test_without_its_row_the_family_is_refused_by_name(sixth, monkeypatch):
    assert "sixth_moe" in str(pytest.raises(ConfigError, ModelConfig.from_hf, {"model_type": "nope"}).value)
    monkeypatch.delitem(FAMILIES, "sixth_moe")
    with pytest.raises(ConfigError, match="'sixth_moe'; mixoff runs these MoE families: mixtral, "):
        ModelConfig.from_hf(json.loads((sixth / "config.json").read_text()))


def test_every_rows_default_expert_quantization_is_a_valid_spec():
    from mixoff_app.config import expert_quant
    specs = {name: expert_quant(f).describe() for name, f in FAMILIES.items() if f is not SIXTH}
    assert specs == {"mixtral": "2-bit g16", "qwen2_moe": "4-bit g64", "qwen3_moe": "4-bit g64",
                     "olmoe": "4-bit g64", "deepseek_v2": "4-bit g64"}
