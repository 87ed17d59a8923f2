"""Measure what a load and a short generation really take against the planner's numbers; prints JSON.

    python bench/memory.py --model PATH [--placement P] [--cache-size K] [--vram-budget GB] [--ram-budget GB]
    python bench/memory.py --make-synthetic OUT --tokenizer-from TINY_DIR [--layers 2 --hidden 1024 --inter 4096]

Device bytes: torch's peak allocated on CUDA; on the CPU-as-device, the engine's device tensors summed.
RAM: process RSS growth over the load, and the peak RSS (VmHWM, reset at the baseline) over load +
generation, both from a baseline taken after every import, so they count the model, not the libraries.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def make_synthetic(out: str | os.PathLike, tokenizer_from: str | os.PathLike, layers: int = 2, hidden: int = 1024,
                   inter: int = 4096, experts: int = 8) -> Path:
    """A random Mixtral-shaped checkpoint in the mixoff format, written directly (no quantizer run): packed
    codes are random bytes, scales and zeros small constants, so every weight is finite. Large enough that
    its experts, not the libraries, dominate a measurement of RSS."""
    import torch
    from safetensors.torch import save_file

    from mixoff_app.checkpoints import MIXOFF_FORMAT, _spec_dict
    from mixoff_app.config import ModelConfig, QuantConfig
    from mixoff_app.stores import ExpertLayout
    from mixoff_app.quant import weight_fields

    src, out = Path(tokenizer_from), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    base = json.loads((src / "config.json").read_text())
    cfg = ModelConfig(vocab_size=base["vocab_size"], hidden_size=hidden, intermediate_size=inter,
                      num_layers=layers, num_heads=8, num_kv_heads=2, head_dim=hidden // 8, num_experts=experts,
                      top_k=2, max_position_embeddings=2048, bos_token_id=base.get("bos_token_id"),
                      eos_token_id=base.get("eos_token_id"))
    quant = QuantConfig()
    g = torch.Generator().manual_seed(0)
    consts = {"scale_s": 2e-3, "scale_z": 0.0, "zero_s": 0.01, "zero_z": 0.0, "scale": 0.01, "zero": 1.0}

    def field_tensor(f):
        if f.dtype == torch.uint8:
            return torch.randint(0, 256, f.shape, dtype=torch.uint8, generator=g)
        return torch.full(f.shape, consts[f.name.rsplit(".", 1)[-1]], dtype=f.dtype)

    h, hd = hidden, hidden // 8
    t = {"model.embed_tokens.weight": torch.randn(cfg.vocab_size, h, generator=g).half(),
         "model.norm.weight": torch.ones(h, dtype=torch.float16),
         "lm_head.weight": (torch.randn(cfg.vocab_size, h, generator=g) * h ** -0.5).half()}
    shapes = {"q_proj": (8 * hd, h), "k_proj": (2 * hd, h), "v_proj": (2 * hd, h), "o_proj": (h, 8 * hd)}
    layout = ExpertLayout.for_model(cfg, quant.experts, torch.float16)
    for i in range(layers):
        p = f"model.layers.{i}."
        t[p + "input_layernorm.weight"] = torch.ones(h, dtype=torch.float16)
        t[p + "post_attention_layernorm.weight"] = torch.ones(h, dtype=torch.float16)
        t[p + "block_sparse_moe.gate.weight"] = torch.randn(experts, h, generator=g).half()
        for name, shape in shapes.items():
            for f in weight_fields(f"{p}self_attn.{name}", shape, quant.attn, torch.float16):
                t[f.name] = field_tensor(f)
        for e in range(experts):
            blob = torch.zeros(layout.nbytes, dtype=torch.uint8)
            layout.fill(blob, {f.name: field_tensor(f) for f in layout.fields})
            t[f"{p}block_sparse_moe.experts.{e}.packed"] = blob
    meta = {"mixoff.format": MIXOFF_FORMAT, "format": "pt",
            "mixoff.quant": json.dumps({"attn": _spec_dict(quant.attn), "experts": _spec_dict(quant.experts)})}
    save_file(t, str(out / "model.safetensors"), metadata=meta)
    (out / "config.json").write_text(json.dumps(cfg.to_hf() | {"torch_dtype": "float16"}, indent=2))
    for name in os.listdir(src):
        if name.startswith(("tokenizer", "special_tokens", "generation_config", "chat_template")):
            shutil.copy2(src / name, out / name)
    return out


def measure(model: str, placement: str = "auto", cache_size=None, vram_budget=None, ram_budget=None,
            max_context: int = 256, tokens: int = 2, device: str = "cpu") -> dict:
    import torch
    import transformers  # noqa: F401  (imported before the baseline: libraries are not the model)
    from transformers import AutoTokenizer  # noqa: F401

    from mixoff_app.cli import build_parser, engine_config
    from mixoff_app.config import SamplingParams
    from mixoff_app.engine import Engine
    from mixoff_app.plan import device_tensor_bytes, peak_rss_bytes, reset_peak_rss, rss_bytes

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
    a = ap.parse_args()
    if a.make_synthetic:
        print(json.dumps({"wrote": str(make_synthetic(a.make_synthetic, a.tokenizer_from, a.layers, a.hidden,
                                                      a.inter))}))
        return 0
    print(json.dumps(measure(a.model, a.placement, a.cache_size, a.vram_budget, a.ram_budget, a.max_context,
                             a.tokens, a.device)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
