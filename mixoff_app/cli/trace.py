"""``trace {replay, synthetic, record}``: expert routing traces from the command line."""
from __future__ import annotations

import argparse
import json
import sys
from typing import Callable, Optional

from ..config import format_k
from ..outputs import check_new_file, new_file
from ..trace import (
    POLICY_NAMES,
    ReplayResult,
    Trace,
    TraceError,
    compare,
    read_trace,
    records_from_routing,
    routing_stats,
    synthetic_trace,
    write_trace,
)
from .args import parse_cache_size


def format_table(trace: Trace, results: dict[str, ReplayResult], title: str = "") -> str:
    names = list(results)
    any_r = next(iter(results.values()))
    sizes = any_r.cache_sizes
    k = format_k(sizes, counts=True)
    lines = []
    if title:
        lines.append(title)
    lines.append(f"tokens={trace.num_tokens} layers={trace.num_layers} experts={trace.num_experts} "
                 f"top_k={trace.top_k} cache k={k}")
    cols = names + ["cold"]
    lines.append("layer " + " ".join(f"{c:>8}" for c in cols))
    for l in range(trace.num_layers):
        vals = [results[n].layer_hit_rates[l] for n in names] + [any_r.layer_cold_bounds[l]]
        lines.append(f"{l:>5} " + " ".join(f"{100 * v:7.1f}%" for v in vals))
    vals = [results[n].hit_rate for n in names] + [any_r.cold_bound]
    lines.append("  all " + " ".join(f"{100 * v:7.1f}%" for v in vals))
    lines.append("hit rates; belady = offline optimum, cold = only first-use misses (upper bound)")
    return "\n".join(lines)


