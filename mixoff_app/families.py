"""What differs between the MoE families mixoff runs: a table, read by the config, the loader and the forward.

Every family shares one decoder (pre-norm RMSNorm, RoPE, GQA attention, a SwiGLU MLP or a routed MoE of SwiGLU
experts); the differences are small and listed here, each held to transformers' own implementation of that
``model_type`` by tests/test_families.py:

- where the MoE block and its experts live in the hub checkpoint, and what the three expert matrices are called;
- q/k RMSNorm: none (Mixtral, Qwen2-MoE), per head over ``head_dim`` (Qwen3-MoE), or over the whole q and k
  projections before the heads are split (OLMoE);
- a shared expert, always on, scaled by ``sigmoid(shared_expert_gate(x))`` (Qwen2-MoE);
- whether the top-k routing weights are renormalised to sum to one: always for Mixtral; ``norm_topk_prob``
  from the config for the others (Qwen1.5-MoE and OLMoE leave it off, Qwen3-MoE turns it on);
- which attention projections carry a bias, and which config key says so;
- dense (non-MoE) layers: ``mlp_only_layers`` and ``decoder_sparse_step`` (the Qwen families), or the first
  ``first_k_dense_replace`` layers (DeepSeek-V2);
- the attention: grouped-query attention over per-head K/V (every family but one), or DeepSeek-V2's multi-head
  latent attention (MLA), whose cache holds one compressed latent per position (``model.py``'s MLA path);
- what is not about the forward but still per family: the default expert quantization (``--expert-bits
  family``), and transformers' config class (tiny test checkpoints of the family are written by it).

Adding a family is one row here: the config reader, the loader (hub, reference and own formats), the disk
store, the planner and the tiny-checkpoint writer read everything per family from the row
(tests/test_family_table.py adds a sixth in its test and loads it end to end).

Routing is the same softmax-then-top-k in all five (in float32), so it is not in the table. DeepSeek-V2's
routing options beyond that (``topk_method``, ``routed_scaling_factor``, its YaRN RoPE) are read, or refused,
by ``config.py``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class Family:
    model_type: str
    moe: str                          # module of the router and experts under model.layers.L.
    expert_names: tuple[str, str, str]   # hub names of (gate, up, down) = our (w1, w3, w2)
    qk_norm: str                      # "none" | "head" (per head, over head_dim) | "proj" (over the projection)
    shared_expert: bool               # a sigmoid-gated shared expert beside the routed ones
    renorm: Optional[bool]            # top-k weights renormalised: True/False fixed, None = config's norm_topk_prob
    bias_key: Optional[str]           # config key that turns on attention biases
    bias_default: bool                # its value when config.json leaves it out (Qwen1.5-MoE's hub config does)
    bias_o: bool                      # whether that bias covers o_proj too (not only q/k/v)
    dense_layers: Optional[str]       # None | "sparse_step" (mlp_only_layers / decoder_sparse_step) | "first_k"
    experts_key: tuple[str, ...]      # config keys for the number of routed experts (first found wins)
    expert_size_key: str              # config key of a routed expert's intermediate size
    clip_qkv: bool                    # honours config clip_qkv
    example: str                      # a hub repo id to start with (and its tokenizer, when a checkpoint has none)
    hf_config: str                    # transformers' config class (tiny.make_family_checkpoint writes with it)
    expert_bits: int                  # default expert quantization (``--expert-bits family``): bits and
    expert_group_size: int            # HQQ group size, as measured (the note under FAMILIES says why)
    shared_name: str = "shared_expert"   # the shared expert's module under mlp. (DeepSeek: shared_experts)
    shared_gate: bool = True          # the shared expert is scaled by sigmoid(shared_expert_gate x) (Qwen2-MoE)
    attention: str = "gqa"            # "gqa" | "mla" (DeepSeek-V2's multi-head latent attention)

    def expert_prefix(self, layer: int, expert: int) -> str:
        return f"model.layers.{layer}.{self.moe}.experts.{expert}"

    def router_key(self, layer: int) -> str:
        return f"model.layers.{layer}.{self.moe}.gate.weight"

    def expert_blob_key(self, layer: int, expert: int) -> str:
        """The one tensor of an expert in mixoff's own format (its packed blob)."""
        return f"{self.expert_prefix(layer, expert)}.packed"


