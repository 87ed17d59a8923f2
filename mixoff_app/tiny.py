"""Synthetic checkpoints, made entirely offline: the random tiny Mixtral and the benchmarks' larger shapes.

``write_synthetic(out_dir, shape, seed)`` is the one writer. By default it trains a byte-level BPE tokenizer on
the Python documentation that ships with every Python (``pydoc_data``), writes a Mistral-style chat template,
and saves deterministic random weights of a preset's shape (``presets.py``) with the hub's per-expert tensor
names, which transformers' ``MixtralForCausalLM`` and ``AutoTokenizer`` load; ``make_tiny`` is the
``tiny-random`` preset, the oracle in the parity tests. ``packed=True`` writes mixoff's own format instead, with
random low-bit codes (no quantizer run), for shapes too large to quantize quickly.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Iterable, Iterator, Optional, Union

import torch

from .config import ModelConfig, QuantConfig
from .presets import from_name

# Mistral's template shape: the system prompt (if any) is put in front of the first user turn. An
# assistant turn is trimmed, so an answer the model generated (which starts with its own space token)
# renders back to exactly the tokens it generated, and the next turn reuses their KV cache.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% set sys = namespace(text='') %}"
    "{% for message in messages %}"
    "{% set content = message['content'] if message['content'] is string else "
    "(message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join('')) %}"
    "{% if message['role'] == 'system' %}{% set sys.text = content + '\\n\\n' %}"
    "{% elif message['role'] == 'user' %}{{ '[INST] ' + sys.text + content + ' [/INST]' }}{% set sys.text = '' %}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + (content | trim) + eos_token }}"
    "{% endif %}{% endfor %}"
)

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]"]

def doc_corpus() -> Iterator[str]:
    """Local English text every Python has: the language reference topics and stdlib docstrings."""
    import pydoc_data.topics as topics
    for key in sorted(topics.topics):
        yield topics.topics[key]


def train_tokenizer(texts: Iterable[str], vocab_size: int):
    """Byte-level BPE (no unknown characters, ever) wrapped as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(texts), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="</s>", additional_special_tokens=["[INST]", "[/INST]"])
    fast.chat_template = CHAT_TEMPLATE
    fast.model_max_length = 2048
    return fast


def random_state_dict(cfg: ModelConfig, seed: int) -> dict[str, torch.Tensor]:
    """Random weights under the hub's names (per-expert, as the family names them), deterministic for a seed.
    Mixtral's trunk only (no biases, q/k norms, dense layers or shared experts): the shapes it writes are
    Mixtral presets; other families' checkpoints come from ``make_family_checkpoint``."""
    g = torch.Generator().manual_seed(seed)

    def normal(*shape, std=0.02):
        return (torch.randn(*shape, generator=g) * std).contiguous()

    h, f, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    fam = cfg.traits
    sd = {"model.embed_tokens.weight": normal(cfg.vocab_size, h, std=1.0),
          "model.norm.weight": 1 + normal(h, std=0.1)}
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        sd[p + "input_layernorm.weight"] = 1 + normal(h, std=0.1)
        sd[p + "post_attention_layernorm.weight"] = 1 + normal(h, std=0.1)
        sd[p + "self_attn.q_proj.weight"] = normal(cfg.num_heads * hd, h, std=h ** -0.5)
        sd[p + "self_attn.k_proj.weight"] = normal(cfg.num_kv_heads * hd, h, std=h ** -0.5)
        sd[p + "self_attn.v_proj.weight"] = normal(cfg.num_kv_heads * hd, h, std=h ** -0.5)
        sd[p + "self_attn.o_proj.weight"] = normal(h, cfg.num_heads * hd, std=(cfg.num_heads * hd) ** -0.5)
        # A decisive router (large logits) keeps top-k free of near-ties, so parity is well defined.
        sd[fam.router_key(i)] = normal(cfg.num_experts, h, std=1.0)
        gate, up, down = fam.expert_names
        for e in range(cfg.num_experts):
            q = fam.expert_prefix(i, e)
            sd[f"{q}.{gate}.weight"] = normal(f, h, std=h ** -0.5)
            sd[f"{q}.{up}.weight"] = normal(f, h, std=h ** -0.5)
            sd[f"{q}.{down}.weight"] = normal(h, f, std=f ** -0.5)
    sd["lm_head.weight"] = normal(cfg.vocab_size, h, std=h ** -0.5)
    return sd


