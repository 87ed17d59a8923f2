"""Frozen configuration: model shape, quantization, cache and sampling.

Everything here is plain data. Validation raises ``ConfigError`` with a message a person can act on.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Mapping, Optional, Sequence

from .families import DEFAULT_FAMILY, FAMILIES, Family, unsupported


class ConfigError(ValueError):
    """A configuration value a user gave (or a checkpoint declared) that cannot work."""


@dataclass(frozen=True)
class Yarn:
    """YaRN RoPE scaling as config.json's ``rope_scaling`` / ``rope_parameters`` spell it (DeepSeek-V2-Lite:
    factor 40 over 4096 positions, mscale = mscale_all_dim = 0.707). ``rope.py`` turns it into frequencies,
    the cos/sin factor and the softmax scale, as transformers computes them."""
    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 0.0
    mscale_all_dim: float = 0.0
    attention_factor: Optional[float] = None
    truncate: bool = True


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
    # What differs per family (mixoff_app/families.py); the defaults are DEFAULT_FAMILY's (Mixtral's).
    # ``intermediate_size`` is always a routed expert's; dense layers and the shared expert have their own sizes.
    family: str = DEFAULT_FAMILY
    norm_topk_prob: bool = True
    shared_intermediate_size: int = 0          # 0: no shared expert
    dense_layers: tuple[int, ...] = ()         # decoder layers with a dense MLP instead of experts
    dense_intermediate_size: int = 0
    attn_bias: bool = False                    # q/k/v (and o, where the family says) carry biases
    clip_qkv: Optional[float] = None
    # Multi-head latent attention (the family's attention is "mla", DeepSeek-V2). ``head_dim`` is then the q/k
    # head width (qk_nope_head_dim + qk_rope_head_dim) and ``num_kv_heads`` equals ``num_heads``.
    kv_lora_rank: int = 0                      # the cached latent's width; 0: not MLA
    q_lora_rank: int = 0                       # 0: q_proj; else q_a_proj -> RMSNorm -> q_b_proj
    qk_rope_head_dim: int = 0                  # the rotated part of each q/k head (the rest is not rotated)
    v_head_dim: int = 0
    routed_scaling: float = 1.0                # routing weights times routed_scaling_factor
    rope_yarn: Optional[Yarn] = None           # YaRN RoPE (read for MLA models only)

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ConfigError(unsupported(self.family))
        if any(not 0 <= i < self.num_layers for i in self.dense_layers):
            raise ConfigError(f"dense layers {list(self.dense_layers)} lie outside 0..{self.num_layers - 1}")
        if not self.moe_layers:
            raise ConfigError("this model has no MoE layer: there are no experts to offload")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"num_attention_heads ({self.num_heads}) must be a multiple of "
                              f"num_key_value_heads ({self.num_kv_heads})")
        if not 1 <= self.top_k <= self.num_experts:
            raise ConfigError(f"num_experts_per_tok ({self.top_k}) must be within 1..num_local_experts "
                              f"({self.num_experts})")
        if self.traits.attention == "mla":
            rope, nope = self.qk_rope_head_dim, self.head_dim - self.qk_rope_head_dim
            if self.kv_lora_rank < 1 or self.v_head_dim < 1 or rope < 2 or rope % 2 or nope < 1:
                raise ConfigError(f"kv_lora_rank ({self.kv_lora_rank}), v_head_dim ({self.v_head_dim}), "
                                  f"qk_rope_head_dim ({rope}, even) and qk_nope_head_dim ({nope}) must be >= 1")

    @property
    def traits(self) -> Family:
        """This family's row of ``families.FAMILIES``: what differs from the other families."""
        return FAMILIES[self.family]

    @property
    def mla(self) -> bool:
        return self.traits.attention == "mla"

    @property
    def rope_dim(self) -> int:
        """The rotated width of a q/k head: all of it, or MLA's rope part."""
        return self.qk_rope_head_dim if self.mla else self.head_dim

    @property
    def kv_width(self) -> int:
        """Cached values per layer and position: K and V of every KV head, or MLA's latent and rotated key."""
        return self.kv_lora_rank + self.qk_rope_head_dim if self.mla else 2 * self.num_kv_heads * self.head_dim

    def attention_shapes(self) -> dict[str, tuple[int, int]]:
        """The attention's linears under their hub names, as (out, in); each is quantized with the attention
        spec. MLA's kv_b_proj is not among them: the absorbed attention multiplies by it per head, in the
        model's dtype (model.py)."""
        h, hd, nh = self.hidden_size, self.head_dim, self.num_heads
        if not self.mla:
            return {"q_proj": (nh * hd, h), "k_proj": (self.num_kv_heads * hd, h),
                    "v_proj": (self.num_kv_heads * hd, h), "o_proj": (h, nh * hd)}
        q = ({"q_proj": (nh * hd, h)} if not self.q_lora_rank else
             {"q_a_proj": (self.q_lora_rank, h), "q_b_proj": (nh * hd, self.q_lora_rank)})
        return q | {"kv_a_proj_with_mqa": (self.kv_lora_rank + self.qk_rope_head_dim, h),
                    "o_proj": (h, nh * self.v_head_dim)}

    @property
    def moe_layers(self) -> tuple[int, ...]:
        """Decoder layers that route to experts. The expert cache, stores, stats and traces count these
        layers only ("expert layer" j is decoder layer ``moe_layers[j]``); dense layers are trunk."""
        return tuple(i for i in range(self.num_layers) if i not in self.dense_layers)

    @property
    def num_moe_layers(self) -> int:
        return self.num_layers - len(self.dense_layers)

    @classmethod
    def from_hf(cls, cfg: Mapping[str, Any]) -> "ModelConfig":
        """Read a Hugging Face ``config.json`` dict (transformers 4 or 5 spelling) of a supported family."""
        model_type = cfg.get("model_type", DEFAULT_FAMILY)
        fam = FAMILIES.get(model_type)
        if fam is None:
            raise ConfigError(unsupported(model_type))
        rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
        rope_theta = cfg.get("rope_theta", rope.get("rope_theta", 1e6))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", None) and not (rope_type == "yarn" and fam.attention == "mla"):
            raise ConfigError(f"rope_type {rope_type!r} is not supported "
                              f"({'the default RoPE or YaRN' if fam.attention == 'mla' else 'only the default RoPE'})")
        if cfg.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"hidden_act {cfg['hidden_act']!r} is not supported (only silu)")
        if cfg.get("use_sliding_window"):
            raise ConfigError("use_sliding_window is set: sliding-window attention is not supported")
        eos = cfg.get("eos_token_id", 2)
        if isinstance(eos, list):
            eos = eos[0] if eos else None
        hidden, heads = cfg["hidden_size"], cfg["num_attention_heads"]
        num_experts = next((cfg[k] for k in fam.experts_key if cfg.get(k) is not None), None)
        if num_experts is None:
            raise ConfigError(f"config.json of a {model_type} model has no {fam.experts_key[0]}")
        layers = cfg["num_hidden_layers"]
        dense: tuple[int, ...] = ()
        if fam.dense_layers == "sparse_step":
            step = cfg.get("decoder_sparse_step", 1) or 1
            only = set(cfg.get("mlp_only_layers") or ())
            dense = tuple(i for i in range(layers) if i in only or (i + 1) % step)
        elif fam.dense_layers == "first_k":
            dense = tuple(range(min(int(cfg.get("first_k_dense_replace") or 0), layers)))
        renorm = fam.renorm if fam.renorm is not None else bool(cfg.get("norm_topk_prob", False))
        mla = _mla_fields(cfg, rope if rope_type == "yarn" else None) if fam.attention == "mla" else {}
        shared = 0
        if fam.shared_expert:
            shared = (cfg.get("shared_expert_intermediate_size", 0) if fam.shared_gate else
                      cfg[fam.expert_size_key] * (cfg.get("n_shared_experts") or 0))
        fields = dict(
            vocab_size=cfg["vocab_size"],
            hidden_size=hidden,
            intermediate_size=cfg[fam.expert_size_key],
            num_layers=layers,
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or hidden // heads,
            num_experts=num_experts,
            top_k=cfg["num_experts_per_tok"],
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-5),
            rope_theta=float(rope_theta),
            max_position_embeddings=cfg.get("max_position_embeddings", 32768),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            bos_token_id=cfg.get("bos_token_id", 1),
            eos_token_id=eos,
            family=model_type,
            norm_topk_prob=renorm,
            shared_intermediate_size=shared,
            dense_layers=dense,
            dense_intermediate_size=cfg.get("intermediate_size", 0) if dense else 0,
            attn_bias=bool(cfg.get(fam.bias_key, fam.bias_default)) if fam.bias_key else False,
            clip_qkv=cfg.get("clip_qkv") if fam.clip_qkv else None,
        )
        return cls(**(fields | mla))

    def to_hf(self) -> dict:
        """A Mixtral ``config.json`` (the tiny model and benches write Mixtral checkpoints; other families'
        test checkpoints are written by transformers' own config classes)."""
        if self.family != "mixtral":      # this writer spells Mixtral's keys; other families' are transformers'
            raise ConfigError(f"to_hf writes Mixtral configs only, not {self.family}")
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


