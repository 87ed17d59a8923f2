"""--cuda-graphs: decode steps replayed as CUDA graphs give the eager path's tokens and logits with the same
host round trips (GPU only); on the CPU the switch is refused with a clear message."""
from __future__ import annotations

import pytest
import torch

from mixoff_app.config import CacheConfig, ConfigError, EngineConfig, QuantConfig, SamplingParams
from mixoff_app.engine import Engine
from mixoff_app.op_counts import count_syncs

from helpers import chat_ids, graph_path_matches_eager


def load(tiny_dir, device, graphs, prefetch=0, k=2, quant=QuantConfig()):
    return Engine.load(EngineConfig(model=str(tiny_dir), device=device, quant=quant, max_context=256,
                                    cache=CacheConfig(sizes=(k,), prefetch=prefetch), cuda_graphs=graphs))


def test_cuda_graphs_on_the_cpu_is_refused(tiny_dir):
    with pytest.raises(ConfigError, match="--cuda-graphs needs a CUDA GPU"):
        load(tiny_dir, "cpu", True)


@pytest.mark.parametrize("prefetch,k", [(0, 2), (2, 2), (0, 1)])
def test_graph_path_uncaptured_is_the_eager_path(tiny_dir, tokenizer, prefetch, k):
    """The graph path's bodies (static step, device position, whole-cache attention behind a bias) run
    uncaptured on the CPU; the other families run it in tests/test_families.py."""
    graph_path_matches_eager(tiny_dir, chat_ids(tokenizer), k=k, prefetch=prefetch)


@pytest.mark.gpu
@pytest.mark.parametrize("prefetch,k", [(0, 2), (2, 2), (0, 1)])
def test_graphs_match_eager_decode(tiny_dir, tokenizer, prefetch, k):
    ids = chat_ids(tokenizer)
    params = SamplingParams(max_new_tokens=24, greedy=True)
    runs = {}
    for graphs in (False, True):
        eng = load(tiny_dir, "cuda", graphs, prefetch=prefetch, k=k)
        toks = [e.token_id for e in eng.stream_ids(ids, params) if e.kind == "token" and e.token_id is not None]
        m = eng.model
        full = torch.tensor(ids + toks, device="cuda")
        logits = [m.forward(full[:len(ids)], 0)] + [m.forward(full[p:p + 1], p) for p in range(len(ids), len(full))]
        with count_syncs() as syncs:
            m.forward(full[-1:], len(full))
        runs[graphs] = (toks, torch.cat(logits).float().cpu(), syncs.total, eng.stats().hits)
    assert runs[True][0] == runs[False][0]
    torch.testing.assert_close(runs[True][1], runs[False][1], rtol=2e-2, atol=2e-2)
    assert runs[True][2] == runs[False][2] == m.cfg.num_layers
