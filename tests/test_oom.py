"""Memory safety: a device out-of-memory mid-answer ends that answer with a clear message, frees what the turn
took, and the next answer works; bfloat16 is refused on GPUs that only emulate it; the CUDA allocator is
asked for expandable segments without overriding a user's own setting."""
from __future__ import annotations

import gc
import os
import subprocess
import sys
import weakref

import pytest
import torch

from mixoff_app.config import ConfigError, SamplingParams
from mixoff_app.engine import resolve_dtype

from helpers import chat_ids, greedy_ids, load


@pytest.mark.parametrize("at", ["prefill", "decode"])
def test_out_of_memory_ends_the_answer_and_the_next_one_works(tiny_dir, tokenizer, at):
    eng = load(tiny_dir, k=2, max_context=256)
    ids = chat_ids(tokenizer)
    expected = greedy_ids(load(tiny_dir, k=2, max_context=256), ids, 12)
    m = eng.model
    name = "_moe_prefill" if at == "prefill" else "layer_host"      # (moe, lw, h) and (routed, x)
    real = getattr(m, name)
    held = []
    calls = [0]

    def failing(a, b, *rest):
        calls[0] += 1
        if calls[0] == (1 if at == "prefill" else 2 * m.cfg.num_layers + 2):   # the third decode step
            held.append(weakref.ref(b if at == "decode" else rest[0]))   # a tensor of the failing step: freed
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(a, b, *rest)

    setattr(m, name, failing)
    events = list(eng.stream_ids(ids, SamplingParams(max_new_tokens=12, greedy=True)))
    done = events[-1]
    assert done.kind == "done" and done.finish_reason == "oom"
    notice = [e.text for e in events if e.kind == "notice"]
    context = len(ids) if at == "prefill" else len(ids) + 3
    assert notice == [f"out of GPU memory at {context} tokens of context: lower --max-context or --cache-size"]
    assert sum(e.kind == "token" and e.token_id is not None for e in events) == (0 if at == "prefill" else 3)
    gc.collect()
    assert held and held[0]() is None
    assert not eng.busy and not eng.stats().generating
    setattr(m, name, real)
    assert greedy_ids(eng, ids, 12) == expected           # the next answer works, and is the right one


def test_bfloat16_is_refused_below_compute_capability_8():
    cuda = torch.device("cuda:0")
    with pytest.raises(ConfigError, match="compute capability 8.0 or newer .*7.5.*--dtype float16"):
        resolve_dtype("bfloat16", cuda, capability=(7, 5))
    assert resolve_dtype("bfloat16", cuda, capability=(8, 0)) == torch.bfloat16
    assert resolve_dtype(None, cuda, capability=(7, 5)) == torch.float16
    assert resolve_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16
    with pytest.raises(ConfigError, match="unsupported dtype"):
        resolve_dtype("float8", torch.device("cpu"))


@pytest.mark.parametrize("env,expected", [
    ({}, {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}),
    ({"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:128"},
     {"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:128,expandable_segments:True"}),
    ({"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:False"}, {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:False"}),
    ({"PYTORCH_ALLOC_CONF": "expandable_segments:False"},
     {"PYTORCH_ALLOC_CONF": "expandable_segments:False", "PYTORCH_CUDA_ALLOC_CONF": None}),
])
def test_allocator_asks_for_expandable_segments_without_overriding_the_user(env, expected):
    base = {k: v for k, v in os.environ.items() if k not in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")}
    code = ("import os, mixoff_app; print(repr((os.environ.get('PYTORCH_CUDA_ALLOC_CONF'), "
            "os.environ.get('PYTORCH_ALLOC_CONF'))))")
    out = subprocess.run([sys.executable, "-c", code], env=base | env, capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.dirname(__file__))).stdout
    cuda_conf, conf = eval(out)
    if "PYTORCH_CUDA_ALLOC_CONF" in expected:
        assert cuda_conf == expected["PYTORCH_CUDA_ALLOC_CONF"]
    if "PYTORCH_ALLOC_CONF" in expected:
        assert conf == expected["PYTORCH_ALLOC_CONF"]
