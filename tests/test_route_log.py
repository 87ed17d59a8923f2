"""The routing of every cached position: kept across turns that reuse the KV cache, equal to a fresh prefill's."""
from __future__ import annotations

import pytest
import torch

from mixoff_app.config import SamplingParams
from mixoff_app.route_log import RouteLog, Segment, chunk_rows

from helpers import load

GREEDY = SamplingParams(max_new_tokens=6, greedy=True)


def rows(n, base=0):
    return [((base + t, base + t + 1),) for t in range(n)]


def test_log_keeps_settles_and_never_misaligns():
    log = RouteLog()
    chunk = Segment(chunk=[torch.tensor([[1, 2], [3, 4], [5, 6]])])        # one layer, three tokens
    log.settle(5, [chunk, Segment(rows(2, 10))])
    assert log.rows() == [((1, 2),), ((3, 4),), ((5, 6),), ((10, 11),), ((11, 12),)]
    log.keep(2)
    assert log.rows() == [((1, 2),), ((3, 4),)]
    log.settle(2, [Segment(rows(3))])          # the answer stopped before its prefill: nothing of it is kept
    assert len(log) == 2
    log.settle(9, [Segment(rows(3))])          # rows that do not line up with the cache are dropped, not guessed
    assert len(log) == 0
    assert chunk_rows([[[0, 1]], [[2, 3]]]) == [((0, 1), (2, 3))]


def test_prompt_routing_is_a_fresh_prefills_even_when_the_cache_is_reused(tiny_dir, tokenizer):
    engine = load(tiny_dir, k=2)
    first = [{"role": "user", "content": "What does len do?"}]
    answer = "".join(ev.text for ev in engine.stream_chat(first, GREEDY, session="s") if ev.kind == "token")
    p1 = engine.answer_prompt_routing()
    assert len(p1) == len(engine.prompt_ids(first)) and len(engine.last_routing) == 6
    second = first + [{"role": "assistant", "content": answer}, {"role": "user", "content": "And dict?"}]
    list(engine.stream_chat(second, GREEDY, session="s"))
    reused = engine.stats().prefill_tokens
    p2 = engine.answer_prompt_routing()
    assert reused < len(engine.prompt_ids(second)) == len(p2), "the second turn prefilled only its new tokens"
    engine.forget_kv()
    list(engine.stream_chat(second, GREEDY, session="s"))
    assert engine.stats().prefill_tokens == len(p2)
    assert engine.answer_prompt_routing() == p2, "kept rows equal what a fresh prefill computes"
    assert p2[:len(p1)] == p1


@pytest.mark.parametrize("n_ids", [1, 5])
def test_short_and_chunked_prompts_are_routed_whole(tiny_dir, n_ids):
    """A prompt whose last chunk is one token runs the decode path for it: its routing still counts."""
    engine = load(tiny_dir, k=2)
    engine.model.prefill_chunk = 4
    ids = list(range(3, 3 + n_ids))
    list(engine.stream_ids(ids, GREEDY))
    routing = engine.answer_prompt_routing()
    assert len(routing) == n_ids and all(len(r) == engine.info.num_moe_layers for r in routing)
    assert all(len(set(ex)) == engine.info.top_k for r in routing for ex in r)
