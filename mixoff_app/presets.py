"""Model shapes by name, in one table (gpt-fast's ``ModelArgs.from_name``): the planner, the tiny builders,
the benchmarks and the demo model's trainer all read their shapes here.

Adding a model is adding a row to ``PRESETS`` (and its hub ids to ``HUB_IDS``, so a plan can be made before
any download). Names are matched exactly, never guessed from a substring.
"""
from __future__ import annotations

from typing import Optional

from .config import ConfigError, ModelConfig

PRESETS: dict[str, ModelConfig] = {
    "mixtral-8x7b": ModelConfig(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_layers=32,
                                num_heads=32, num_kv_heads=8, head_dim=128, num_experts=8, top_k=2,
                                rope_theta=1e6, max_position_embeddings=32768),
    "mixtral-8x22b": ModelConfig(vocab_size=32768, hidden_size=6144, intermediate_size=16384, num_layers=56,
                                 num_heads=48, num_kv_heads=8, head_dim=128, num_experts=8, top_k=2,
                                 rope_theta=1e6, max_position_embeddings=65536),
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
