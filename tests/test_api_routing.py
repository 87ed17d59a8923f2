"""The routing fields of our /v1 (vLLM's names, shapes and places): ``prompt_routed_experts``
[prompt_len, num_moe_layers, top_k] on the response, ``routed_experts`` [gen_len, num_moe_layers, top_k] on the
choice, streamed on the final chunk; equal to ``generate --json``'s routing for the same greedy prompt."""
from __future__ import annotations

import json

import httpx
import pytest
from test_api import Headless

from mixoff_app.api import ApiConfig
from mixoff_app.config import CacheConfig, EngineConfig, QuantConfig
from mixoff_app.engine import Engine

from helpers import cli

TOKENS = 8
QUESTION = "What does len do?"


@pytest.fixture(scope="module")
def engine(tiny_dir):
    return Engine.load(EngineConfig(model=str(tiny_dir), device="cpu", quant=QuantConfig.from_bits(4, 2),
                                    cache=CacheConfig(sizes=(2,))))


def chat(url: str, stream: bool = False, **extra) -> dict:
    """A greedy chat answer as JSON; streamed: the final chunk (the one with finish_reason)."""
    body = {"model": "m", "messages": [{"role": "user", "content": QUESTION}], "temperature": 0,
            "max_tokens": TOKENS, "stream": stream, **extra}
    if not stream:
        return httpx.post(url + "/v1/chat/completions", json=body, timeout=120).json()
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=120) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    done = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert len(done) == 1 and done[0] is chunks[-1]
    assert all("routed_experts" not in c["choices"][0] for c in chunks[:-1] if c["choices"]), "only the final chunk"
    return done[0]


def shape(x) -> tuple[int, int, int]:
    assert all(len(tok) == len(x[0]) for tok in x) and all(len(ex) == len(x[0][0]) for tok in x for ex in tok)
    return len(x), len(x[0]), len(x[0][0])


def test_routing_fields_have_vllms_shapes_and_equal_generate_json(engine, tiny_dir):
    L, K = engine.info.num_moe_layers, engine.info.top_k
    expected = json.loads(cli("generate", "--model", tiny_dir, "--device", "cpu", "--prompt", QUESTION, "--greedy",
                              "--max-new-tokens", TOKENS, "--json", "--quiet").stdout)["routing"]
    prompt_len = len(engine.prompt_ids([{"role": "user", "content": QUESTION}]))
    with Headless(lambda: engine, ApiConfig()) as url:
        for stream in (False, True):
            out = chat(url, stream, return_routed_experts=True)
            assert shape(out["prompt_routed_experts"]) == (prompt_len, L, K)
            assert shape(out["choices"][0]["routed_experts"]) == (TOKENS, L, K)
            assert out["choices"][0]["routed_experts"] == expected
            ids = {e for tok in out["prompt_routed_experts"] for ex in tok for e in ex}
            assert ids <= set(range(engine.info.num_experts))
        plain = chat(url)
        assert "prompt_routed_experts" not in plain and "routed_experts" not in plain["choices"][0]
        body = {"model": "m", "prompt": QUESTION, "max_tokens": 3, "temperature": 0, "return_routed_experts": True}
        out = httpx.post(url + "/v1/completions", json=body, timeout=120).json()
        assert shape(out["choices"][0]["routed_experts"]) == (3, L, K)
        assert len(out["prompt_routed_experts"]) == out["usage"]["prompt_tokens"]
        r = httpx.post(url + "/v1/chat/completions", json={**body, "messages": [{"role": "user", "content": "x"}],
                                                            "return_routed_experts": "yes"}, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["param"] == "return_routed_experts"
    with Headless(lambda: engine, ApiConfig(return_routed_experts=True)) as url:
        assert chat(url)["choices"][0]["routed_experts"] == expected, "the server flag returns them unasked"
        info = httpx.get(url + "/v1/mixoff/info", timeout=30).json()
        assert info["num_layers"] == L and info["top_k"] == K and "model_path" not in info