def replay_main(args: argparse.Namespace) -> int:
    try:
        trace = read_trace(args.file)
        policies = POLICY_NAMES if args.policy == "all" else (args.policy,)
        results = compare(trace, args.cache_size, policies)
    except (TraceError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        any_r = results["belady"]
        print(json.dumps({"trace": str(args.file), "tokens": trace.num_tokens, "layers": trace.num_layers,
                          "num_experts": trace.num_experts, "top_k": trace.top_k,
                          "cache_sizes": list(any_r.cache_sizes), "cold_bound": any_r.cold_bound,
                          "policies": {n: r.to_dict() for n, r in results.items()}}))
    else:
        print(format_table(trace, results, title=f"trace: {args.file}"))
    return 0


def synthetic_main(args: argparse.Namespace) -> int:
    try:
        trace = synthetic_trace(args.tokens, args.layers, args.experts, args.top_k, args.seed)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    check_new_file(args.out, args.force)
    with new_file(args.out) as tmp:
        n = write_trace(tmp, trace)
    stats = routing_stats(trace)
    print(f"wrote {n} records ({trace.num_tokens} tokens x {trace.num_layers} layers) to {args.out}")
    for s in (stats[0], stats[len(stats) // 2], stats[-1]):
        print(f"  layer {s['layer']:>2}: first choice repeated {100 * s['first_same']:.1f}%, "
              f"an expert shared {100 * s['share_any']:.1f}%")
    return 0


GenerateFn = Callable[[argparse.Namespace], tuple]


def record_main(args: argparse.Namespace, generate_fn: GenerateFn) -> int:
    """Run one generation through ``generate_fn(args) -> (routing, routing_weights, header)`` and write
    its routing (``routing[token][layer] -> expert ids``) as a trace to ``args.out``."""
    check_new_file(args.out, getattr(args, "force", False))       # before the generation, not after it
    routing, routing_weights, extra = generate_fn(args)
    if not routing:
        print("error: the generation produced no tokens, so there is no routing to record", file=sys.stderr)
        return 2
    num_layers = len(routing[0])
    if any(len(tok) != num_layers for tok in routing):
        print("error: the engine returned a different number of layers for some tokens", file=sys.stderr)
        return 2
    if routing_weights is not None and (len(routing_weights) != len(routing)
                                        or any(len(a) != len(b) for a, b in zip(routing_weights, routing))):
        print("error: routing_weights does not match routing in shape", file=sys.stderr)
        return 2
    header = {"model": getattr(args, "model", None), "prompt": getattr(args, "prompt", None),
              "max_new_tokens": getattr(args, "max_new_tokens", None), "greedy": getattr(args, "greedy", None),
              "num_layers": num_layers, "top_k": max(len(ex) for tok in routing for ex in tok),
              "source": "record"}
    header.update(extra or {})
    header = {k: v for k, v in header.items() if v is not None}
    with new_file(args.out) as tmp:
        n = write_trace(tmp, records_from_routing(routing, routing_weights), header)
    print(f"wrote {n} records ({len(routing)} tokens x {num_layers} layers) to {args.out}")
    return 0


def engine_generate(args: argparse.Namespace) -> tuple:
    """Default ``generate_fn``: load the engine, answer ``args.prompt`` once, return its decode routing.

    Routing does not depend on the cache, so the default cache configuration is used. Imported lazily:
    the rest of this command needs no torch.
    """
    from ..config import EngineConfig, QuantConfig, SamplingParams, parse_bits
    from ..engine import Engine

    quant = QuantConfig.from_bits(parse_bits(args.attn_bits), parse_bits(args.expert_bits))
    engine = Engine.load(EngineConfig(model=args.model, device=args.device, quant=quant),
                         progress=lambda msg: print(msg, file=sys.stderr))
    params = SamplingParams(max_new_tokens=args.max_new_tokens, greedy=args.greedy)
    for _ in engine.stream_chat([{"role": "user", "content": args.prompt}], params):
        pass
    routing = [[tuple(int(e) for e in ex) for ex in tok] for tok in engine.last_routing]
    weights = engine.last_routing_weights
    if len(weights) != len(routing) or any(w is None for tok in weights for w in tok):
        weights = None
    else:
        weights = [[tuple(float(x) for x in w) for w in tok] for tok in weights]
    info = engine.info
    header = {"model": info.model_name, "device": info.device, "quant": info.quant,
              "num_layers": info.num_moe_layers, "num_experts": info.num_experts, "top_k": info.top_k,
              # layers count expert layers; these are their decoder layers (dense layers have no routing)
              "family": info.family, "expert_layers": list(info.expert_layers)}
    return routing, weights, header


def remote_generate(args: argparse.Namespace) -> tuple:
    """``generate_fn`` for ``--backend URL``: one answer from a remote server (our ``serve``, vLLM started with
    --enable-return-routed-experts, SGLang with it), its decoded tokens' routing as the server returned it."""
    import os

    from ..config import ConfigError, SamplingParams
    from ..remote.config import BackendConfig, api_base, backend_key
    from ..remote.engine import RemoteEngine

    if args.model != "tiny":
        raise ConfigError("--model runs a model here and --backend records a server's: drop one of them "
                          "(--backend-model picks one of the server's models)")
    engine = RemoteEngine(BackendConfig(url=api_base(args.backend), key=backend_key(args.backend_key, os.environ),
                                        model=args.backend_model))
    try:
        info = engine.connect()
        if not info.returns_routing:
            raise ConfigError(f"{info.engine_name} at {info.where} does not return routing; record from our serve, "
                              f"vLLM or SGLang started with --enable-return-routed-experts")
        params = SamplingParams(max_new_tokens=args.max_new_tokens, greedy=args.greedy)
        for _ in engine.stream_chat([{"role": "user", "content": args.prompt}], params):
            pass
        info, usage = engine.info, engine.last_usage
    finally:
        engine.close()
    routing = engine.last_routing
    if not routing:
        note = engine.routing_note() or "the server sent no routing with its answer"
        raise ConfigError(f"nothing to record from {info.where}: {note}")
    if any(e < 0 for tok in routing for ex in tok for e in ex):
        raise ConfigError(f"{info.where} marked some generated tokens' experts as unknown (-1): nothing is recorded")
    header = {"model": info.model, "backend": info.backend, "backend_url": info.where,
              "num_layers": len(routing[0]), "top_k": len(routing[0][0]), "num_experts": info.num_experts,
              "prompt_tokens": usage.get("prompt_tokens")}
    if info.server:
        header.update(family=info.server.get("family"), expert_layers=info.server.get("expert_layers"))
    return [[tuple(ex) for ex in tok] for tok in routing], None, header


def add_parser(subparsers, generate_fn: Optional[GenerateFn] = None) -> argparse.ArgumentParser:
    """Register ``trace {replay, synthetic, record}``; each sub-command sets ``func(args) -> exit code``.

    ``generate_fn`` (see ``record_main``) connects ``record`` to the engine; default ``engine_generate``.
    """
    p = subparsers.add_parser("trace", help="record, synthesize and replay expert routing traces",
                              description="Expert routing traces: replay them through eviction policies "
                                          "with the Belady bound, synthesize Mixtral-like ones, record real ones.")
    sub = p.add_subparsers(dest="trace_command", metavar="{replay,synthetic,record}")
    sub.required = True

    r = sub.add_parser("replay", help="hit rates of eviction policies on a trace, with the Belady bound")
    r.add_argument("file", metavar="FILE", help="JSONL trace")
    r.add_argument("--cache-size", "-k", type=parse_cache_size, required=True,
                   help="experts per layer on the device: K, or K0,K1,... one per layer")
    r.add_argument("--policy", "-p", choices=POLICY_NAMES + ("all",), default="all",
                   help="eviction policy (default: all, side by side)")
    r.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    r.set_defaults(func=replay_main)

    s = sub.add_parser("synthetic", help="write a synthetic trace calibrated to Mixtral's routing statistics")
    s.add_argument("out", metavar="OUT", help="output JSONL path")
    s.add_argument("--tokens", "-n", type=int, required=True)
    s.add_argument("--layers", type=int, default=32)
    s.add_argument("--experts", type=int, default=8)
    s.add_argument("--top-k", type=int, default=2)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--force", action="store_true", help="replace OUT if it exists")
    s.set_defaults(func=synthetic_main)

    c = sub.add_parser("record", help="generate once (here, or on a --backend server) and write the routing as a trace")
    c.add_argument("--model", "-m", default="tiny", help="the model to run here (default: tiny)")
    c.add_argument("--backend", default=None, metavar="URL",
                   help="record a remote server's routing instead (our serve, vLLM or SGLang with "
                        "--enable-return-routed-experts), e.g. http://gpu-box:8000/v1")
    c.add_argument("--backend-key", default=None, metavar="KEY",
                   help="the server's API key (default: $MIXOFF_BACKEND_KEY)")
    c.add_argument("--backend-model", default=None, metavar="NAME", help="which of the server's models")
    c.add_argument("--prompt", required=True)
    c.add_argument("--max-new-tokens", type=int, default=64)
    c.add_argument("--greedy", action="store_true")
    c.add_argument("--device", default=None)
    c.add_argument("--attn-bits", default="4")
    c.add_argument("--expert-bits", default="family", help="default: the model family's")
    c.add_argument("out", metavar="OUT", help="output JSONL path")
    c.add_argument("--force", action="store_true", help="replace OUT if it exists")
    gen = engine_generate if generate_fn is None else generate_fn
    c.set_defaults(func=lambda a: record_main(a, remote_generate if a.backend else gen))
    return p
