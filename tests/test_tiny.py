"""Synthetic checkpoints made offline: the tokenizer, the chat template, deterministic random weights, and the
packed writer's output, loaded by the real loader and run by the real engine."""
from __future__ import annotations

import json
import shutil

import torch

from mixoff_app.checkpoints import peek_checkpoint
from mixoff_app.config import QuantConfig, SamplingParams
from mixoff_app.presets import from_name
from mixoff_app.tiny import SPECIAL_TOKENS, default_tiny_dir, ensure_tiny, random_state_dict, write_synthetic


def test_the_chat_template_is_mistrals_shape(tokenizer):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "  Hello there.  "}, {"role": "user", "content": "Bye"}]
    text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text == "<s>[INST] Be brief.\n\nHi [/INST] Hello there.</s>[INST] Bye [/INST]"
    blocks = [{"role": m["role"], "content": [{"type": "text", "text": m["content"]}]} for m in msgs]
    assert tokenizer.apply_chat_template(blocks, tokenize=False, add_generation_prompt=True) == text


def test_the_tokenizer_is_byte_level_with_single_special_tokens(tokenizer):
    for s in ("héllo wörld — ✓ 日本語 🧩", "def f(x):\n\treturn x ** 2\n", "\x00\x7f odd bytes"):
        assert tokenizer.decode(tokenizer(s)["input_ids"]) == s
    for t in SPECIAL_TOKENS:
        assert len(tokenizer(t, add_special_tokens=False)["input_ids"]) == 1, t
    assert tokenizer.convert_ids_to_tokens([tokenizer.bos_token_id, tokenizer.eos_token_id]) == ["<s>", "</s>"]


def test_random_weights_are_deterministic_per_seed_under_hub_names():
    cfg = from_name("tiny-random")
    a, b, c = random_state_dict(cfg, 0), random_state_dict(cfg, 0), random_state_dict(cfg, 1)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["lm_head.weight"], c["lm_head.weight"])
    per_expert = [k for k in a if ".block_sparse_moe.experts." in k]
    assert len(per_expert) == cfg.num_layers * cfg.num_experts * 3
    assert a["model.layers.0.block_sparse_moe.experts.7.w2.weight"].shape == (cfg.hidden_size, cfg.intermediate_size)


def test_the_packed_writer_makes_a_checkpoint_the_engine_runs(tiny_dir, tmp_path):
    from helpers import load

    out = write_synthetic(tmp_path / "packed", "tiny-random", seed=3, tokenizer_from=tiny_dir, packed=True)
    cfg, quant, layout = peek_checkpoint(out, QuantConfig())
    assert layout == "mixoff" and quant == QuantConfig()
    assert cfg.vocab_size == json.loads((tiny_dir / "config.json").read_text())["vocab_size"]
    assert (out / "tokenizer.json").read_bytes() == (tiny_dir / "tokenizer.json").read_bytes()
    eng = load(out, k=2, quant=QuantConfig())
    evs = list(eng.stream_ids([1, 5, 9, 13], SamplingParams(max_new_tokens=3, greedy=True)))
    assert evs[-1].finish_reason in ("length", "eos")
    logits = eng.model.forward(torch.tensor([1, 5]), 0)
    assert torch.isfinite(logits).all()


def test_the_tiny_model_is_built_once(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("MIXOFF_HOME", str(tmp_path / "home"))
    assert default_tiny_dir() == tmp_path / "home" / "tiny-random"
    have = shutil.copytree(tiny_dir, tmp_path / "have")
    before = {p.name: p.stat().st_mtime_ns for p in have.iterdir()}
    assert ensure_tiny(have) == have
    assert {p.name: p.stat().st_mtime_ns for p in have.iterdir()} == before      # nothing rewritten


def test_make_tiny_records_its_seed(tiny_dir):
    assert json.loads((tiny_dir / "config.json").read_text())["mixoff_tiny_seed"] == 0      # conftest's seed
