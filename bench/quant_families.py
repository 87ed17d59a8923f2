"""Expert quantization per family: reconstruction error and logits divergence. Prints one JSON object.

Two measurements, for expert specs 2-bit g16 (the Mixtral default), 3-bit g64 and 4-bit g64:

1. Reconstruction: a gate/up matrix with each family's real expert width as its rows (Mixtral 14336,
   Qwen1.5-MoE and DeepSeek-V2-Lite 1408, OLMoE 1024, Qwen3-MoE 768) and 1024 of the hidden columns (the error of i.i.d. weights
   does not depend on the column count; fewer keep this runnable on two shared cores), drawn Gaussian and
   heavy-tailed (Student-t, 4 degrees of freedom, as trained weights have outliers); relative Frobenius
   error ||W - deq(q(W))|| / ||W||.
2. Logits: a tiny random checkpoint per family, written by transformers (hidden 256; each family's own
   expert count, top-k, and expert width relative to the hidden size, so the number of experts a token sums
   and their width are the family's), run by our runtime with experts at each spec (attention 4-bit g64)
   against the same model unquantized: KL(fp || quantized) per position and top-1 agreement, over 96
   positions of real text. "experts fp" (attention 4-bit, experts unquantized) is the floor the expert
   quantization adds to.

    python bench/quant_families.py [--families mixtral,qwen2_moe,qwen3_moe,olmoe,deepseek_v2] [--quick]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from mixoff_app.config import NO_QUANT, CacheConfig, EngineConfig, QuantConfig, QuantSpec  # noqa: E402
from mixoff_app.engine import Engine  # noqa: E402
from mixoff_app.quant import quantize  # noqa: E402
from mixoff_app.tiny import make_family_checkpoint, make_tiny  # noqa: E402

SPECS = {"2-bit g16": QuantSpec(bits=2, group_size=16, scale_group=128),
         "3-bit g64": QuantSpec(bits=3, group_size=64, scale_group=128),
         "4-bit g64": QuantSpec(bits=4, group_size=64, scale_group=128)}

# Real expert shapes (F, H) from the presets, and the tiny stand-ins: hidden 256, F scaled by the same
# F/H ratio, the real expert count and top-k.
REAL = {"mixtral": (14336, 4096), "qwen2_moe": (1408, 2048), "olmoe": (1024, 2048), "qwen3_moe": (768, 2048),
        "deepseek_v2": (1408, 2048)}
H = 256
TINY = {
    "mixtral": dict(num_local_experts=8, num_experts_per_tok=2, intermediate_size=896),
    "qwen2_moe": dict(num_experts=60, num_experts_per_tok=4, moe_intermediate_size=176,
                      shared_expert_intermediate_size=704, intermediate_size=704, norm_topk_prob=False),
    "olmoe": dict(num_experts=64, num_experts_per_tok=8, intermediate_size=128, norm_topk_prob=False),
    "qwen3_moe": dict(num_experts=128, num_experts_per_tok=8, moe_intermediate_size=96, intermediate_size=768,
                      head_dim=32, norm_topk_prob=True),
    # DeepSeek-V2-Lite scaled the same way: 2 shared experts, a dense first layer (so 1 of the 2 layers routes),
    # latent attention with the latent and head widths in Lite's proportions.
    "deepseek_v2": dict(num_experts=64, num_experts_per_tok=6, moe_intermediate_size=176, n_shared_experts=2,
                        intermediate_size=1368, first_k_dense_replace=1, num_key_value_heads=8, kv_lora_rank=64,
                        q_lora_rank=None, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
                        norm_topk_prob=False),
}
COMMON = dict(hidden_size=H, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=4,
              max_position_embeddings=512, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})


def spec_bits(spec: QuantSpec, shape) -> float:
    W = torch.randn(shape[0], min(shape[1], 1024))
    q = quantize(W, spec)
    return 8 * q.nbytes / W.numel()


def reconstruction(families, quick: bool) -> dict:
    g = torch.Generator().manual_seed(0)
    out = {}
    for fam in families:
        f, h = REAL[fam]
        h = min(h, 1024)
        if quick:
            f = min(f, 1024)
        row = {}
        for dist in ("gaussian", "student_t4"):
            W = torch.randn(f, h, generator=g) if dist == "gaussian" else \
                torch.distributions.StudentT(4.0).sample((f, h))
            W = W * h ** -0.5
            for name, spec in SPECS.items():
                Wd = quantize(W, spec).dequantize(torch.float32)
                row.setdefault(name, {})[dist] = round(float((W - Wd).norm() / W.norm()), 4)
        out[fam] = {"shape": [f, h], "relative_error": row}
        print(json.dumps({fam: out[fam]}), file=sys.stderr, flush=True)      # progress
    return out


def logits_divergence(families, tmp: Path, quick: bool) -> dict:
    tok_dir = make_tiny(tmp / "tok", seed=0)
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    import pydoc_data.topics as topics
    text = topics.topics["lambda"] + topics.topics["for"]
    ids = torch.tensor(tok(text)["input_ids"][: 48 if quick else 96])
    out = {}
    for fam in families:
        cfg = dict(COMMON, **TINY[fam])
        folder = make_family_checkpoint(tmp / fam, fam, tok_dir, seed=0, **cfg)
        base = Engine.load(EngineConfig(model=str(folder), device="cpu", quant=NO_QUANT, kernel="torch",
                                        cache=CacheConfig(), max_context=512))
        ref = torch.log_softmax(base.model.forward(ids, 0, last_only=False), -1)
        row = {}
        # "experts fp": attention 4-bit only, the floor the expert specs add to
        for name, spec in [("experts fp", QuantSpec(bits=None))] + list(SPECS.items()):
            t = time.perf_counter()
            # kernel torch: the hqq formats as specified (the CPU kernels' formats: bench/cpu_formats.py)
            eng = Engine.load(EngineConfig(model=str(folder), device="cpu", cache=CacheConfig(), kernel="torch",
                                           quant=QuantConfig(attn=QuantSpec(bits=4, group_size=64, scale_group=256),
                                                             experts=spec), max_context=512))
            lp = torch.log_softmax(eng.model.forward(ids, 0, last_only=False), -1)
            kl = (ref.exp() * (ref - lp)).sum(-1)
            row[name] = {"kl_mean": round(float(kl.mean()), 5), "kl_p90": round(float(kl.quantile(0.9)), 5),
                         "top1_agree": round(float((lp.argmax(-1) == ref.argmax(-1)).float().mean()), 4),
                         "load_s": round(time.perf_counter() - t, 1)}
            del eng
        print(json.dumps({fam: row}), file=sys.stderr, flush=True)           # progress
        out[fam] = {"tiny_shape": {"hidden": H, "expert_width": cfg.get("moe_intermediate_size",
                                                                        cfg["intermediate_size"]),
                                   "experts": cfg.get("num_experts", cfg.get("num_local_experts")),
                                   "top_k": cfg["num_experts_per_tok"]},
                    "positions": int(ids.numel()), "experts_vs_fp": row}
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--families", default="mixtral,qwen2_moe,olmoe,qwen3_moe")
    ap.add_argument("--quick", action="store_true", help="smaller matrices and fewer positions (a smoke run)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    families = args.families.split(",")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as d:
        result = {"bits_per_weight": {n: round(spec_bits(s, (768, 2048)), 3) for n, s in SPECS.items()},
                  "reconstruction": reconstruction(families, args.quick),
                  "logits": logits_divergence(families, Path(d), args.quick)}
    result["seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
