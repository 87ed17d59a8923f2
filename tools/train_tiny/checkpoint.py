"""The Mixtral being trained, as a Hugging Face checkpoint: its config from the flags, a fresh model, writing it
in fp16 with the hub's tensor names (what the runtime reads), and reading the shipped one back for
``--init-from``, ``--measure`` and ``--transcripts``. Training uses transformers' ``MixtralForCausalLM``:
training is not the runtime."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from mixoff_app.config import ModelConfig
from tools.train_tiny.hyperparameters import SHAPE

# The shipped checkpoint: the default of --out, and what --init-from, --measure and the tests read.
ASSET_DIR = Path(__file__).resolve().parents[2] / "assets" / "tiny-chat"


def model_config(args, tok) -> ModelConfig:
    return ModelConfig(vocab_size=len(tok), hidden_size=args.hidden, intermediate_size=args.intermediate,
                       num_layers=args.layers, num_heads=args.heads, num_kv_heads=args.kv_heads,
                       head_dim=args.head_dim, num_experts=args.experts, top_k=args.top_k,
                       rope_theta=SHAPE.rope_theta, max_position_embeddings=args.context,
                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)


def build_model(cfg: ModelConfig, aux_coef: float):
    from transformers import MixtralConfig, MixtralForCausalLM
    hf = MixtralConfig(**(cfg.to_hf() | {"router_aux_loss_coef": aux_coef, "output_router_logits": False,
                                         "initializer_range": 0.02}))
    return MixtralForCausalLM(hf)


def save_checkpoint(model, tok, cfg: ModelConfig, out: Path, extra: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    half = model.to(torch.float16)
    half.config.dtype = torch.float16
    half.save_pretrained(str(out), safe_serialization=True)
    model.to(torch.float32)
    tok.save_pretrained(str(out))
    conf = json.loads((out / "config.json").read_text())
    conf.update({"dtype": "float16", "output_router_logits": False} | extra)
    (out / "config.json").write_text(json.dumps(conf, indent=2, sort_keys=True) + "\n")
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, "pad_token_id": cfg.eos_token_id,
         "do_sample": False, "max_new_tokens": 200}, indent=2) + "\n")


def load_shipped(path: Path | str = ASSET_DIR):
    from transformers import AutoTokenizer, MixtralForCausalLM
    tok = AutoTokenizer.from_pretrained(str(path))
    model = MixtralForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    model.eval()
    return model, tok
