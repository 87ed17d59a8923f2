"""Argument types and the engine flags shared by every command that loads a model (and by ``app.py``)."""
from __future__ import annotations

import argparse
import math
from typing import Optional, Union

from ..config import (
    CPU_EXPERTS,
    DEFAULT_MAX_BATCH,
    FAMILY,
    KERNELS,
    PLACEMENTS,
    POLICIES,
    CacheConfig,
    ConfigError,
    EngineConfig,
    QuantConfig,
    parse_bits,
)
from ..plan import GiB


def bits(text: str):
    try:
        return parse_bits(text)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e))


def positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}")
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {v}")
    return v


MAX_GIB = 1 << 20          # a pebibyte: beyond any machine, and still a whole number of bytes


def parse_gib(text: str) -> int:
    """A command-line size in GB (GiB) -> bytes."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of GB, got {text!r}")
    if not math.isfinite(v) or v > MAX_GIB:
        raise argparse.ArgumentTypeError(f"expected a number of GB up to {MAX_GIB}, got {text!r}")
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {v}")
    return int(v * GiB)


def parse_cache_size(text: str) -> Union[int, tuple[int, ...]]:
    """'4' -> 4 for every layer; '2,3,4,...' -> one size per layer."""
    try:
        parts = [int(x) for x in str(text).split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"cache size must be a whole number or a comma list of them, not {text!r}")
    if any(k < 1 for k in parts):
        raise argparse.ArgumentTypeError(f"each cache size must be at least 1, got {text!r}")
    return parts[0] if len(parts) == 1 else tuple(parts)


def add_engine_args(p: argparse.ArgumentParser, model_default: Optional[str] = "tiny") -> None:
    """Flags shared by every command that loads a model."""
    p.add_argument("--model", default=model_default,
                   help="hub repo id, local checkpoint folder, or 'tiny' (the embedded demo model)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda where available)")
    p.add_argument("--attn-bits", type=bits, default=4, help="attention bits: 2, 3, 4, 8 or none (default 4)")
    p.add_argument("--expert-bits", type=bits, default=FAMILY,
                   help="expert bits: 2, 3, 4, 8 or none (default: the model family's: 2 for Mixtral, 4 for "
                        "Qwen-MoE, OLMoE and DeepSeek-V2; see docs/BENCHMARKS.md)")
    p.add_argument("--cache-size", type=parse_cache_size, default=None,
                   help="experts per layer kept on the device (k), one number for every layer or a comma list "
                        "with one per expert layer; default: all experts on CPU, planned on GPU")
    p.add_argument("--policy", choices=POLICIES, default="lru", help="eviction policy")
    p.add_argument("--prefetch", type=int, default=0, help="experts to prefetch per layer (0: off)")
    p.add_argument("--prefetch-layers", type=positive_int, default=1, help="how many layers ahead to guess")
    p.add_argument("--placement", choices=("auto",) + PLACEMENTS, default="auto",
                   help="where experts live: inclusive (host holds all), exclusive (each in one place), disk "
                        "(read from a mixoff-format checkpoint); default: planned on GPU or with a budget, "
                        "else inclusive")
    p.add_argument("--vram-budget", type=parse_gib, default=None,
                   help="GB (GiB) mixoff may allocate on the device; the planner fits k and placement under it")
    p.add_argument("--ram-budget", type=parse_gib, default=None,
                   help="GB (GiB) loading the model may add to this process's RAM")
    p.add_argument("--max-context", type=positive_int, default=4096, help="KV cache length in tokens")
    p.add_argument("--dtype", default=None, help="float16, bfloat16 or float32 (default: fp16 on GPU, fp32 on CPU)")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="decode by replaying CUDA graphs of each layer's attention/router and each expert slot "
                        "(GPU only; experimental, off by default)")
    p.add_argument("--tokenizer", default=None, help="where the tokenizer/chat template come from (default: the checkpoint)")
    p.add_argument("--max-input-chars", type=positive_int, default=None,
                   help="longest message or system prompt in characters, refused before tokenizing; history is "
                        "cut at twice this (default: 8 per token of --max-context)")
    p.add_argument("--max-batch", type=positive_int, default=None,
                   help=f"answers decoded together, each with its own KV cache (default {DEFAULT_MAX_BATCH}, fewer "
                        f"when the memory plan cannot hold their KV caches); more wait for a free slot")
    p.add_argument("--per-client", type=positive_int, default=None,
                   help="of those, at most this many for one client (an API key, a browser session; default: "
                        "half of --max-batch, rounded up)")
    p.add_argument("--max-waiting", type=int, default=16,
                   help="answers that may wait for a free slot; beyond, a new one is refused at once (the API "
                        "answers 429) (default 16)")
    p.add_argument("--kernel", choices=KERNELS, default="auto",
                   help="quantized matmul: triton (fused kernels reading the packed codes; on a CPU they run in "
                        "Triton's interpreter, slowly, for tests), cpu (torch's int4/int8 CPU kernels, weights "
                        "held in their formats, dense weights through oneDNN), torch (dequantize, then matmul), or "
                        "auto (triton on a CUDA GPU, cpu on a CPU that runs it, torch elsewhere; the default)")
    p.add_argument("--cpu-experts", choices=CPU_EXPERTS, default="auto",
                   help="decode misses: all (run every one on the CPU from its host copy, no copy to the device), "
                        "off (copy every one into the device cache), or auto (a cost model of measured copy and "
                        "CPU times; off until a GPU has measured it, and off on a CPU-only machine; the default)")


def _sizes(cache_size) -> Optional[tuple[int, ...]]:
    """--cache-size as CacheConfig takes it: None (the planner decides), or k per layer (one value: all)."""
    if cache_size is None:
        return None
    return (cache_size,) if isinstance(cache_size, int) else tuple(cache_size)


def engine_config(args) -> EngineConfig:
    # What is not given (k, placement) stays None: the engine's planner decides it.
    placement = getattr(args, "placement", "auto")
    return EngineConfig(model=args.model, device=args.device,
                        quant=QuantConfig.from_bits(args.attn_bits, args.expert_bits),
                        cache=CacheConfig(sizes=_sizes(args.cache_size),
                                          policy=args.policy, prefetch=args.prefetch,
                                          prefetch_layers=args.prefetch_layers,
                                          placement=None if placement == "auto" else placement),
                        max_context=args.max_context, dtype=args.dtype, tokenizer=args.tokenizer,
                        vram_budget=getattr(args, "vram_budget", None), ram_budget=getattr(args, "ram_budget", None),
                        kernel=getattr(args, "kernel", "auto"), cuda_graphs=getattr(args, "cuda_graphs", False),
                        max_input_chars=getattr(args, "max_input_chars", None),
                        max_batch=getattr(args, "max_batch", None), per_client=getattr(args, "per_client", None),
                        max_waiting=getattr(args, "max_waiting", 16),
                        cpu_experts=getattr(args, "cpu_experts", "auto"))
