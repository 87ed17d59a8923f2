"""Model shapes by name, in one table (gpt-fast's ``ModelArgs.from_name``): the planner, the tiny builders,
the benchmarks and the demo model's trainer all read their shapes here.

Adding a model is adding a row to ``PRESETS`` (and its hub ids to ``HUB_IDS``, so a plan can be made before
any download). Names are matched exactly, never guessed from a substring.
"""
from __future__ import annotations

from typing import Optional

from .config import ConfigError, ModelConfig, Yarn

PRESETS: dict[str, ModelConfig] = {
    "mixtral-8x7b": ModelConfig(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_layers=32,
                                num_heads=32, num_kv_heads=8, head_dim=128, num_experts=8, top_k=2,
                                rope_theta=1e6, max_position_embeddings=32768),
    "mixtral-8x22b": ModelConfig(vocab_size=32768, hidden_size=6144, intermediate_size=16384, num_layers=56,
                                 num_heads=48, num_kv_heads=8, head_dim=128, num_experts=8, top_k=2,
                                 rope_theta=1e6, max_position_embeddings=65536),
    # The other families' shapes are their hub config.json's (tests/fixtures/hub_configs holds the files, and
    # tests/test_families.py reads them back as these rows): Qwen/Qwen3-30B-A3B-Instruct-2507,
    # Qwen/Qwen1.5-MoE-A2.7B-Chat, allenai/OLMoE-1B-7B-0924-Instruct, deepseek-ai/DeepSeek-V2-Lite-Chat.
    "qwen3-30b-a3b": ModelConfig(vocab_size=151936, hidden_size=2048, intermediate_size=768, num_layers=48,
                                 num_heads=32, num_kv_heads=4, head_dim=128, num_experts=128, top_k=8,
                                 rms_norm_eps=1e-6, rope_theta=1e7, max_position_embeddings=262144,
                                 bos_token_id=151643, eos_token_id=151645, family="qwen3_moe", norm_topk_prob=True),
    "qwen1.5-moe-a2.7b": ModelConfig(vocab_size=151936, hidden_size=2048, intermediate_size=1408, num_layers=24,
                                     num_heads=16, num_kv_heads=16, head_dim=128, num_experts=60, top_k=4,
                                     rms_norm_eps=1e-6, rope_theta=1e6, max_position_embeddings=8192,
                                     bos_token_id=151643, eos_token_id=151645, family="qwen2_moe",
                                     norm_topk_prob=False, shared_intermediate_size=5632, attn_bias=True),
    "olmoe-1b-7b": ModelConfig(vocab_size=50304, hidden_size=2048, intermediate_size=1024, num_layers=16,
                               num_heads=16, num_kv_heads=16, head_dim=128, num_experts=64, top_k=8,
                               rms_norm_eps=1e-5, rope_theta=1e4, max_position_embeddings=4096,
                               bos_token_id=None, eos_token_id=50279, family="olmoe", norm_topk_prob=False),
    # MLA: head_dim is q/k's 128 + 64 (nope + rope); the cache holds a 512 + 64 latent per layer and position.
    # Layer 0 is dense (first_k_dense_replace 1); 2 shared experts of 1408 are one resident MLP of 2816.
    "deepseek-v2-lite": ModelConfig(vocab_size=102400, hidden_size=2048, intermediate_size=1408, num_layers=27,
                                    num_heads=16, num_kv_heads=16, head_dim=192, num_experts=64, top_k=6,
                                    rms_norm_eps=1e-6, rope_theta=1e4, max_position_embeddings=163840,
                                    bos_token_id=100000, eos_token_id=100001, family="deepseek_v2",
                                    norm_topk_prob=False, shared_intermediate_size=2816, dense_layers=(0,),
                                    dense_intermediate_size=10944, kv_lora_rank=512, qk_rope_head_dim=64,
                                    v_head_dim=128,
                                    rope_yarn=Yarn(factor=40.0, original_max_position_embeddings=4096,
                                                   mscale=0.707, mscale_all_dim=0.707)),
    # the shipped demo model (assets/tiny-chat); max_position_embeddings is its training context
    "tiny": ModelConfig(vocab_size=4096, hidden_size=256, intermediate_size=384, num_layers=4, num_heads=8,
                        num_kv_heads=4, head_dim=32, num_experts=8, top_k=2, rope_theta=1e4,
                        max_position_embeddings=512),
    # the random tiny model (``make-tiny``, the tests' parity oracle)
    "tiny-random": ModelConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=4, num_heads=4,
                               num_kv_heads=2, head_dim=16, num_experts=8, top_k=2, rope_theta=1e6,
                               max_position_embeddings=2048),
    # bench/gpu_offload.py's small shape: enough layers for prefetch to matter, small enough for any GPU
    "tiny-bench": ModelConfig(vocab_size=512, hidden_size=128, intermediate_size=384, num_layers=8, num_heads=4,
                              num_kv_heads=2, head_dim=32, num_experts=8, top_k=2, max_position_embeddings=512),
    # bench/decode_cpu.py: Mixtral's structure with smaller matrices, fits in RAM unquantized
    "mid": ModelConfig(vocab_size=2048, hidden_size=512, intermediate_size=1792, num_layers=8, num_heads=8,
                       num_kv_heads=2, head_dim=64, num_experts=8, top_k=2, max_position_embeddings=4096),
    # bench/llama_cpp_cpu.py and bench/cpu_formats.py: the CPU comparison with llama.cpp (Mixtral's structure; every
    # matrix large enough that decode is bound by reading weights, small enough to convert and quantize in seconds)
    "cpu-bench": ModelConfig(vocab_size=2048, hidden_size=768, intermediate_size=2048, num_layers=8, num_heads=12,
                             num_kv_heads=4, head_dim=64, num_experts=8, top_k=2, max_position_embeddings=4096),
    # bench/memory.py and the budget tests: few layers, large experts, so experts dominate a process's RSS
    "memory-bench": ModelConfig(vocab_size=512, hidden_size=1024, intermediate_size=4096, num_layers=2, num_heads=8,
                                num_kv_heads=2, head_dim=128, num_experts=8, top_k=2, max_position_embeddings=2048),
}