def packed_state_dict(cfg: ModelConfig, quant: QuantConfig, seed: int) -> dict[str, torch.Tensor]:
    """Random weights in mixoff's own format, written directly: packed codes are random bytes, scales and
    zeros small constants, so every weight is finite; the trunk is fp16."""
    from .quant import weight_fields
    from .stores import ExpertLayout

    g = torch.Generator().manual_seed(seed)
    consts = {"scale_s": 2e-3, "scale_z": 0.0, "zero_s": 0.01, "zero_z": 0.0, "scale": 0.01, "zero": 1.0}

    def field_tensor(f):
        if f.dtype == torch.uint8:
            return torch.randint(0, 256, f.shape, dtype=torch.uint8, generator=g)
        return torch.full(f.shape, consts[f.name.rsplit(".", 1)[-1]], dtype=f.dtype)

    h, hd, nh, nkv = cfg.hidden_size, cfg.head_dim, cfg.num_heads, cfg.num_kv_heads
    t = {"model.embed_tokens.weight": torch.randn(cfg.vocab_size, h, generator=g).half(),
         "model.norm.weight": torch.ones(h, dtype=torch.float16),
         "lm_head.weight": (torch.randn(cfg.vocab_size, h, generator=g) * h ** -0.5).half()}
    shapes = {"q_proj": (nh * hd, h), "k_proj": (nkv * hd, h), "v_proj": (nkv * hd, h), "o_proj": (h, nh * hd)}
    layout = ExpertLayout.for_model(cfg, quant.experts, torch.float16)
    fam = cfg.traits
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        t[p + "input_layernorm.weight"] = torch.ones(h, dtype=torch.float16)
        t[p + "post_attention_layernorm.weight"] = torch.ones(h, dtype=torch.float16)
        t[fam.router_key(i)] = torch.randn(cfg.num_experts, h, generator=g).half()
        for name, shape in shapes.items():
            for f in weight_fields(f"{p}self_attn.{name}", shape, quant.attn, torch.float16):
                t[f.name] = field_tensor(f)
        for e in range(cfg.num_experts):
            blob = torch.zeros(layout.nbytes, dtype=torch.uint8)
            layout.fill(blob, {f.name: field_tensor(f) for f in layout.fields})
            t[fam.expert_blob_key(i, e)] = blob
    return t


