"""Frozen configuration: model shape, quantization, cache and sampling.

Everything here is plain data. Validation raises ``ConfigError`` with a message a person can act on.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Mapping, Optional, Sequence


class ConfigError(ValueError):
    """A configuration value a user gave (or a checkpoint declared) that cannot work."""


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    num_experts: int
    top_k: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 1e6
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False
    bos_token_id: Optional[int] = 1
    eos_token_id: Optional[int] = 2

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"num_attention_heads ({self.num_heads}) must be a multiple of "
                              f"num_key_value_heads ({self.num_kv_heads})")
        if not 1 <= self.top_k <= self.num_experts:
            raise ConfigError(f"num_experts_per_tok ({self.top_k}) must be within 1..num_local_experts "
                              f"({self.num_experts})")

    @classmethod
    def from_hf(cls, cfg: Mapping[str, Any]) -> "ModelConfig":
        """Read a Hugging Face ``config.json`` dict (transformers 4 or 5 spelling)."""
        model_type = cfg.get("model_type", "mixtral")
        if model_type != "mixtral":
            raise ConfigError(f"model_type is {model_type!r}; mixoff runs Mixtral-architecture models only")
        rope = cfg.get("rope_parameters") or {}
        rope_theta = cfg.get("rope_theta", rope.get("rope_theta", 1e6))
        if rope.get("rope_type", "default") not in ("default", None):
            raise ConfigError(f"rope_type {rope.get('rope_type')!r} is not supported (only the default RoPE)")
        eos = cfg.get("eos_token_id", 2)
        if isinstance(eos, list):
            eos = eos[0] if eos else None
        hidden, heads = cfg["hidden_size"], cfg["num_attention_heads"]
        return cls(
            vocab_size=cfg["vocab_size"],
            hidden_size=hidden,
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads", heads),
            head_dim=cfg.get("head_dim") or hidden // heads,
            num_experts=cfg["num_local_experts"],
            top_k=cfg["num_experts_per_tok"],
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-5),
            rope_theta=float(rope_theta),
            max_position_embeddings=cfg.get("max_position_embeddings", 32768),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            bos_token_id=cfg.get("bos_token_id", 1),
            eos_token_id=eos,
        )

    def to_hf(self) -> dict:
        return {
            "architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
            "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size, "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads, "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim, "num_local_experts": self.num_experts,
            "num_experts_per_tok": self.top_k, "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta, "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings, "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id, "hidden_act": "silu", "sliding_window": None,
            "router_jitter_noise": 0.0, "attention_dropout": 0.0,
        }


SUPPORTED_BITS = (2, 3, 4, 8)

# Prompts are prefilled this many tokens at a time: activations (and the planner's allowance for them) are
# bounded by the chunk, not by the prompt.
PREFILL_CHUNK = 512


@dataclass(frozen=True)
class QuantSpec:
    """HQQ settings for one family of linear layers; ``bits=None`` keeps them in floating point.

    ``scale_group``/``zero_group`` quantize the per-group scales and zeros to 8 bits, as the reference
    checkpoint does (scale: channel-wise groups of ``scale_group``; zero: one group for the tensor).
    """
    bits: Optional[int] = None
    group_size: int = 64
    scale_group: Optional[int] = 128
    quant_zero: bool = True

    def __post_init__(self) -> None:
        if self.bits is not None and self.bits not in SUPPORTED_BITS:
            raise ConfigError(f"unsupported bit width {self.bits}: choose one of "
                              f"{', '.join(map(str, SUPPORTED_BITS))} or 'none'")
        if self.bits is not None and (self.group_size <= 0 or self.group_size % 8):
            raise ConfigError(f"group size {self.group_size} must be a positive multiple of 8")

    @property
    def enabled(self) -> bool:
        return self.bits is not None

    def describe(self) -> str:
        return "none" if self.bits is None else f"{self.bits}-bit g{self.group_size}"


@dataclass(frozen=True)
class QuantConfig:
    attn: QuantSpec = QuantSpec(bits=4, group_size=64, scale_group=256)
    experts: QuantSpec = QuantSpec(bits=2, group_size=16, scale_group=128)

    @classmethod
    def from_bits(cls, attn_bits: Optional[int], expert_bits: Optional[int]) -> "QuantConfig":
        d = cls()
        return cls(attn=replace(d.attn, bits=attn_bits), experts=replace(d.experts, bits=expert_bits))


NO_QUANT = QuantConfig(attn=QuantSpec(bits=None), experts=QuantSpec(bits=None))


def parse_bits(text: str | int | None) -> Optional[int]:
    """'none' | '2' | 4 -> bits; anything else is a clear ConfigError."""
    if text is None or (isinstance(text, str) and text.strip().lower() in ("none", "off", "fp", "16")):
        return None
    try:
        bits = int(text)
    except (TypeError, ValueError):
        raise ConfigError(f"bits must be one of {', '.join(map(str, SUPPORTED_BITS))} or 'none', not {text!r}")
    if bits not in SUPPORTED_BITS:
        raise ConfigError(f"unsupported bit width {bits}: choose one of "
                          f"{', '.join(map(str, SUPPORTED_BITS))} or 'none'")
    return bits


POLICIES = ("lru", "lfu", "lrfu")
KERNELS = ("auto", "triton", "torch")     # quantized matmul: see mixoff_app/kernels
PLACEMENTS = ("inclusive", "exclusive", "disk")


@dataclass(frozen=True)
class CacheConfig:
    """Per-layer device cache. ``sizes``: k per layer (experts kept on the device); one value means every
    layer. ``placement``: where the experts live (``PLACEMENTS``). None for either: the memory planner decides
    (on a GPU or under a budget); without one, every expert on the device, inclusive. ``prefetch`` is how many
    experts to guess per layer ahead (0: off)."""
    sizes: Optional[tuple[int, ...]] = None
    policy: str = "lru"
    prefetch: int = 0
    prefetch_layers: int = 1
    placement: Optional[str] = None

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ConfigError(f"unknown eviction policy {self.policy!r}: choose one of {', '.join(POLICIES)}")
        if self.placement is not None and self.placement not in PLACEMENTS:
            raise ConfigError(f"unknown placement {self.placement!r}: choose one of {', '.join(PLACEMENTS)}")
        if self.prefetch < 0 or self.prefetch_layers < 1:
            raise ConfigError("prefetch must be >= 0 and prefetch_layers >= 1")
        if self.sizes is not None:
            sizes = tuple(int(k) for k in self.sizes)
            if not sizes:
                raise ConfigError("no cache sizes given")
            # The one normal form: the same k everywhere is written once.
            object.__setattr__(self, "sizes", sizes[:1] if len(set(sizes)) == 1 else sizes)

    def layer_sizes(self, num_layers: int, num_experts: int) -> tuple[int, ...]:
        """k for every layer (None: every expert)."""
        sizes = self.sizes if self.sizes is not None else (num_experts,)
        if len(sizes) == 1:
            sizes = sizes * num_layers
        if len(sizes) != num_layers:
            raise ConfigError(f"{len(sizes)} per-layer cache sizes given for {num_layers} layers")
        for k in sizes:
            if not 1 <= k <= num_experts:
                raise ConfigError(f"cache size {k} must be between 1 and the number of experts ({num_experts})")
        return tuple(sizes)


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 0.7
    top_p: float = 0.9
    top_k: int = 0
    greedy: bool = False
    stop: tuple[str, ...] = ()
    seed: Optional[int] = None

    def __post_init__(self) -> None:
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be a whole number >= 1, not {self.max_new_tokens!r}")
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature)
                and self.temperature >= 0):
            raise ConfigError(f"temperature must be a finite number >= 0, not {self.temperature!r}")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise ConfigError(f"top_p must be in (0, 1], not {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ConfigError(f"top_k must be a whole number >= 0 (0 = off), not {self.top_k!r}")

    @property
    def is_greedy(self) -> bool:
        return self.greedy or self.temperature == 0


@dataclass(frozen=True)
class EngineConfig:
    """What to load and how. ``model`` is a hub id, a local folder, ``tiny`` or a preset name."""
    model: str = "tiny"
    device: Optional[str] = None          # None: cuda where available, else cpu
    quant: QuantConfig = QuantConfig()
    cache: CacheConfig = CacheConfig()
    max_context: int = 4096
    dtype: Optional[str] = None           # None: float16 on cuda, float32 on cpu
    tokenizer: Optional[str] = None       # overrides where the tokenizer and chat template come from
    vram_budget: Optional[int] = None     # bytes mixoff may allocate on the device (torch peak allocated)
    ram_budget: Optional[int] = None      # bytes loading may add to the process RSS
    kernel: str = "auto"                  # quantized matmul: auto (triton on CUDA, torch elsewhere) | triton | torch
    cuda_graphs: bool = False             # replay decode steps as CUDA graphs (GPU only; off until measured)
    max_input_chars: Optional[int] = None  # message / system prompt character limit (None: from the context)

    def planned(self, device_type: str) -> bool:
        """The memory planner sizes the load on a GPU and under a budget; elsewhere memory does not limit it."""
        return device_type == "cuda" or self.vram_budget is not None or self.ram_budget is not None
