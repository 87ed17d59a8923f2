"""The Engine's own contract: device choice, what a load reports, the KV reuse it keeps between answers,
its lock, and the refusals of bad input (the generation itself is in test_generate.py)."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from mixoff_app.config import NO_QUANT, ConfigError, EngineConfig, SamplingParams
from mixoff_app.engine import Engine, default_model, resolve_device

from helpers import chat_ids, load


@pytest.fixture(scope="module")
def engine(tiny_dir):
    return load(tiny_dir, k=3, max_context=128)


def test_device_choice_and_its_refusals():
    assert resolve_device("cpu") == torch.device("cpu")
    if torch.cuda.is_available():
        assert resolve_device(None) == resolve_device("cuda") == torch.device("cuda:0")
        return
    assert resolve_device(None) == resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ConfigError, match="--device cuda was asked for, but no CUDA GPU is visible"):
        resolve_device("cuda")
    with pytest.raises(ConfigError, match="unsupported device 'meta': use cpu or cuda"):
        resolve_device("meta")
    model, reason = default_model()
    assert model == "tiny" and reason.startswith("no CUDA GPU found")


def test_what_a_load_reports(engine, tiny_dir):
    info, cfg = engine.info, engine.model.cfg
    assert (info.num_moe_layers, info.num_experts, info.top_k) == (cfg.num_layers, cfg.num_experts, cfg.top_k) == (4, 8, 2)
    assert info.model_path == str(tiny_dir) and info.device == "cpu" and info.dtype == "float32"
    assert info.checkpoint_format == "hf" and info.quant == "attention none, experts none" and info.gpu_name is None
    assert info.max_context == engine.model.max_seq == 128
    assert info.expert_bytes == engine.model.cache.expert_bytes == 3 * 128 * 64 * 4      # w1, w2, w3 in fp32
    assert engine.model.cache.sizes == (3,) * 4
    assert engine.eos_ids == {engine.tokenizer.eos_token_id}
    # max_context is capped by what the model was trained for
    capped = Engine.load(EngineConfig(model=str(tiny_dir), device="cpu", quant=NO_QUANT, max_context=10**6))
    assert capped.info.max_context == cfg.max_position_embeddings == 2048


def test_bad_dtype_and_a_tokenizer_without_a_chat_template(tiny_dir, tmp_path):
    with pytest.raises(ConfigError, match="unsupported dtype 'int8'"):
        Engine.load(EngineConfig(model=str(tiny_dir), device="cpu", quant=NO_QUANT, dtype="int8"))
    bare = shutil.copytree(tiny_dir, tmp_path / "no-template")
    (bare / "chat_template.jinja").unlink()
    tc = json.loads((bare / "tokenizer_config.json").read_text())
    tc.pop("chat_template", None)
    (bare / "tokenizer_config.json").write_text(json.dumps(tc))
    with pytest.raises(ConfigError, match="has no chat template; pass --tokenizer"):
        Engine.load(EngineConfig(model=str(bare), device="cpu", quant=NO_QUANT))


def test_generation_config_adds_end_tokens(tiny_dir, tmp_path):
    more = shutil.copytree(tiny_dir, tmp_path / "more-eos")
    (more / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7]}))
    eng = Engine.load(EngineConfig(model=str(more), device="cpu", quant=NO_QUANT))
    assert eng.eos_ids == {2, 7}


def test_kv_reuse_between_answers(engine, tokenizer):
    prompt = chat_ids(tokenizer, "What is a list?")
    evs = list(engine.stream_ids(prompt, SamplingParams(max_new_tokens=6, greedy=True)))
    out = [e.token_id for e in evs if e.kind == "token" and e.token_id is not None]
    assert evs[-1].finish_reason == "length"
    # every generated token was fed back (its K/V serve the next turn), the last one included
    assert engine.kv_tokens == tuple(prompt + out)
    extended = prompt + out + chat_ids(tokenizer, "And a tuple?")[1:]
    list(engine.stream_ids(extended, SamplingParams(max_new_tokens=2, greedy=True)))
    assert engine.stats().prefill_tokens == len(extended) - len(prompt + out)
    engine.forget_kv()
    assert engine.kv_tokens == ()
    list(engine.stream_ids(extended, SamplingParams(max_new_tokens=2, greedy=True)))
    assert engine.stats().prefill_tokens == len(extended)


def test_the_lock_is_held_while_an_answer_streams(engine):
    stream = engine.stream_chat([{"role": "user", "content": "hello"}], SamplingParams(max_new_tokens=3, greedy=True))
    assert not engine.busy                      # nothing runs until the caller reads
    next(stream)
    assert engine.busy
    list(stream)
    assert not engine.busy


def test_raw_ids_are_checked(engine):
    with pytest.raises(ValueError, match="empty prompt"):
        list(engine.stream_ids([], SamplingParams()))
    with pytest.raises(ValueError, match="prompt of 128 tokens does not fit the context of 128"):
        list(engine.stream_ids([5] * 128, SamplingParams()))
    assert not engine.busy


def test_answer_counters_split_prefill_and_decode(engine, tokenizer):
    prompt = chat_ids(tokenizer, "Tell me about sets.")
    engine.forget_kv()
    ids = [e.token_id for e in engine.stream_ids(prompt, SamplingParams(max_new_tokens=5, greedy=True))
           if e.kind == "token" and e.token_id is not None]
    c = engine.answer_counters()
    assert c["decode"]["hits"] + c["decode"]["misses"] == 2 * 4 * len(ids)
    assert 0 < c["prefill"]["hits"] + c["prefill"]["misses"] <= 8 * 4       # one look-up per distinct expert