def _mla_fields(cfg: Mapping[str, Any], yarn: Optional[Mapping[str, Any]]) -> dict:
    """DeepSeek-V2's fields beyond the common ones. What mixoff does not compute is refused in one sentence
    rather than approximated: grouped routing, renormalised top-k (transformers ignores ``norm_topk_prob``,
    DeepSeek's own code honours it, so the two references disagree), biases, sparse MoE steps."""
    heads = cfg["num_attention_heads"]
    refuse = [
        (cfg.get("topk_method", "greedy") != "greedy",
         f"topk_method {cfg.get('topk_method')!r} is not supported (only 'greedy': top-k over all experts)"),
        (cfg.get("scoring_func", "softmax") != "softmax",
         f"scoring_func {cfg.get('scoring_func')!r} is not supported (only 'softmax')"),
        (bool(cfg.get("norm_topk_prob")), "norm_topk_prob is set: renormalised top-k weights are not supported "
                                          "for deepseek_v2 (only norm_topk_prob false)"),
        ((cfg.get("moe_layer_freq") or 1) != 1,
         f"moe_layer_freq {cfg.get('moe_layer_freq')!r} is not supported (only 1: every layer after "
         f"first_k_dense_replace is an MoE layer)"),
        (bool(cfg.get("attention_bias")) or bool(cfg.get("mlp_bias")),
         "attention_bias / mlp_bias is set: biases are not supported for deepseek_v2"),
        ((cfg.get("num_key_value_heads") or heads) != heads,
         f"num_key_value_heads ({cfg.get('num_key_value_heads')}) must equal num_attention_heads ({heads}) "
         f"in multi-head latent attention"),
    ]
    for bad, sentence in refuse:
        if bad:
            raise ConfigError(sentence)
    out = dict(num_kv_heads=heads, head_dim=cfg["qk_nope_head_dim"] + cfg["qk_rope_head_dim"],
               kv_lora_rank=cfg["kv_lora_rank"], q_lora_rank=cfg.get("q_lora_rank") or 0,
               qk_rope_head_dim=cfg["qk_rope_head_dim"], v_head_dim=cfg["v_head_dim"],
               routed_scaling=float(cfg.get("routed_scaling_factor", 1.0)))
    if yarn is not None:
        if yarn.get("factor") is None or yarn.get("original_max_position_embeddings") is None:
            raise ConfigError("rope_scaling of type yarn needs its factor and original_max_position_embeddings")
        out["rope_yarn"] = Yarn(
            factor=float(yarn["factor"]),
            original_max_position_embeddings=int(yarn["original_max_position_embeddings"]),
            beta_fast=float(yarn.get("beta_fast") or 32), beta_slow=float(yarn.get("beta_slow") or 1),
            mscale=float(yarn.get("mscale") or 0), mscale_all_dim=float(yarn.get("mscale_all_dim") or 0),
            attention_factor=None if yarn.get("attention_factor") is None else float(yarn["attention_factor"]),
            truncate=bool(yarn.get("truncate", True)))
    return out