def write_synthetic(out_dir: str | os.PathLike, shape: Union[str, ModelConfig], seed: int = 0,
                    tokenizer_from: Optional[str | os.PathLike] = None, packed: bool = False,
                    config_extra: Optional[dict] = None) -> Path:
    """Write a random checkpoint of ``shape`` (a preset name or a ModelConfig) into ``out_dir``.

    The tokenizer is trained on Python's docs to the shape's vocab size, or copied from ``tokenizer_from``
    (a checkpoint folder); either way the vocab size and special ids come from it. ``packed=False``: Hugging
    Face layout in fp32 (``random_state_dict``); ``packed=True``: mixoff's format (``packed_state_dict``)."""
    from safetensors.torch import save_file

    cfg = from_name(shape) if isinstance(shape, str) else shape
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if tokenizer_from is None:
        tok = train_tokenizer(doc_corpus(), cfg.vocab_size)
        cfg = replace(cfg, vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    else:
        src = Path(tokenizer_from)
        base = json.loads((src / "config.json").read_text())
        cfg = replace(cfg, vocab_size=base["vocab_size"], bos_token_id=base.get("bos_token_id"),
                      eos_token_id=base.get("eos_token_id"))
    if packed:
        from .checkpoints import MIXOFF_FORMAT, spec_dict
        quant = QuantConfig()
        weights = packed_state_dict(cfg, quant, seed)
        meta = {"mixoff.format": MIXOFF_FORMAT, "format": "pt",
                "mixoff.quant": json.dumps({"attn": spec_dict(quant.attn), "experts": spec_dict(quant.experts)})}
        hf = cfg.to_hf() | {"torch_dtype": "float16"}
    else:
        weights, meta = random_state_dict(cfg, seed), {"format": "pt"}
        hf = cfg.to_hf() | {"dtype": "float32"}
    tmp = out / ".model.safetensors.part"
    save_file(weights, str(tmp), metadata=meta)
    os.replace(tmp, out / "model.safetensors")
    if tokenizer_from is None:
        tok.save_pretrained(str(out))
        (out / "generation_config.json").write_text(json.dumps(
            {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id}, indent=2))
    else:
        for name in os.listdir(src):
            if name.startswith(("tokenizer", "special_tokens", "generation_config", "chat_template")):
                shutil.copy2(src / name, out / name)
    (out / "config.json").write_text(json.dumps(hf | (config_extra or {}), indent=2))
    return out


def make_tiny(out_dir: str | os.PathLike, seed: int = 0, vocab_size: int = 512) -> Path:
    """The random tiny model: config.json, model.safetensors, tokenizer files in ``out_dir``."""
    cfg = replace(from_name("tiny-random"), vocab_size=vocab_size)
    return write_synthetic(out_dir, cfg, seed, config_extra={"mixoff_tiny_seed": seed})


def default_tiny_dir() -> Path:
    """Where ``--model tiny`` keeps the random tiny model it builds on first use."""
    base = os.environ.get("MIXOFF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "mixoff")
    return Path(base) / "tiny-random"


def ensure_tiny(path: Path | None = None, seed: int = 0) -> Path:
    path = Path(path) if path else default_tiny_dir()
    if not (path / "model.safetensors").exists() or not (path / "tokenizer.json").exists():
        make_tiny(path, seed=seed)
    return path


# ---- tiny checkpoints of the other families, written by transformers itself ----------------------

def make_family_checkpoint(out_dir: str | os.PathLike, model_type: str, tokenizer_dir: str | os.PathLike,
                           seed: int = 0, dtype: torch.dtype = torch.float32, **config) -> Path:
    """A tiny random checkpoint of ``model_type`` saved by transformers' own ``save_pretrained`` (so the file
    holds the hub's per-expert tensor names), with the tokenizer of ``tokenizer_dir`` copied beside it.

    ``config`` are the family's own config.json keys. transformers' config class is the family row's
    (``families.py``; read by name, so this module imports transformers lazily), and config.json names the
    family as the row does. The weights are re-drawn after transformers builds the model: unit-scale
    activations, and a decisive router (large logits) so top-k has no near-ties and parity with transformers
    is well defined."""
    import shutil

    import transformers

    from .families import FAMILIES, unsupported
    if model_type not in FAMILIES:
        raise ValueError(unsupported(model_type))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok_files = [p for p in Path(tokenizer_dir).iterdir()
                 if p.name.startswith(("tokenizer", "special_tokens", "chat_template"))]
    gen = json.loads((Path(tokenizer_dir) / "generation_config.json").read_text())
    vocab = json.loads((Path(tokenizer_dir) / "config.json").read_text())["vocab_size"]
    cfg = getattr(transformers, FAMILIES[model_type].hf_config)(
        **({"vocab_size": vocab, "bos_token_id": gen["bos_token_id"], "eos_token_id": gen["eos_token_id"],
            "pad_token_id": gen["eos_token_id"], "tie_word_embeddings": False} | config))
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                # norms around 1, biases around 0
                p.copy_((1.0 if "norm" in name else 0.0) + 0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith("gate.weight") and "shared_expert_gate" not in name:
                p.copy_(torch.randn(p.shape, generator=g))                     # router [E, H]
            elif "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * p.shape[-1] ** -0.5)
    model.to(dtype).save_pretrained(str(out))
    saved = json.loads((out / "config.json").read_text())
    if saved.get("model_type") != model_type:     # a row that reuses another family's transformers class
        (out / "config.json").write_text(json.dumps(saved | {"model_type": model_type}, indent=2))
    for f in tok_files:
        shutil.copy2(f, out / f.name)
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2))
    return out
