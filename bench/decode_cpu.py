"""CPU decode speed, side by side in one run: our runtime vs transformers' generate on the same checkpoint
(quantization off, every expert resident), and our runtime with a k-expert cache vs all-resident.

Prints one JSON object. Runs are interleaved and repeated; medians are reported, with ratios taken
between medians measured in the same process (this machine is shared and noisy).

    python bench/decode_cpu.py [--tokens 64] [--repeats 3] [--models tiny,mid]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from mixoff_app.config import NO_QUANT, CacheConfig, EngineConfig, SamplingParams
from mixoff_app.engine import Engine
from mixoff_app.tiny import make_tiny, write_synthetic


def ours(path: Path, k, prompt: list[int], n: int, kernel: str = "auto") -> float:
    """Decode tokens/s of our runtime (prefill excluded): n tokens after the prompt, greedy."""
    eng = Engine.load(EngineConfig(model=str(path), device="cpu", quant=NO_QUANT, cache=CacheConfig(sizes=(k,)),
                                   max_context=len(prompt) + n + 8, kernel=kernel))
    params = SamplingParams(max_new_tokens=n, greedy=True)
    list(eng.stream_ids(prompt, SamplingParams(max_new_tokens=4, greedy=True)))   # warm-up
    cache = eng.model.cache
    cache.resize(cache.sizes, "lru")                                              # cold cache again
    if k == eng.model.cfg.num_experts:
        # All resident means resident: load every expert before timing, as transformers has them in place.
        for layer in range(eng.model.cfg.num_layers):
            for _e, _w, slot in cache.fetch(layer, list(range(k))):
                cache.release(layer, slot)
    eng.forget_kv()
    t0 = time.perf_counter()
    evs = list(eng.stream_ids(prompt, params))
    snap = eng.stats()
    generated = sum(e.token_id is not None for e in evs if e.kind == "token")
    # Our loop also feeds the last token through the model (its K/V serve the next chat turn), so it
    # runs `generated` decode forwards; transformers runs generated - 1. Count forwards on both sides.
    decode_s = time.perf_counter() - t0 - snap.prefill_s
    return generated / decode_s


def transformers_tps(model, prompt: list[int], n: int) -> float:
    ids = torch.tensor([prompt])
    mask = torch.ones_like(ids)
    kw = dict(attention_mask=mask, do_sample=False, pad_token_id=0)
    with torch.inference_mode():
        model.generate(ids, max_new_tokens=4, **kw)                                  # warm-up
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=1, min_new_tokens=1, **kw)
        prefill = time.perf_counter() - t0
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kw)
        total = time.perf_counter() - t0
    return (n - 1) / (total - prefill)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--models", default="tiny,mid")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--kernel", choices=("auto", "triton", "torch", "cpu"), default="auto",
                    help="matmul kernel (auto = cpu on the CPU: oneDNN for these unquantized models)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoTokenizer, MixtralForCausalLM

    result = {"benchmark": "decode_cpu", "tokens": args.tokens, "repeats": args.repeats,
              "threads": args.threads, "torch": torch.__version__, "models": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            path = make_tiny(Path(tmp) / "tiny", seed=0) if name == "tiny" else write_synthetic(Path(tmp) / name, name)
            tok = AutoTokenizer.from_pretrained(str(path))
            prompt = list(tok.apply_chat_template([{"role": "user", "content": "Explain what the zip builtin does."}],
                                                  tokenize=True, add_generation_prompt=True)["input_ids"])
            hf = MixtralForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
            E = hf.config.num_local_experts
            runs = {"transformers": [], "ours_all_resident": [], "ours_k2": [], "ours_k4": []}
            for _ in range(args.repeats):
                runs["transformers"].append(transformers_tps(hf, prompt, args.tokens))
                runs["ours_all_resident"].append(ours(path, E, prompt, args.tokens, args.kernel))
                runs["ours_k2"].append(ours(path, 2, prompt, args.tokens, args.kernel))
                runs["ours_k4"].append(ours(path, 4, prompt, args.tokens, args.kernel))
            med = {k: statistics.median(v) for k, v in runs.items()}
            result["models"][name] = {
                "shape": {k: getattr(hf.config, k) for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                              "num_local_experts", "vocab_size")},
                "tokens_per_s_median": med,
                "tokens_per_s_runs": runs,
                "ratio_ours_all_resident_vs_transformers": med["ours_all_resident"] / med["transformers"],
                "ratio_k2_vs_all_resident": med["ours_k2"] / med["ours_all_resident"],
                "ratio_k4_vs_all_resident": med["ours_k4"] / med["ours_all_resident"],
            }
            del hf
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
