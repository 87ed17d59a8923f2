"""Checks a checkpoint must pass before it serves anyone: config types and ranges, every tensor's shape
against the config, and finite weights. Each failure is one sentence naming the file and the tensor.

Family-agnostic: config checks run on the parsed ``ModelConfig`` fields (whatever names a family's
config.json uses), tensor checks on (name, tensor, expected shape) rows the loader builds.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional

import torch


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or must not be served: the message names the file or key and what
    to do. (``checkpoints.CheckpointError`` is this class.)"""


# ModelConfig fields that are sizes (whole numbers >= 1), and the config.json key a person would look for.
SIZE_FIELDS = {"vocab_size": "vocab_size", "hidden_size": "hidden_size", "intermediate_size": "intermediate_size",
               "num_layers": "num_hidden_layers", "num_heads": "num_attention_heads",
               "num_kv_heads": "num_key_value_heads", "head_dim": "head_dim",
               "num_experts": "num_local_experts", "top_k": "num_experts_per_tok",
               "max_position_embeddings": "max_position_embeddings"}
# Sizes only some families have (multi-head latent attention): 0 where the family has none. qk_nope_head_dim is
# no ModelConfig field (it is head_dim - qk_rope_head_dim), so only its config.json value is checked.
OPTIONAL_SIZES = {"kv_lora_rank": "kv_lora_rank", "q_lora_rank": "q_lora_rank",
                  "qk_rope_head_dim": "qk_rope_head_dim", "qk_nope_head_dim": "qk_nope_head_dim",
                  "v_head_dim": "v_head_dim"}
POSITIVE_FLOATS = {"rms_norm_eps": "rms_norm_eps", "rope_theta": "rope_theta"}
TOKEN_IDS = {"bos_token_id": "bos_token_id", "eos_token_id": "eos_token_id"}
MAX_SIZE = 1 << 31           # beyond any model: larger values would only overflow an allocation


def whole(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_config_object(data: Any, path: Path) -> Mapping:
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: config.json must be a JSON object of settings, not a "
                              f"{type(data).__name__}")
    return data


def check_config_values(values: Mapping[str, Any], path: Path) -> None:
    """Types and ranges of the parsed fields (before anything divides or allocates with them)."""
    for name, key in SIZE_FIELDS.items():
        if name not in values:
            continue
        v = values[name]
        if not whole(v) or not 1 <= v < MAX_SIZE:
            raise CheckpointError(f"{path}: {key} must be a whole number >= 1, not {_show(v)}")
    for name, key in OPTIONAL_SIZES.items():
        v = values.get(name)
        if v is not None and (not whole(v) or not 0 <= v < MAX_SIZE):
            raise CheckpointError(f"{path}: {key} must be a whole number >= 0, not {_show(v)}")
    for name, key in POSITIVE_FLOATS.items():
        if name not in values:
            continue
        v = values[name]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise CheckpointError(f"{path}: {key} must be a positive number, not {_show(v)}")
    for name, key in TOKEN_IDS.items():
        v = values.get(name)
        if v is not None and (not whole(v) or v < 0):
            raise CheckpointError(f"{path}: {key} must be a token id (a whole number >= 0), not {_show(v)}")
    vocab = values.get("vocab_size")
    for name, key in TOKEN_IDS.items():
        v = values.get(name)
        if v is not None and whole(vocab) and v >= vocab:
            raise CheckpointError(f"{path}: {key} {v} is outside the vocabulary of {vocab} tokens")


def _show(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 40 else text[:37] + "..."


def check_tensors(rows: Iterable[tuple[str, torch.Tensor, Optional[tuple[int, ...]]]],
                  where: Callable[[str], Any], finite: bool = True) -> None:
    """Each (name, tensor, expected shape or None): the shape matches, and floating tensors hold only finite
    values. ``where(name)`` names the file the tensor came from."""
    for name, t, shape in rows:
        if t is None:
            continue
        if shape is not None and tuple(t.shape) != tuple(shape):
            raise CheckpointError(f"{where(name)}: tensor {name} has shape {tuple(t.shape)}, and config.json "
                                  f"implies {tuple(shape)}; the checkpoint and its config.json do not match")
        if finite and t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()):
            raise CheckpointError(f"{where(name)}: tensor {name} holds NaN or infinite values; the checkpoint "
                                  f"is damaged (download or convert it again)")


def sample_experts(num_layers: int, num_experts: int) -> set[tuple[int, int]]:
    """Experts whose weights are checked for finite values at load: every expert of the first layer and one
    per later layer (a different one each layer), so a damaged shard is found without reading every blob
    twice."""
    return {(0, e) for e in range(num_experts)} | {(i, i % num_experts) for i in range(num_layers)}


def check_vocab(tokenizer_size: int, vocab_size: int, where: str) -> None:
    if tokenizer_size > vocab_size:
        raise CheckpointError(f"{where}: the tokenizer has {tokenizer_size} tokens but the model's vocabulary "
                              f"(vocab_size) has {vocab_size}; this tokenizer does not belong to this checkpoint")
