"""The headless CLI contract: flags, --json fields, counters, and clear errors."""
from __future__ import annotations

import json

import pytest

from helpers import chat_ids, cli, hf_greedy


def test_generate_json_matches_transformers_for_every_cache_size(tiny_dir, hf_model, tokenizer):
    expected = hf_greedy(hf_model, chat_ids(tokenizer, "Hello"), 16)
    for k in (1, 2, 4, 8):
        out = json.loads(cli("generate", "--model", tiny_dir, "--prompt", "Hello", "--max-new-tokens", 16, "--greedy",
                             "--attn-bits", "none", "--expert-bits", "none", "--device", "cpu", "--json",
                             "--cache-size", k, "--quiet").stdout)
        assert out["token_ids"] == expected, k
        assert out["cache_size"] == k and out["cache_sizes"] == [k] * 4
        s, L, top_k = out["stats"], 4, 2
        assert s["hits"] + s["misses"] == top_k * L * len(out["token_ids"])
        assert s["bytes_h2d"] == s["misses"] * s["expert_bytes"]
        assert 0 <= s["hit_rate"] <= 1 and s["tokens_per_s"] > 0 and s["prefill_s"] > 0 and s["decode_s"] > 0
        assert len(out["routing"]) == len(out["token_ids"])
        assert all(len(tok) == L and all(len(set(es)) == top_k for es in tok) for tok in out["routing"])
        if k == 8:
            assert s["evictions"] == 0
        full = tokenizer.decode(out["token_ids"], skip_special_tokens=True)
        assert out["text"] == full.removesuffix("\ufffd") and out["finish_reason"] == "length"


def test_quantized_generation_runs(tiny_dir):
    out = json.loads(cli("generate", "--model", tiny_dir, "--prompt", "Hi", "--max-new-tokens", 6, "--greedy",
                         "--cache-size", 2, "--device", "cpu", "--json", "--quiet").stdout)
    assert out["quant"] == "attention 4-bit g64, experts 2-bit g16"
    assert len(out["token_ids"]) == 6


def test_cache_size_takes_one_k_per_layer(tiny_dir):
    """--cache-size 1,2,3,4: each expert layer its own k; --json gives them all (cache_size: the smallest)."""
    out = json.loads(cli("generate", "--model", tiny_dir, "--prompt", "Hi", "--max-new-tokens", 4, "--greedy",
                         "--cache-size", "1,2,3,4", "--device", "cpu", "--json", "--quiet").stdout)
    assert out["cache_sizes"] == [1, 2, 3, 4] and out["cache_size"] == 1
    p = cli("generate", "--model", tiny_dir, "--prompt", "Hi", "--cache-size", "1,2", "--device", "cpu", check=False)
    assert p.returncode == 2 and "2 per-layer cache sizes given for 4 layers" in p.stderr


@pytest.mark.parametrize("args,msg", [
    (["--expert-bits", "5"], "unsupported bit width 5"),
    (["--cache-size", "9"], "cache size 9 must be between 1 and the number of experts"),
    (["--cache-size", "0"], "must be at least 1"),
    (["--model", "/nonexistent/folder/x"], "neither a local folder"),
    (["--top-p", "0"], "top_p must be in"),
])
def test_bad_flags_give_clear_errors(tiny_dir, args, msg):
    base = ["generate", "--model", tiny_dir, "--prompt", "Hi", "--max-new-tokens", "2", "--device", "cpu"]
    p = cli(*base, *args, check=False)
    assert p.returncode == 2
    assert msg in p.stderr
    assert "Traceback" not in p.stderr


def test_make_tiny_is_deterministic(tmp_path, tiny_dir):
    cli("make-tiny", tmp_path / "a", "--seed", 0)
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tiny_dir / "model.safetensors").read_bytes()
    cli("make-tiny", tmp_path / "b", "--seed", 1)
    assert (tmp_path / "b" / "model.safetensors").read_bytes() != (tiny_dir / "model.safetensors").read_bytes()


def test_quantize_then_generate_from_our_format(tiny_dir, tmp_path):
    cli("quantize", tiny_dir, tmp_path / "q", "--attn-bits", "4", "--expert-bits", "2")
    a = json.loads(cli("generate", "--model", tiny_dir, "--prompt", "Hi", "--max-new-tokens", 8, "--greedy",
                       "--device", "cpu", "--json", "--quiet").stdout)
    b = json.loads(cli("generate", "--model", tmp_path / "q", "--prompt", "Hi", "--max-new-tokens", 8, "--greedy",
                       "--device", "cpu", "--json", "--quiet").stdout)
    assert a["token_ids"] == b["token_ids"]


def test_every_subcommand_is_registered_explicitly(monkeypatch):
    """Each subcommand is a module imported by name: one that fails to import fails the CLI, it never vanishes."""
    import argparse

    import mixoff_app.cli as cli
    sub = next(a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert list(sub.choices) == ["generate", "quantize", "make-tiny", "trace", "plan", "serve"]
    monkeypatch.setattr(cli.plan, "add_parser", lambda subparsers: (_ for _ in ()).throw(ImportError("broken")))
    with pytest.raises(ImportError, match="broken"):
        cli.build_parser()


def test_trace_record_runs_the_engine(tiny_dir, tmp_path, capsys):
    """``trace record`` with its default generator: a real engine answers, and its decode routing (with the
    router's weights) is what the trace holds."""
    from mixoff_app.cli import main
    from mixoff_app.config import SamplingParams
    from mixoff_app.trace import read_trace

    from helpers import load

    out = tmp_path / "rec.jsonl"
    assert main(["trace", "record", "--model", str(tiny_dir), "--prompt", "What does len do?", "--max-new-tokens",
                 "8", "--greedy", "--device", "cpu", "--attn-bits", "none", "--expert-bits", "none", str(out)]) == 0
    assert f"wrote 32 records (8 tokens x 4 layers) to {out}" in capsys.readouterr().out
    t = read_trace(out)
    eng = load(tiny_dir)
    list(eng.stream_chat([{"role": "user", "content": "What does len do?"}],
                         SamplingParams(max_new_tokens=8, greedy=True)))
    assert t.routing == [[tuple(es) for es in tok] for tok in eng.last_routing]
    assert t.header["num_experts"] == 8 and t.header["top_k"] == 2 and t.header["prompt"] == "What does len do?"
    assert t.header["device"] == "cpu" and t.header["quant"] == "attention none, experts none"
    for tok in t.weights:
        for w in tok:
            assert len(w) == 2 and w[0] >= w[1] >= 0 and abs(sum(w) - 1) < 1e-3