# Hub repositories (lower case) whose shape is a preset's.
HUB_IDS: dict[str, str] = {
    "mistralai/mixtral-8x7b-v0.1": "mixtral-8x7b",
    "mistralai/mixtral-8x7b-instruct-v0.1": "mixtral-8x7b",
    "lavawolfiee/mixtral-8x7b-instruct-v0.1-offloading-demo": "mixtral-8x7b",
    "mistralai/mixtral-8x22b-v0.1": "mixtral-8x22b",
    "mistralai/mixtral-8x22b-instruct-v0.1": "mixtral-8x22b",
    "qwen/qwen3-30b-a3b-instruct-2507": "qwen3-30b-a3b",
    "qwen/qwen3-30b-a3b-thinking-2507": "qwen3-30b-a3b",
    "qwen/qwen3-30b-a3b": "qwen3-30b-a3b",       # same shapes; rope base 1e6 and 40,960 positions
    "qwen/qwen1.5-moe-a2.7b": "qwen1.5-moe-a2.7b",
    "qwen/qwen1.5-moe-a2.7b-chat": "qwen1.5-moe-a2.7b",
    "allenai/olmoe-1b-7b-0924": "olmoe-1b-7b",
    "allenai/olmoe-1b-7b-0924-instruct": "olmoe-1b-7b",
    "deepseek-ai/deepseek-v2-lite": "deepseek-v2-lite",
    "deepseek-ai/deepseek-v2-lite-chat": "deepseek-v2-lite",
}


def preset_name(name: str) -> Optional[str]:
    """The preset a preset name or a known hub id names, else None."""
    key = name.lower()
    key = HUB_IDS.get(key, key)
    return key if key in PRESETS else None


def from_name(name: str) -> ModelConfig:
    key = preset_name(name)
    if key is None:
        raise ConfigError(f"no preset named {name!r}: the presets are {', '.join(PRESETS)}")
    return PRESETS[key]
