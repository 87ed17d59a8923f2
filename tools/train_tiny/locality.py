"""How much consecutive tokens share experts in a trained checkpoint (``--measure``): the routing locality that
expert offloading relies on, measured on the held-out chat and on the transcripts, beside what random routing
would give."""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from mixoff_app.trace import Trace, simulate
from tools.train_tiny.checkpoint import load_shipped
from tools.train_tiny.heldout import heldout_encoded
from tools.train_tiny.transcripts import TRANSCRIPT_QUESTIONS, generate_answer


@torch.no_grad()
def record_routes(model, sequences: list[list[int]]) -> list[list[list[tuple[int, ...]]]]:
    """Top-k experts per token per layer for each sequence, teacher-forced: routes[seq][layer][token]."""
    routes = []
    k = model.config.num_experts_per_tok
    for ids in sequences:
        out = model(input_ids=torch.tensor([ids]), output_router_logits=True)
        routes.append([[tuple(sorted(r)) for r in rl.topk(k, dim=-1).indices.tolist()] for rl in out.router_logits])
    return routes


def locality_stats(routes, num_experts: int, cache_k: int = 4) -> dict:
    """(a) share of consecutive tokens with >= 1 common expert; (b) per-layer LRU hit rate with ``cache_k`` slots.

    Sequences are replayed back to back through one cache per layer, as a running app would see them.
    """
    num_layers = len(routes[0])
    share = [[0, 0] for _ in range(num_layers)]
    for seq in routes:
        for layer, toks in enumerate(seq):
            for a, b in zip(toks, toks[1:]):
                share[layer][0] += bool(set(a) & set(b))
                share[layer][1] += 1
    # back to back: routing[token][layer], every sequence's tokens in turn
    routing = [[seq[layer][t] for layer in range(num_layers)] for seq in routes for t in range(len(seq[0]))]
    lru = simulate(Trace({"num_experts": num_experts}, routing), cache_k, "lru")
    top_k = len(routes[0][0][0])
    rand_share = 1 - math.comb(num_experts - top_k, top_k) / math.comb(num_experts, top_k)
    return {
        "pairs": sum(s[1] for s in share), "accesses": lru.accesses, "cache_k": cache_k,
        "share_per_layer": [round(s[0] / s[1], 4) for s in share],
        "share_overall": round(sum(s[0] for s in share) / sum(s[1] for s in share), 4),
        "lru_hit_per_layer": [round(r, 4) for r in lru.layer_hit_rates],
        "lru_hit_overall": round(lru.hit_rate, 4),
        "random_share": round(rand_share, 4), "random_lru_hit": round(cache_k / num_experts, 4),
    }


def measure(args) -> dict:
    torch.set_num_threads(args.threads)
    model, tok = load_shipped(args.out)
    enc, rep = heldout_encoded(args.out, tok)
    routes = record_routes(model, [ids for ids, _ in enc])
    res = {"heldout_teacher_forced": locality_stats(routes, model.config.num_local_experts, args.cache_k)}
    gen_routes = []
    for q in TRANSCRIPT_QUESTIONS:
        _, prompt, new = generate_answer(model, tok, q)
        gen_routes += record_routes(model, [prompt + new])
    res["transcripts_teacher_forced"] = locality_stats(gen_routes, model.config.num_local_experts, args.cache_k)
    res["sequences"] = {"heldout": len(enc), "transcripts": len(TRANSCRIPT_QUESTIONS)}
    res["command"] = args.command
    text = json.dumps(res, indent=2)
    print(text)
    (Path(args.out) / "locality.json").write_text(text + "\n")
    return res
