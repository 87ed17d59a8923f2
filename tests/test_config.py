"""Frozen configuration: what each dataclass accepts, what it refuses (with a sentence a person can act
on), and the Hugging Face config.json round trip."""
from __future__ import annotations

import dataclasses
import json

import pytest

from mixoff_app.config import (NO_QUANT, SUPPORTED_BITS, ConfigError, ModelConfig, QuantConfig, QuantSpec,
                               SamplingParams, parse_bits)

SHAPE = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=4, num_heads=4, num_kv_heads=2,
             head_dim=16, num_experts=8, top_k=2)


def test_model_config_round_trips_through_config_json():
    cfg = ModelConfig(**SHAPE, rope_theta=1e4, max_position_embeddings=1024, eos_token_id=5)
    back = ModelConfig.from_hf(json.loads(json.dumps(cfg.to_hf())))
    assert back == cfg


def test_model_config_reads_both_spellings_of_transformers():
    hf = ModelConfig(**SHAPE).to_hf()
    del hf["head_dim"], hf["rope_theta"]
    v5 = hf | {"rope_parameters": {"rope_type": "default", "rope_theta": 5e5}, "eos_token_id": [7, 9]}
    cfg = ModelConfig.from_hf(v5)
    assert cfg.rope_theta == 5e5 and cfg.eos_token_id == 7 and cfg.head_dim == 64 // 4
    with pytest.raises(ConfigError, match="rope_type 'yarn' is not supported"):
        ModelConfig.from_hf(hf | {"rope_parameters": {"rope_type": "yarn"}})


@pytest.mark.parametrize("change,msg", [
    ({"num_kv_heads": 3}, r"num_attention_heads \(4\) must be a multiple of num_key_value_heads \(3\)"),
    ({"top_k": 9}, r"num_experts_per_tok \(9\) must be within 1..num_local_experts \(8\)"),
    ({"top_k": 0}, r"num_experts_per_tok \(0\)"),
])
def test_impossible_shapes_are_refused(change, msg):
    with pytest.raises(ConfigError, match=msg):
        ModelConfig(**(SHAPE | change))


def test_quant_specs():
    for bits in SUPPORTED_BITS:
        assert QuantSpec(bits=bits).describe() == f"{bits}-bit g64"
    assert QuantSpec().describe() == "none" and not QuantSpec().enabled
    with pytest.raises(ConfigError, match="unsupported bit width 5"):
        QuantSpec(bits=5)
    with pytest.raises(ConfigError, match="group size 12 must be a positive multiple of 8"):
        QuantSpec(bits=4, group_size=12)
    q = QuantConfig()
    assert (q.attn.bits, q.attn.group_size, q.experts.bits, q.experts.group_size) == (4, 64, 2, 16)
    mixed = QuantConfig.from_bits(None, 3)
    assert not mixed.attn.enabled and mixed.experts.bits == 3 and mixed.experts.group_size == 16
    assert not NO_QUANT.attn.enabled and not NO_QUANT.experts.enabled


@pytest.mark.parametrize("text,bits", [("none", None), (" Off ", None), ("16", None), (None, None),
                                       ("2", 2), (4, 4), ("8", 8)])
def test_parse_bits(text, bits):
    assert parse_bits(text) == bits


@pytest.mark.parametrize("text", ["5", "two", 1.5, ""])
def test_parse_bits_refuses(text):
    with pytest.raises(ConfigError, match="bit"):
        parse_bits(text)


def test_sampling_greedy_and_frozen():
    assert SamplingParams(greedy=True).is_greedy and SamplingParams(temperature=0).is_greedy
    assert not SamplingParams().is_greedy
    with pytest.raises(ConfigError, match="max_new_tokens must be a whole number >= 1, not 2.5"):
        SamplingParams(max_new_tokens=2.5)
    with pytest.raises(dataclasses.FrozenInstanceError):
        SamplingParams().temperature = 1.0