SUPPORTED_BITS = (2, 3, 4, 8)
FAMILY = "family"       # bits left to the model family (its row's expert_bits, families.py)

# Prompts are prefilled this many tokens at a time: activations (and the planner's allowance for them) are
# bounded by the chunk, not by the prompt.
PREFILL_CHUNK = 512
DEFAULT_MAX_BATCH = 4     # answers decoded together by default (docs/BENCHMARKS.md: batching on the CPU)


# How a quantized weight's codes are held: "hqq" (groups along the output dimension, hqq's axis 0, read by the
# reference dequantization and the Triton kernels); "int4" and "int8", the formats of torch's CPU kernels
# (cpu_weights.py): 4-bit codes in groups along the input dimension, and 8-bit codes with one scale per row.
PACKINGS = ("hqq", "int4", "int8")
INT4_GROUPS = (32, 64, 128, 256)      # the group sizes torch's int4 CPU kernel takes


@dataclass(frozen=True)
class QuantSpec:
    """HQQ settings for one family of linear layers; ``bits=None`` keeps them in floating point.

    ``scale_group``/``zero_group`` quantize the per-group scales and zeros to 8 bits, as the reference
    checkpoint does (scale: channel-wise groups of ``scale_group``; zero: one group for the tensor).
    ``packing`` is how the codes are held (``PACKINGS``); the CPU formats ignore ``scale_group`` and
    ``quant_zero`` (their scales and zeros are bfloat16), and int4 codes are ordered the way torch's kernel
    reads them on one kind of CPU (``int4_layout``, cpu_weights.LAYOUTS).
    """
    bits: Optional[int] = None
    group_size: int = 64
    scale_group: Optional[int] = 128
    quant_zero: bool = True
    packing: str = "hqq"
    int4_layout: str = ""

    def __post_init__(self) -> None:
        if self.bits is not None and self.bits not in SUPPORTED_BITS:
            raise ConfigError(f"unsupported bit width {self.bits}: choose one of "
                              f"{', '.join(map(str, SUPPORTED_BITS))} or 'none'")
        if self.bits is not None and (self.group_size <= 0 or self.group_size % 8):
            raise ConfigError(f"group size {self.group_size} must be a positive multiple of 8")
        if self.packing not in PACKINGS:
            raise ConfigError(f"unknown packing {self.packing!r}: one of {', '.join(PACKINGS)}")
        if self.packing == "int4" and (self.bits != 4 or self.group_size not in INT4_GROUPS or not self.int4_layout):
            raise ConfigError(f"int4 packing holds 4-bit codes in groups of {', '.join(map(str, INT4_GROUPS))} "
                              f"with an int4_layout, not {self.bits}-bit g{self.group_size} {self.int4_layout!r}")
        if self.packing == "int8" and self.bits != 8:
            raise ConfigError(f"int8 packing holds 8-bit codes, not {self.bits}-bit")

    @property
    def enabled(self) -> bool:
        return self.bits is not None

    def describe(self) -> str:
        if self.bits is None:
            return "none"
        if self.packing == "int8":
            return "8-bit per row (cpu int8)"
        return f"{self.bits}-bit g{self.group_size}" + (" (cpu int4)" if self.packing == "int4" else "")


