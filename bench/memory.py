"""Measure what a load and a short generation really take against the planner's numbers; prints JSON.

    python bench/memory.py --model PATH [--placement P] [--cache-size K] [--vram-budget GB] [--ram-budget GB]
    python bench/memory.py --make-synthetic OUT --tokenizer-from TINY_DIR [--layers 2 --hidden 1024 --inter 4096]
    python bench/memory.py --make-hub OUT --family qwen3_moe --tokenizer-from TINY_DIR [--layers 2 --hidden 512
                           --inter 256 --experts 32]     # a bf16 hub-layout checkpoint, quantized while loading

The synthetic checkpoint (``tiny.write_synthetic(..., packed=True)``) is large enough that its experts, not
the libraries, dominate a measurement of RSS.

Device bytes: torch's peak allocated on CUDA; on the CPU-as-device, the engine's device tensors summed.
RAM: process RSS growth over the load, and the peak RSS (VmHWM, reset at the baseline) over load +
generation, both from a baseline taken after every import, so they count the model, not the libraries.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def synthetic_shape(layers: int, hidden: int, inter: int):
    """The ``memory-bench`` preset resized: head_dim follows hidden (8 heads, as Mixtral's 4096/32 = 128)."""
    from dataclasses import replace

    from mixoff_app.presets import from_name
    return replace(from_name("memory-bench"), num_layers=layers, hidden_size=hidden, intermediate_size=inter,
                   head_dim=hidden // 8)


def measure(model: str, placement: str = "auto", cache_size=None, vram_budget=None, ram_budget=None,
            max_context: int = 256, tokens: int = 2, device: str = "cpu") -> dict:
    import torch
    import transformers  # noqa: F401  (imported before the baseline: libraries are not the model)
    from transformers import AutoTokenizer  # noqa: F401

    from mixoff_app.cli import build_parser
    from mixoff_app.cli.args import engine_config
    from mixoff_app.config import SamplingParams
    from mixoff_app.engine import Engine
    from mixoff_app.memory import device_tensor_bytes, peak_rss_bytes, reset_peak_rss, rss_bytes

    argv = ["generate", "--model", model, "--prompt", "x", "--device", device, "--placement", placement,
            "--max-context", str(max_context)]
    if cache_size:
        argv += ["--cache-size", str(cache_size)]
    if vram_budget:
        argv += ["--vram-budget", str(vram_budget)]
    if ram_budget:
        argv += ["--ram-budget", str(ram_budget)]
    cfg = engine_config(build_parser().parse_args(argv))
    reset_peak_rss()
    rss0 = rss_bytes()
    eng = Engine.load(cfg)
    loaded_rss = rss_bytes() - rss0
    load_peak = peak_rss_bytes() - rss0
    ids = list(range(5, 12))
    out = [ev.token_id for ev in eng.stream_ids(ids, SamplingParams(max_new_tokens=tokens, greedy=True))
           if ev.kind == "token"]
    cuda = eng.model.device.type == "cuda"
    p = eng.memory_plan
    return {"placement": eng.info.cache.placement, "sizes": list(eng.model.cache.sizes),
            "expert_bytes": eng.info.expert_bytes, "tokens": out,
            "device_bytes": torch.cuda.max_memory_allocated() if cuda else device_tensor_bytes(eng.model),
            "rss_growth_load": loaded_rss, "rss_peak_growth": peak_rss_bytes() - rss0, "rss_peak_load": load_peak,
            "host_expert_bytes": eng.model.cache.store.nbytes,
            "plan_device": p.device_total if p else None, "plan_host": p.host_total if p else None,
            "bytes_disk": eng.stats().bytes_disk, "bytes_d2h": eng.stats().bytes_d2h}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model")
    ap.add_argument("--placement", default="auto")
    ap.add_argument("--cache-size", type=int, default=None)
    ap.add_argument("--vram-budget", type=float, default=None, help="GiB")
    ap.add_argument("--ram-budget", type=float, default=None, help="GiB")
    ap.add_argument("--max-context", type=int, default=256)
    ap.add_argument("--tokens", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--make-synthetic", default=None, metavar="OUT")
    ap.add_argument("--tokenizer-from", default=None)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--inter", type=int, default=4096)
    ap.add_argument("--make-hub", default=None, metavar="OUT", help="write a bf16 hub-layout checkpoint of --family")
    ap.add_argument("--family", default="mixtral", help="with --make-hub: a model_type of mixoff_app/families.py")
    ap.add_argument("--experts", type=int, default=32)
    a = ap.parse_args()
    if a.make_hub:
        import torch

        from mixoff_app.families import FAMILIES
        from mixoff_app.tiny import make_family_checkpoint
        # Eight heads of hidden/8, top-8: the families' own config keys for experts and their width.
        common = dict(hidden_size=a.hidden, num_attention_heads=8, num_key_value_heads=4, head_dim=a.hidden // 8,
                      num_hidden_layers=a.layers, num_experts_per_tok=8, max_position_embeddings=512)
        fam = FAMILIES[a.family]
        # dense layers' width, where the family has its own key for the experts'
        own = {"intermediate_size": 4 * a.inter, fam.experts_key[0]: a.experts, fam.expert_size_key: a.inter}
        out = make_family_checkpoint(a.make_hub, a.family, a.tokenizer_from, seed=0, dtype=torch.bfloat16,
                                     **common, **own)
        print(json.dumps({"wrote": str(out)}))
        return 0
    if a.make_synthetic:
        from mixoff_app.tiny import write_synthetic
        out = write_synthetic(a.make_synthetic, synthetic_shape(a.layers, a.hidden, a.inter),
                              tokenizer_from=a.tokenizer_from, packed=True)
        print(json.dumps({"wrote": str(out)}))
        return 0
    print(json.dumps(measure(a.model, a.placement, a.cache_size, a.vram_budget, a.ram_budget, a.max_context,
                             a.tokens, a.device)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
