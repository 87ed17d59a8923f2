"""RoPE frequencies for multi-head latent attention: the default ones or YaRN's, as transformers computes them
(``modeling_rope_utils._compute_yarn_parameters`` and DeepSeek-V2's ``yarn_apply_mscale``; tests/test_deepseek.py
holds the numbers to transformers').

YaRN changes three things: the frequencies (high ones kept, low ones divided by ``factor``, a linear ramp
between, over the dimensions that turn ``beta_fast``..``beta_slow`` times within the original context), a
factor on cos and sin (``attention_factor``; 1 when ``mscale`` equals ``mscale_all_dim``, as in
DeepSeek-V2-Lite), and the softmax scale (times ``mscale(factor, mscale_all_dim)`` squared).
"""
from __future__ import annotations

import math

import torch

from .config import ModelConfig, Yarn


def _mscale(scale: float, m: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0


def frequencies(cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    """(inverse frequencies [rope_dim / 2] float32, the factor on cos and sin)."""
    dim, base = cfg.rope_dim, cfg.rope_theta
    pos = base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim)
    y = cfg.rope_yarn
    if y is None:
        return 1.0 / pos, 1.0
    return _yarn_frequencies(y, pos, dim, base), _attention_factor(y)


def _attention_factor(y: Yarn) -> float:
    if y.attention_factor is not None:
        return y.attention_factor
    if y.mscale and y.mscale_all_dim:
        return _mscale(y.factor, y.mscale) / _mscale(y.factor, y.mscale_all_dim)
    return _mscale(y.factor)


def _yarn_frequencies(y: Yarn, pos: torch.Tensor, dim: int, base: float) -> torch.Tensor:
    def correction_dim(rotations: float) -> float:
        return dim * math.log(y.original_max_position_embeddings / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(y.beta_fast), correction_dim(y.beta_slow)
    if y.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001                        # as transformers: no division by zero
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp                          # 1: the original frequency, 0: divided by factor
    return (1.0 / (y.factor * pos)) * (1 - keep) + (1.0 / pos) * keep


def softmax_scale(cfg: ModelConfig) -> float:
    """MLA's attention scale: 1/sqrt(q/k head width), times YaRN's mscale(factor, mscale_all_dim) squared."""
    scale = cfg.head_dim ** -0.5
    y = cfg.rope_yarn
    if y is not None and y.mscale_all_dim:
        scale *= _mscale(y.factor, y.mscale_all_dim) ** 2
    return scale