@dataclass(frozen=True)
class QuantConfig:
    """``family_default``: the experts' spec is the model family's (``expert_quant``), decided once the
    config is read; ``experts`` then only stands for Mixtral's. ``lm_head`` stays in the model's dtype unless
    a CPU format holds it (cpu_weights.cpu_quant: int8 per row, read by its kernel)."""
    attn: QuantSpec = QuantSpec(bits=4, group_size=64, scale_group=256)
    experts: QuantSpec = QuantSpec(bits=2, group_size=16, scale_group=128)
    family_default: bool = False
    lm_head: QuantSpec = QuantSpec(bits=None)

    def describe(self) -> str:
        lm = f", lm_head {self.lm_head.describe()}" if self.lm_head.enabled else ""
        return f"attention {self.attn.describe()}, experts {self.experts.describe()}{lm}"

    @classmethod
    def from_bits(cls, attn_bits: Optional[int], expert_bits: "Optional[int] | str") -> "QuantConfig":
        """``expert_bits`` may be ``FAMILY`` ("family"): the model family's expert spec."""
        d = cls()
        if expert_bits == FAMILY:
            return cls(attn=replace(d.attn, bits=attn_bits), family_default=True)
        return cls(attn=replace(d.attn, bits=attn_bits), experts=replace(d.experts, bits=expert_bits))

    def for_family(self, family: str) -> "QuantConfig":
        """The quantization for a model of ``family``: the family's expert spec when asked for."""
        if not self.family_default:
            return self
        fam = FAMILIES.get(family)
        return replace(self, experts=expert_quant(fam) if fam else self.experts, family_default=False)


