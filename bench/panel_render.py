"""Server time of one panel refresh at each preset's shape. Prints one JSON object.

A refresh is what the page's timer costs the server: ``Stats.snapshot`` plus ``render_panel`` (HTML and the
PNGs inside it). The stats are filled by replaying a synthetic routing trace of the model's shape through
the real ``Stats`` counters (a k-slot LRU per layer decides hits, misses and evictions), so the grid and a
160-token routing strip are full. Medians over ``--repeats`` refreshes. ``html_elements`` counts the elements
the browser must build per refresh (a DOM grid has one per cell; the image grid has none per cell).

    python bench/panel_render.py [--repeats 30]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections import OrderedDict

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from mixoff_app.presets import PRESETS  # noqa: E402
from mixoff_app.stats import MemoryReading, Stats  # noqa: E402
from mixoff_app.trace import synthetic_trace  # noqa: E402
from mixoff_app.ui import panel  # noqa: E402

MEM = MemoryReading(gpu_name=None, vram_used=0, vram_total=0, torch_allocated=0, torch_reserved=0,
                    system_ram_used=8 << 30, system_ram_total=32 << 30, process_rss=1 << 30,
                    host_expert_bytes=1 << 30, pinned_bytes=0)


def filled_stats(L: int, E: int, top_k: int, k: int, tokens: int) -> Stats:
    trace = synthetic_trace(tokens, L, E, top_k, seed=0)
    s = Stats(L, E, top_k, (k,) * L)
    caches = [OrderedDict() for _ in range(L)]
    s.begin_answer()
    for tok in trace.routing:
        for layer, experts in enumerate(tok):
            s.on_route(layer, tuple(experts))
            c = caches[layer]
            for e in experts:
                if e in c:
                    c.move_to_end(e)
                    s.on_hit(layer, e)
                    continue
                if len(c) >= k:
                    victim, slot = c.popitem(last=False)
                    s.on_evict(layer, victim)
                else:
                    slot = len(c)
                c[e] = slot
                s.on_miss(layer, e, 1 << 20)
                s.on_slot(layer, slot, e)
        s.end_token()
    return s


def median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return round(1000 * statistics.median(times), 2)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--tokens", type=int, default=panel.ROUTING_TOKENS)
    args = ap.parse_args()
    out = {}
    for name, cfg in PRESETS.items():
        if name.startswith(("tiny", "mid", "memory")):
            continue
        L, E = cfg.num_moe_layers, cfg.num_experts
        k = max(cfg.top_k, E // 8)
        s = filled_stats(L, E, cfg.top_k, k, args.tokens)
        snap = s.snapshot(MEM)
        html = panel.render_panel(snap)
        row = {"layers": L, "experts": E, "top_k": cfg.top_k, "cells": L * E, "cache_k": k,
               "snapshot_ms": median_ms(lambda: s.snapshot(MEM), args.repeats),
               "render_ms": median_ms(lambda: panel.render_panel(snap), args.repeats),
               "html_kb": round(len(html) / 1024, 1),
               "grid": "image" if 'data-mx="grid"' in html else "dom",
               "html_elements": html.count("<") - 2 * html.count("</") + html.count("</")}
        row["refresh_ms"] = round(row["snapshot_ms"] + row["render_ms"], 2)
        out[name] = row
    print(json.dumps({"repeats": args.repeats, "routing_tokens": args.tokens, "presets": out}, indent=1))


if __name__ == "__main__":
    main()
