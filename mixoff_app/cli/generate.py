"""``generate``: answer one user message; ``--json`` prints the contract object (text, ids, stats, routing)."""
from __future__ import annotations

import json
import sys

from ..config import SamplingParams
from .args import add_engine_args, engine_config, positive_int


def run(args) -> int:
    progress = (lambda m: print(m, file=sys.stderr)) if not args.quiet else None
    from ..engine import Engine
    engine = Engine.load(engine_config(args), progress=progress)
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, greedy=args.greedy, stop=tuple(args.stop or ()), seed=args.seed)
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + \
               [{"role": "user", "content": args.prompt}]
    text, ids, finish, notices, a = [], [], None, [], None
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
            finish, a = ev.finish_reason, ev.answer        # this answer's own figures (AnswerStats)
    dec = a.decode
    if args.json:
        sizes = engine.info.cache.layer_sizes(engine.info.num_moe_layers, engine.info.num_experts)
        looked = dec["hits"] + dec["misses"]
        out = {
            "text": "".join(text), "token_ids": ids, "finish_reason": finish,
            "model": engine.info.model_name, "device": engine.info.device, "quant": engine.info.quant,
            # cache_size: the smallest k (every layer's when they are equal); cache_sizes: k per expert layer
            "cache_size": min(sizes), "cache_sizes": list(sizes), "policy": engine.info.cache.policy, "kernel": engine.info.kernel,
            "cpu_experts": engine.info.cpu_experts,     # what --cpu-experts resolved to: off, all or cost
            "stats": {"hits": dec["hits"], "misses": dec["misses"], "evictions": dec["evictions"],
                      "hit_rate": dec["hits"] / looked if looked else 0.0, "bytes_h2d": dec["bytes_h2d"],
                      "tokens_per_s": a.tokens_per_s, "prefill_s": a.prefill_s, "decode_s": a.decode_s,
                      "prefill_tokens": a.prefill_tokens, "expert_bytes": engine.info.expert_bytes,
                      "prefetch_issued": dec["prefetch_issued"], "prefetch_used": dec["prefetch_used"],
                      "prefetch_wasted": dec["prefetch_wasted"], "prefill": dict(a.prefill),
                      # decode misses run on the CPU from the host copy (part of "misses", no bytes copied)
                      "cpu_experts": dec["cpu_experts"]},
            "routing": [[list(layer) for layer in tok] for tok in a.routing],
        }
        if notices:
            out["notices"] = notices
        print(json.dumps(out))
    else:
        print(file=sys.stderr)
        print(f"[{len(ids)} tokens, {a.tokens_per_s:.2f} tok/s, hit rate {a.hit_rate:.1%}, "
              f"finish: {finish}]", file=sys.stderr)
    return 0


def add_parser(subparsers) -> None:
    g = subparsers.add_parser("generate", help="generate an answer to one user message")
    add_engine_args(g)
    g.add_argument("--prompt", required=True, help="the user message (put through the chat template)")
    g.add_argument("--system", default=None, help="optional system prompt")
    g.add_argument("--max-new-tokens", type=positive_int, default=128)
    g.add_argument("--greedy", action="store_true", help="greedy decoding (same as --temperature 0)")
    g.add_argument("--temperature", type=float, default=0.7)
    g.add_argument("--top-p", type=float, default=0.9)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--stop", action="append", help="stop string (repeatable)")
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--json", action="store_true", help="print one JSON object (text, token_ids, stats, routing)")
    g.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    g.set_defaults(func=run)