def expert_quant(fam: Family) -> QuantSpec:
    """A family's default expert quantization, from its row (why each: the note under families.FAMILIES)."""
    return QuantSpec(bits=fam.expert_bits, group_size=fam.expert_group_size, scale_group=128)


FAMILY_QUANT = QuantConfig(family_default=True)     # what the CLI and the app use unless bits are given


NO_QUANT = QuantConfig(attn=QuantSpec(bits=None), experts=QuantSpec(bits=None))


def parse_bits(text: str | int | None) -> "Optional[int] | str":
    """'none' | '2' | 4 -> bits, 'family' -> FAMILY (the family's default); anything else is a clear ConfigError."""
    if text == FAMILY:
        return FAMILY
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
KERNELS = ("auto", "triton", "torch", "cpu")     # quantized matmul: see mixoff_app/kernels
PLACEMENTS = ("inclusive", "exclusive", "disk")
CPU_EXPERTS = ("auto", "off", "all")   # where a decode miss runs: see mixoff_app/cpu_experts.py


def format_k(sizes: Sequence[int], counts: bool = False) -> str:
    """Experts per layer on the device as people read them, the one way every output writes it: "4", or "4-5"
    when a plan gives layers different k (with ``counts``: "4-5 (15x4, 17x5)")."""
    ks = sorted(set(sizes))
    if len(ks) <= 1:
        return "".join(map(str, ks))
    text = f"{ks[0]}-{ks[-1]}"
    return f"{text} ({', '.join(f'{list(sizes).count(k)}x{k}' for k in ks)})" if counts else text


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
    quant: QuantConfig = FAMILY_QUANT     # experts by family unless given (QuantConfig.for_family)
    cache: CacheConfig = CacheConfig()
    max_context: int = 4096
    dtype: Optional[str] = None           # None: float16 on cuda, float32 on cpu
    tokenizer: Optional[str] = None       # overrides where the tokenizer and chat template come from
    vram_budget: Optional[int] = None     # bytes mixoff may allocate on the device (torch peak allocated)
    ram_budget: Optional[int] = None      # bytes loading may add to the process RSS
    kernel: str = "auto"                  # quantized matmul: auto (triton on CUDA, cpu on a CPU) | triton | torch | cpu
    cuda_graphs: bool = False             # replay decode steps as CUDA graphs (GPU only; off until measured)
    max_input_chars: Optional[int] = None  # message / system prompt character limit (None: from the context)
    max_batch: Optional[int] = None       # answers decoded together (None: DEFAULT_MAX_BATCH, fewer if the plan says)
    per_client: Optional[int] = None      # of those, at most this many for one client (None: half, rounded up)
    max_waiting: int = 16                 # answers that may wait for a free slot; beyond, new ones are refused
    cpu_experts: str = "auto"             # decode misses on the CPU from the host copy: auto (off until measured) | off | all

    def __post_init__(self) -> None:
        for name in ("max_batch", "per_client"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 1):
                raise ConfigError(f"{name} must be a whole number >= 1, not {v!r}")
        if not isinstance(self.max_waiting, int) or self.max_waiting < 0:
            raise ConfigError(f"max_waiting must be a whole number >= 0, not {self.max_waiting!r}")
        if self.cpu_experts not in CPU_EXPERTS:
            raise ConfigError(f"cpu_experts must be one of {', '.join(CPU_EXPERTS)}, not {self.cpu_experts!r}")

    def planned(self, device_type: str) -> bool:
        """The memory planner sizes the load on a GPU and under a budget; elsewhere memory does not limit it."""
        return device_type == "cuda" or self.vram_budget is not None or self.ram_budget is not None
