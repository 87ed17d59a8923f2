"""What 2-bit experts become on the CPU: quality, speed and RAM of each option, side by side. Prints one JSON.

The options (attention is 4-bit g64 in every one: int4 on the CPU kernels, hqq on the reference path):

- ``d_2bit_reference``: experts stay hqq 2-bit g16 and run on the reference path (dequantize, then matmul);
- ``a_int4_g32_from_2bit`` / ``a_int4_g64_from_2bit``: a pre-quantized 2-bit checkpoint (our own format, written
  by ``quantize`` from the same weights) loaded on the CPU kernels: each expert re-quantized to 4 bits from its
  dequantized 2-bit weights (the 2-bit values are not on a 4-bit grid along the input dimension, so this adds
  error to the 2-bit error);
- ``b_int4_g32_from_original`` / ``b_int4_g64_from_original``: the hub weights quantized straight to 4 bits;
- ``c_int8_from_original``: the hub weights as int8, one scale per row;
- ``fp32`` (the CPU kernels: oneDNN), for speed; the reference of the quality columns is the unquantized model on
  the reference path (float32 throughout).

Quality: over ``--positions`` teacher-forced positions of text, KL(fp || option) per position (mean), top-1
agreement, the relative logit error ||option - fp|| / ||fp||; and greedy agreement: of ``--tokens`` greedy tokens
after a prompt, how many the option produces identically before its first difference. Speed: decode tokens/s
(prefill excluded), all options' engines loaded once and timed interleaved, ``--repeats`` times, medians.
RAM: bytes of one expert, bits per expert weight, and the bytes the engine holds (trunk + experts + caches).

Models: ``mid`` (random, Mixtral's structure, hidden 512) and ``tiny`` (the trained demo model assets/tiny-chat,
whose held-out answers are the text).

    python bench/cpu_formats.py [--models mid,tiny] [--positions 128] [--tokens 32] [--repeats 3] [--threads 2]
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

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from mixoff_app import cpu_weights  # noqa: E402
from mixoff_app.checkpoints import save_quantized  # noqa: E402
from mixoff_app.config import NO_QUANT, CacheConfig, EngineConfig, QuantConfig, QuantSpec, SamplingParams  # noqa: E402
from mixoff_app.engine import Engine  # noqa: E402
from mixoff_app.hub import tiny_path  # noqa: E402
from mixoff_app.memory import device_tensor_bytes  # noqa: E402
from mixoff_app.tiny import write_synthetic  # noqa: E402

TWO_BIT = QuantConfig.from_bits(4, 2)                                           # attention 4-bit g64, experts 2-bit g16
INT8 = QuantConfig(attn=QuantConfig().attn, experts=QuantSpec(bits=8))
# name -> (checkpoint: "hub" or "2bit" (our format, 2-bit experts), quant, kernel, low-bit expert group)
OPTIONS = {
    "d_2bit_reference": ("hub", TWO_BIT, "torch", None),
    "a_int4_g32_from_2bit": ("2bit", TWO_BIT, "cpu", 32),
    "a_int4_g64_from_2bit": ("2bit", TWO_BIT, "cpu", 64),
    "b_int4_g32_from_original": ("hub", TWO_BIT, "cpu", 32),
    "b_int4_g64_from_original": ("hub", TWO_BIT, "cpu", 64),
    "c_int8_from_original": ("hub", INT8, "cpu", None),
    "fp32": ("hub", NO_QUANT, "cpu", None),
}


def load(folder: Path, quant: QuantConfig, kernel: str, group) -> Engine:
    """An engine with every expert resident; ``group`` is the int4 group 2-bit experts become on the CPU kernels
    (cpu_weights.LOW_BIT_EXPERT_GROUP, the setting this benchmark decides)."""
    default = cpu_weights.LOW_BIT_EXPERT_GROUP
    cpu_weights.LOW_BIT_EXPERT_GROUP = group or default
    try:
        return Engine.load(EngineConfig(model=str(folder), device="cpu", quant=quant, kernel=kernel,
                                        cache=CacheConfig(), max_context=1024))
    finally:
        cpu_weights.LOW_BIT_EXPERT_GROUP = default


def text_ids(name: str, folder: Path, n: int) -> list[int]:
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(folder))
    if name == "tiny":
        rows = [json.loads(line) for line in (folder / "heldout.jsonl").read_text().splitlines()]
        text = "\n".join(f"{r['question']} {r['answer']}" for r in rows)
    else:
        import pydoc_data.topics as topics
        text = topics.topics["lambda"] + topics.topics["for"] + topics.topics["while"]
    return tok(text)["input_ids"][:n]


def greedy(engine: Engine, prompt: list[int], n: int) -> list[int]:
    engine.forget_kv()
    return [e.token_id for e in engine.stream_ids(prompt, SamplingParams(max_new_tokens=n, greedy=True))
            if e.kind == "token" and e.token_id is not None]


def decode_tps(engine: Engine, prompt: list[int], n: int) -> float:
    engine.forget_kv()
    t0 = time.perf_counter()
    evs = list(engine.stream_ids(prompt, SamplingParams(max_new_tokens=n, greedy=True)))
    decoded = sum(e.token_id is not None for e in evs if e.kind == "token")
    return decoded / (time.perf_counter() - t0 - engine.stats().prefill_s)


def quality(engine: Engine, ids: torch.Tensor, ref_lp: torch.Tensor, ref_logits, prompt, ref_greedy, n) -> dict:
    logits = engine.model.forward(ids, 0, last_only=False)
    lp = torch.log_softmax(logits, -1)
    kl = (ref_lp.exp() * (ref_lp - lp)).sum(-1)
    got = greedy(engine, prompt, n)
    same = next((i for i, (a, b) in enumerate(zip(got, ref_greedy)) if a != b), min(len(got), len(ref_greedy)))
    return {"kl_mean": round(float(kl.mean()), 5),
            "top1_agree": round(float((lp.argmax(-1) == ref_lp.argmax(-1)).float().mean()), 4),
            "rel_logit_error": round(float((logits - ref_logits).norm() / ref_logits.norm()), 4),
            "greedy_same_prefix": same, "greedy_tokens": len(ref_greedy)}


def ram(engine: Engine) -> dict:
    store, cfg = engine.model.cache.store, engine.model.cfg
    weights = 3 * cfg.intermediate_size * cfg.hidden_size
    return {"expert_bytes": store.layout.nbytes, "bits_per_expert_weight": round(8 * store.layout.nbytes / weights, 3),
            "experts_total_mib": round(store.nbytes / 2**20, 1),
            "held_mib": round(device_tensor_bytes(engine.model) / 2**20, 1),
            "experts_held_as": engine.info.quant}


def run_model(name: str, tmp: Path, args) -> dict:
    hub = tiny_path() if name == "tiny" else write_synthetic(tmp / name, name)
    two_bit = save_quantized(hub, tmp / f"{name}-2bit", TWO_BIT)
    folders = {"hub": hub, "2bit": two_bit}
    ids = text_ids(name, Path(hub), args.positions)
    prompt = ids[:16]
    base = load(hub, NO_QUANT, "torch", None)
    ref_logits = base.model.forward(torch.tensor(ids), 0, last_only=False)
    ref_lp = torch.log_softmax(ref_logits, -1)
    ref_greedy = greedy(base, prompt, args.tokens)
    del base
    engines, out = {}, {}
    for opt, (src, quant, kernel, group) in OPTIONS.items():
        t = time.perf_counter()
        engines[opt] = eng = load(folders[src], quant, kernel, group)
        out[opt] = {"kernel": eng.info.kernel, "load_s": round(time.perf_counter() - t, 1), **ram(eng)}
        if opt != "fp32":
            out[opt]["quality"] = quality(eng, torch.tensor(ids), ref_lp, ref_logits, prompt, ref_greedy, args.tokens)
        decode_tps(eng, prompt, 4)                                                       # warm-up
        print(json.dumps({name: {opt: out[opt]}}), file=sys.stderr, flush=True)          # progress
    runs = {opt: [] for opt in engines}
    for _ in range(args.repeats):
        for opt, eng in engines.items():
            runs[opt].append(decode_tps(eng, prompt, args.tokens))
    for opt in engines:
        out[opt]["decode_tokens_per_s"] = round(statistics.median(runs[opt]), 2)
        out[opt]["decode_runs"] = [round(r, 2) for r in runs[opt]]
    fp = out["fp32"]["decode_tokens_per_s"]
    for opt in engines:
        out[opt]["speed_vs_fp32"] = round(out[opt]["decode_tokens_per_s"] / fp, 2)
    cfg = engines["fp32"].model.cfg
    return {"shape": {"hidden": cfg.hidden_size, "intermediate": cfg.intermediate_size, "layers": cfg.num_layers,
                      "experts": cfg.num_experts, "top_k": cfg.top_k},
            "positions": len(ids), "options": out}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="mid,tiny")
    ap.add_argument("--positions", type=int, default=128)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from mixoff_app.kernels.cpu import probe
    result = {"benchmark": "cpu_formats", "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
              "threads": args.threads, "cpu_kernel": probe().describe(), "models": {}}
    with tempfile.TemporaryDirectory() as d:
        for name in args.models.split(","):
            result["models"][name] = run_model(name, Path(d), args)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