FAMILIES: dict[str, Family] = {f.model_type: f for f in (
    Family("mixtral", "block_sparse_moe", ("w1", "w3", "w2"), qk_norm="none", shared_expert=False, renorm=True,
           bias_key=None, bias_default=False, bias_o=False, dense_layers=None, experts_key=("num_local_experts", "num_experts"),
           expert_size_key="intermediate_size", clip_qkv=False, example="mistralai/Mixtral-8x7B-Instruct-v0.1",
           hf_config="MixtralConfig", expert_bits=2, expert_group_size=16),
    Family("qwen2_moe", "mlp", ("gate_proj", "up_proj", "down_proj"), qk_norm="none", shared_expert=True,
           renorm=None, bias_key="qkv_bias", bias_default=True, bias_o=False, dense_layers="sparse_step",
           experts_key=("num_experts", "num_local_experts"), expert_size_key="moe_intermediate_size",
           clip_qkv=False, example="Qwen/Qwen1.5-MoE-A2.7B-Chat", hf_config="Qwen2MoeConfig", expert_bits=4,
           expert_group_size=64),
    Family("qwen3_moe", "mlp", ("gate_proj", "up_proj", "down_proj"), qk_norm="head", shared_expert=False,
           renorm=None, bias_key="attention_bias", bias_default=False, bias_o=True, dense_layers="sparse_step",
           experts_key=("num_experts", "num_local_experts"), expert_size_key="moe_intermediate_size",
           clip_qkv=False, example="Qwen/Qwen3-30B-A3B-Instruct-2507", hf_config="Qwen3MoeConfig", expert_bits=4,
           expert_group_size=64),
    Family("olmoe", "mlp", ("gate_proj", "up_proj", "down_proj"), qk_norm="proj", shared_expert=False,
           renorm=None, bias_key="attention_bias", bias_default=False, bias_o=True, dense_layers=None,
           experts_key=("num_experts", "num_local_experts"), expert_size_key="intermediate_size",
           clip_qkv=True, example="allenai/OLMoE-1B-7B-0924-Instruct", hf_config="OlmoeConfig", expert_bits=4,
           expert_group_size=64),
    # norm_topk_prob is refused when set (transformers ignores it, DeepSeek's own code honours it), so the
    # top-k weights are the softmax's, times routed_scaling_factor.
    Family("deepseek_v2", "mlp", ("gate_proj", "up_proj", "down_proj"), qk_norm="none", shared_expert=True,
           renorm=False, bias_key=None, bias_default=False, bias_o=False, dense_layers="first_k",
           experts_key=("n_routed_experts",), expert_size_key="moe_intermediate_size", clip_qkv=False,
           example="deepseek-ai/DeepSeek-V2-Lite-Chat", shared_name="shared_experts", shared_gate=False,
           attention="mla", hf_config="DeepseekV2Config", expert_bits=4, expert_group_size=64),
)}

# Hub names of a dense MLP (a dense layer, or the shared expert under ``mlp.shared_expert(s)``).
DENSE_NAMES = ("gate_proj", "up_proj", "down_proj")

# The family of a file that does not name one: mixoff-format files written before families were recorded (they
# were all Mixtral), and a config.json without ``model_type`` (Mixtral's first hub configs).
DEFAULT_FAMILY = "mixtral"

# Default expert quantization (expert_bits, expert_group_size; measured in bench/quant_families.py,
# docs/BENCHMARKS.md): on tiny checkpoints of every family, 2-bit g16 experts add about 8x the logits divergence 4-bit g64 experts
# add (3-bit g64 halves 2-bit's at 3.75 bits a weight, dominated by 4-bit's 4.25). Mixtral keeps the reference's
# 2-bit g16 (3.02 bits a weight): it is what fits 47B parameters on small cards. The other families are small
# enough that 4-bit still fits the reference machines (Qwen3-30B-A3B: 15.9 GiB of experts in host RAM and 78-79
# of 128 per layer on a 12 GB card; DeepSeek-V2-Lite's experts have Qwen1.5-MoE's shape, 1408 x 2048: all 1664
# on a 12 GB card), so they get it.


def hub_expert_suffixes() -> tuple[str, ...]:
    """How the first expert's gate projection ends in a hub checkpoint of any family (format detection)."""
    return tuple(sorted({f"experts.0.{f.expert_names[0]}.weight" for f in FAMILIES.values()}))


def unsupported(model_type: object) -> str:
    """The one sentence a refused ``model_type`` gets."""
    return f"model_type is {model_type!r}; mixoff runs these MoE families: {', '.join(FAMILIES)}"
