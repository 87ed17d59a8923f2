"""Headless command line: ``python -m mixoff_app {generate,quantize,make-tiny,trace,plan} ...``.

The flags and the ``--json`` output of ``generate`` are a contract that benchmarks and checks rely on:
extend them, never break them.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Optional

from .config import (FAMILY, POLICIES, PLACEMENTS, CacheConfig, ConfigError, EngineConfig, QuantConfig,
                     SamplingParams, parse_bits)
from .plan import parse_gib


def _bits(text: str):
    try:
        return parse_bits(text)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e))


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}")
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {v}")
    return v


def add_engine_args(p: argparse.ArgumentParser, model_default: Optional[str] = "tiny") -> None:
    """Flags shared by every command that loads a model."""
    p.add_argument("--model", default=model_default,
                   help="hub repo id, local checkpoint folder, or 'tiny' (the embedded demo model)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda where available)")
    p.add_argument("--attn-bits", type=_bits, default=4, help="attention bits: 2, 3, 4, 8 or none (default 4)")
    p.add_argument("--expert-bits", type=_bits, default=FAMILY,
                   help="expert bits: 2, 3, 4, 8 or none (default: the family's, 2 for Mixtral, 4 for Qwen-MoE and "
                        "OLMoE; see docs/BENCHMARKS.md)")
    p.add_argument("--cache-size", type=_positive_int, default=None,
                   help="experts per layer kept on the device (k); default: all experts on CPU, planned on GPU")
    p.add_argument("--policy", choices=POLICIES, default="lru", help="eviction policy")
    p.add_argument("--prefetch", type=int, default=0, help="experts to prefetch per layer (0: off)")
    p.add_argument("--prefetch-layers", type=_positive_int, default=1, help="how many layers ahead to guess")
    p.add_argument("--placement", choices=("auto",) + PLACEMENTS, default="auto",
                   help="where experts live: inclusive (host holds all), exclusive (each in one place), disk "
                        "(read from a mixoff-format checkpoint); default: planned on GPU or with a budget, "
                        "else inclusive")
    p.add_argument("--vram-budget", type=parse_gib, default=None,
                   help="GB (GiB) mixoff may allocate on the device; the planner fits k and placement under it")
    p.add_argument("--ram-budget", type=parse_gib, default=None,
                   help="GB (GiB) loading the model may add to this process's RAM")
    p.add_argument("--max-context", type=_positive_int, default=4096, help="KV cache length in tokens")
    p.add_argument("--dtype", default=None, help="float16, bfloat16 or float32 (default: fp16 on GPU, fp32 on CPU)")
    p.add_argument("--tokenizer", default=None, help="where the tokenizer/chat template come from (default: the checkpoint)")


def engine_config(args) -> EngineConfig:
    from .engine import resolve_device
    k = args.cache_size
    placement = getattr(args, "placement", "auto")
    vram_budget, ram_budget = getattr(args, "vram_budget", None), getattr(args, "ram_budget", None)
    planned = resolve_device(args.device).type == "cuda" or vram_budget is not None or ram_budget is not None
    # On a GPU, or under a budget, the memory planner picks whatever was not given (k per layer, placement).
    choose_k, choose_placement = planned and k is None, planned and placement == "auto"
    auto = {(True, True): "full", (True, False): "sizes", (False, True): "placement"}.get(
        (choose_k, choose_placement), "off")
    return EngineConfig(model=args.model, device=args.device,
                        quant=QuantConfig.from_bits(args.attn_bits, args.expert_bits),
                        cache=CacheConfig(size=k, policy=args.policy, prefetch=args.prefetch,
                                          prefetch_layers=args.prefetch_layers,
                                          placement="inclusive" if placement == "auto" else placement),
                        max_context=args.max_context, dtype=args.dtype, tokenizer=args.tokenizer,
                        vram_budget=vram_budget, ram_budget=ram_budget, auto_plan=auto)


# ---- generate ------------------------------------------------------------------------------------

def cmd_generate(args) -> int:
    progress = (lambda m: print(m, file=sys.stderr)) if not args.quiet else None
    from .engine import Engine
    engine = Engine.load(engine_config(args), progress=progress)
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, greedy=args.greedy, stop=tuple(args.stop or ()), seed=args.seed)
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + \
               [{"role": "user", "content": args.prompt}]
    engine.model.record_weights = args.json
    text, ids, finish, notices = [], [], None, []
    for ev in engine.stream_chat(messages, params):
        if ev.kind == "token":
            text.append(ev.text)
            if ev.token_id is not None:
                ids.append(ev.token_id)
            if not args.json:
                print(ev.text, end="", flush=True)
        elif ev.kind == "notice":
            notices.append(ev.text)
            print(ev.text, file=sys.stderr)
        elif ev.kind == "done":
            finish = ev.finish_reason
    snap = engine.stats()
    counts = engine._stats.answer_counters()
    dec = counts["decode"]
    if args.json:
        looked = dec["hits"] + dec["misses"]
        out = {
            "text": "".join(text), "token_ids": ids, "finish_reason": finish,
            "model": engine.info.model_name, "device": engine.info.device, "quant": engine.info.quant,
            "cache_size": engine.info.cache.size, "policy": engine.info.cache.policy,
            "stats": {"hits": dec["hits"], "misses": dec["misses"], "evictions": dec["evictions"],
                      "hit_rate": dec["hits"] / looked if looked else 0.0, "bytes_h2d": dec["bytes_h2d"],
                      "tokens_per_s": snap.avg_tokens_per_s, "prefill_s": snap.prefill_s, "decode_s": snap.decode_s,
                      "prefill_tokens": snap.prefill_tokens, "expert_bytes": engine.info.expert_bytes,
                      "prefetch_issued": dec["prefetch_issued"], "prefetch_used": dec["prefetch_used"],
                      "prefetch_wasted": dec["prefetch_wasted"], "prefill": counts["prefill"]},
            "routing": [[list(layer) for layer in tok] for tok in engine.last_routing],
        }
        if notices:
            out["notices"] = notices
        print(json.dumps(out))
    else:
        print(file=sys.stderr)
        print(f"[{len(ids)} tokens, {snap.avg_tokens_per_s:.2f} tok/s, hit rate {snap.answer_hit_rate:.1%}, "
              f"finish: {finish}]", file=sys.stderr)
    return 0


def cmd_quantize(args) -> int:
    from .checkpoints import save_quantized
    from .hub import resolve
    src = resolve(args.src, print).path
    out = save_quantized(src, args.out, QuantConfig.from_bits(args.attn_bits, args.expert_bits), progress=print)
    print(f"wrote {out}")
    return 0


def cmd_make_tiny(args) -> int:
    from .tiny import make_tiny
    out = make_tiny(args.out, seed=args.seed)
    print(f"wrote {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mixoff_app", description="Mixtral with offloaded experts")
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate an answer to one user message")
    add_engine_args(g)
    g.add_argument("--prompt", required=True, help="the user message (put through the chat template)")
    g.add_argument("--system", default=None, help="optional system prompt")
    g.add_argument("--max-new-tokens", type=_positive_int, default=128)
    g.add_argument("--greedy", action="store_true", help="greedy decoding (same as --temperature 0)")
    g.add_argument("--temperature", type=float, default=0.7)
    g.add_argument("--top-p", type=float, default=0.9)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--stop", action="append", help="stop string (repeatable)")
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--json", action="store_true", help="print one JSON object (text, token_ids, stats, routing)")
    g.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    g.set_defaults(func=cmd_generate)

    q = sub.add_parser("quantize", help="quantize a checkpoint into mixoff's own format")
    q.add_argument("src", help="hub repo id or local folder (HF fp16/bf16 or the pre-quantized layout)")
    q.add_argument("out", help="output folder")
    q.add_argument("--attn-bits", type=_bits, default=4)
    q.add_argument("--expert-bits", type=_bits, default=2)
    q.set_defaults(func=cmd_quantize)

    t = sub.add_parser("make-tiny", help="write the deterministic random tiny Mixtral checkpoint")
    t.add_argument("out")
    t.add_argument("--seed", type=int, default=0)
    t.set_defaults(func=cmd_make_tiny)

    for name in ("trace", "plan"):
        try:
            mod = __import__(f"mixoff_app.{name}", fromlist=["x"])
        except ImportError:
            continue
        adder = getattr(mod, f"add_{name}_parser", None)
        if adder is not None:
            adder(sub)
    return p


def main(argv: Optional[list[str]] = None) -> int:
    from .checkpoints import CheckpointError
    from .hub import ModelNotAvailable

    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except (ConfigError, CheckpointError, ModelNotAvailable, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
