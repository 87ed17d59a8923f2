"""Small helpers shared by the runtime tests."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

from mixoff_app.config import NO_QUANT, CacheConfig, EngineConfig, QuantConfig, SamplingParams
from mixoff_app.engine import Engine


def load(tiny_dir, k=None, quant: QuantConfig = NO_QUANT, policy="lru", prefetch=0, max_context=512, **kw) -> Engine:
    return Engine.load(EngineConfig(model=str(tiny_dir), device="cpu", quant=quant,
                                    cache=CacheConfig(sizes=None if k is None else (k,), policy=policy, prefetch=prefetch, **kw),
                                    max_context=max_context))


def greedy_ids(engine: Engine, ids, n=32) -> list[int]:
    return [ev.token_id for ev in engine.stream_ids(ids, SamplingParams(max_new_tokens=n, greedy=True))
            if ev.kind == "token" and ev.token_id is not None]


def chat_ids(tokenizer, text="Tell me about the len function.") -> list[int]:
    out = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=True,
                                        add_generation_prompt=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def hf_greedy(hf_model, ids, n=32) -> list[int]:
    out = hf_model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                            max_new_tokens=n, min_new_tokens=n, do_sample=False,
                            pad_token_id=hf_model.config.eos_token_id)
    return out[0, len(ids):].tolist()


def free_port() -> int:
    """A loopback port nobody listens on right now (for launching the real app in a test)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


ROOT = Path(__file__).resolve().parent.parent


def cli(*args, check=True) -> subprocess.CompletedProcess:
    """``python -m mixoff_app ARGS`` in a new interpreter, offline; with ``check``, it must exit 0."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    p = subprocess.run([sys.executable, "-m", "mixoff_app", *map(str, args)], capture_output=True, text=True,
                       env=env, cwd=ROOT, timeout=300)
    if check:
        assert p.returncode == 0, p.stderr
    return p


def cli_here(capsys, *args) -> tuple[int, str]:
    """The CLI's own entry point in this process (the same code as ``python -m mixoff_app``, without the
    start-up of a new interpreter): (exit status, stderr)."""
    from mixoff_app.cli import main
    capsys.readouterr()
    try:
        rc = main([str(a) for a in args])
    except SystemExit as e:          # argparse refuses bad flags by exiting 2
        rc = e.code
    return rc, capsys.readouterr().err


def copy_dequantized_experts(sd: dict, engine: Engine, bits: int | None = None, group: int | None = None) -> None:
    """Write the engine's routed experts, dequantized, into a transformers 5 state dict (which holds each layer's
    experts fused: gate_up_proj [E, 2F, H], down_proj [E, H, F]), so the reference runs on our quantized numbers.
    With ``bits``/``group``, also check the experts' format."""
    cfg = engine.model.cfg
    f = cfg.intermediate_size
    for j, i in enumerate(cfg.moe_layers):
        gate_up, down = sd[f"model.layers.{i}.mlp.experts.gate_up_proj"], sd[f"model.layers.{i}.mlp.experts.down_proj"]
        for e in range(cfg.num_experts):
            ew = engine.model.cache.store.weights(j, e)
            if bits is not None:
                assert (ew.w1.bits, ew.w1.group_size) == (bits, group)
            gate_up[e, :f].copy_(ew.w1.dequantize(torch.float32))
            gate_up[e, f:].copy_(ew.w3.dequantize(torch.float32))
            down[e].copy_(ew.w2.dequantize(torch.float32))


def graph_path_matches_eager(folder, prompt, k: int, prefetch: int = 0, n: int = 10) -> None:
    """The CUDA-graph decode path (``DecodeGraphs``: the model's own device and host halves over a static step
    whose position is a device scalar), run uncaptured on the CPU, gives the eager decode's logits, tokens and
    cache counters, through a cache with evictions."""
    from mixoff_app.cuda_graphs import DecodeGraphs
    runs = []
    for graphs in (False, True):
        eng = load(folder, k=k, prefetch=prefetch)
        m = eng.model
        if graphs:
            m.graphs = DecodeGraphs(m, capture=False)
        logits, ids = [m.forward(torch.tensor(prompt), 0)], list(prompt)
        for _ in range(n):
            ids.append(int(logits[-1].argmax()))
            logits.append(m.forward(torch.tensor(ids[-1:]), len(ids) - 1))
        s = eng.stats()
        runs.append((ids, torch.cat(logits), (s.hits, s.misses, s.prefetch_issued)))
    assert runs[1][0] == runs[0][0]
    torch.testing.assert_close(runs[1][1], runs[0][1], rtol=1e-5, atol=1e-5)
    assert runs[1][2] == runs[0][2]
