"""GPU decode benchmark of expert offloading at Mixtral-8x7B's real shapes. Prints one JSON object.

A synthetic model is built straight from the runtime's pieces, no checkpoint: Mixtral-8x7B's shapes
(hidden 4096, intermediate 14336, 8 experts, top-2, 32 layers, vocab 32000), experts 2-bit group-16 in
their real packed layout (one pinned host buffer per expert, ~66 MB each, 17 GB in all), attention 4-bit
group-64. Weights are random bytes with sane scales and zeros (no inf/NaN): the timing of a dequantize,
a matmul or a copy does not depend on the values.

Routing comes from the calibrated synthetic trace (``trace.synthetic_trace``, consecutive-token repetition
per layer matched to Mixtral's measured Table 5), not from the random gates: ``TraceModel`` reads the
trace's experts and weights for the current token from device tensors, indexed by a device scalar (so the
same code runs under CUDA graphs), and everything after the router runs exactly as in the app: one packed
host transfer per layer, the cache's fetch, release and prefetch.

Prefetch: the app's ``Prefetcher`` computes its guess on the device (next layer's gate on this layer's
normed residual, top-k) and the model brings it to the host in the layer's one transfer. With random gates
that guess would be random, so ``TracePrefetcher`` runs the real guess's kernels and then selects, on the
device, a trace-derived guess instead: layer l+1's true experts, each one right with probability
``--prefetch-accuracy`` (default 0.8; a wrong guess is a random expert the layer does not use). ASSUMPTION,
not a measurement: Eliseev & Mazur (2023) report that the next layer's gate applied early usually picks
the right experts; 0.8 per expert stands for "usually". Every variant reports prefetches used and wasted.

Variants (same trace tokens for each; fresh cache and KV cache each time):
    naive            synchronous offload as the reference work defines it: no cache (every slot forgotten at
                     each token), each needed expert copied on the compute stream and waited for, then computed
    lru_k4           k = 4, LRU, no prefetch
    lru_prefetch_k4  k = 4, LRU, prefetch 2 experts one layer ahead (the guess on the device)
    lrfu_prefetch_k4 k = 4, LRFU (the app's policy) + prefetch
    all_resident     k = 8: every expert on the device (loaded before the clock starts)
    lrfu_prefetch_k4_graphs  as lrfu_prefetch_k4 with --cuda-graphs (CUDA only; skipped on the CPU)

Each variant decodes ``--warmup`` tokens, then ``--tokens`` timed tokens (``torch.cuda.synchronize`` around
the timed region; one host sync per token for the next token id, as the app's generate loop), then two
more tokens under counters: host round trips (``op_counts.count_syncs``) and dispatched aten ops
(``op_counts.count_ops``; a graph replay dispatches none) per token.

Also measured: pinned host->device bandwidth (one expert buffer many times; a 1 GiB pinned buffer), and per
variant the limit when copies overlap compute perfectly

    limit s/token = max(misses_per_token * expert_bytes / bandwidth, all-resident s/token)

(bandwidth: the expert-sized pinned copy), reported as ``fraction_of_limit`` = achieved / limit (at most 1
up to noise), with the goals (>= 2x naive, >= 0.7 of the limit). ``limit_all_h2d`` does the same
with every byte copied host->device (misses and prefetches). When ``bench/fused_kernels.py`` exists its JSON is
included (``--kernels-args`` passes it arguments). Phases are timed (``phases_s``); ``--budget-s`` stops
early (the remaining variants are listed as skipped); each variant runs under try/except so one failure
still prints the rest. Progress goes to stderr, the JSON to stdout and, when the environment variable
``OUT`` names a folder, to ``OUT/gpu_offload.json``.

    python bench/gpu_offload.py --device cuda --shape mixtral --tokens 32        # the H200 run (~2-4 min)
    python bench/gpu_offload.py --device cpu --shape tiny --tokens 8             # CPU validation (seconds)
"""
from __future__ import annotations

import time

_STARTED = time.perf_counter()

import argparse
import gc
import json
import math
import os
import random
import statistics
import sys
import traceback
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from mixoff_app.config import KERNELS, ModelConfig, QuantSpec  # noqa: E402
from mixoff_app.expert_cache import ExpertCache  # noqa: E402
from mixoff_app.kernels import resolve_kernel  # noqa: E402
from mixoff_app.model import LayerWeights, MoEModel, Prefetcher, TrunkWeights  # noqa: E402
from mixoff_app.op_counts import count_ops, count_syncs  # noqa: E402
from mixoff_app.presets import from_name  # noqa: E402
from mixoff_app.quant import QWeight, qweight_from, weight_fields  # noqa: E402
from mixoff_app.stats import Stats  # noqa: E402
from mixoff_app.stores import ExpertLayout, InclusiveStore  # noqa: E402
from mixoff_app.trace import simulate, synthetic_trace  # noqa: E402

EXPERT_SPEC = QuantSpec(bits=2, group_size=16, scale_group=128)
ATTN_SPEC = QuantSpec(bits=4, group_size=64, scale_group=256)

SHAPES = {"mixtral": from_name("mixtral-8x7b"), "tiny": from_name("tiny-bench")}      # --shape -> preset

# name -> (k (None: all experts), policy, prefetch, naive, cuda graphs)
VARIANTS = {
    "naive": (2, "lru", False, True, False),
    "lru_k4": (4, "lru", False, False, False),
    "lru_prefetch_k4": (4, "lru", True, False, False),
    "lrfu_prefetch_k4": (4, "lrfu", True, False, False),
    "all_resident": (None, "lru", False, False, False),
    "lrfu_prefetch_k4_graphs": (4, "lrfu", True, False, True),
}
# all_resident first: every limit needs its time per token; naive next (every speedup needs it).
RUN_ORDER = ("all_resident", "naive", "lru_k4", "lru_prefetch_k4", "lrfu_prefetch_k4", "lrfu_prefetch_k4_graphs")
OFFLOAD = ("lru_k4", "lru_prefetch_k4", "lrfu_prefetch_k4", "lrfu_prefetch_k4_graphs")
COUNTED_TOKENS = 2           # decoded after the timed ones, under the round-trip and dispatch counters
GOAL_SPEEDUP, GOAL_FRACTION = 2.0, 0.7
PREFETCH_NOTE = ("assumption, not a measurement: the real guess's kernels run, then a guess of layer l+1's experts "
                 "from the trace is used instead, each right with this probability (the paper reports the "
                 "early-applied next gate is usually right); a wrong guess is a random expert the layer does not use")
COUNTERS = ("hits", "misses", "evictions", "bytes_h2d", "prefetch_issued", "prefetch_used", "prefetch_wasted")

T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---- synthetic weights ---------------------------------------------------------------------------

def sane_meta(tensors: dict[str, torch.Tensor], in_features: dict[str, int], bits: int) -> None:
    """Overwrite the fp16 meta fields of quantized weights so W = (code - zero) * scale has std about
    1/sqrt(in): scale = (scale_q - 128) * scale_s with scale_q random bytes (|scale_q - 128| has rms ~73.9),
    zero = zero_q * zero_s, uniform over the code range."""
    levels = 2 ** bits
    mid = (levels - 1) / 2
    spread = math.sqrt((levels ** 2 - 1) / 12 + (levels - 1) ** 2 / 12)      # std of code - zero
    for name, t in tensors.items():
        prefix, field = name.rsplit(".", 1)
        if field not in ("scale", "scale_s", "scale_z", "zero", "zero_s", "zero_z"):
            continue
        target = 1.0 / math.sqrt(in_features[prefix])
        if field == "scale_s":
            t.fill_(target / (73.9 * spread))
        elif field == "scale_z":
            t.fill_(128)
        elif field == "zero_s":
            t.fill_(mid / 128)
        elif field == "zero_z":
            t.fill_(0)
        elif field == "zero":
            t.fill_(mid)
        else:                                           # unquantized scale (shapes where scale_group does not divide)
            t.copy_((torch.rand(t.shape, device=t.device) * 2 - 1).mul_(target * math.sqrt(3) / spread))


def fill_experts(store: InclusiveStore, layout: ExpertLayout, cfg: ModelConfig, seed: int) -> None:
    """Random bytes in layer 0 expert 0 (an 8 MiB random chunk tiled), sane meta, then copied to every
    other expert: timing does not depend on values, and this keeps a 17 GB fill to seconds."""
    g = torch.Generator().manual_seed(seed)
    first = store.buffer(0, 0)
    n = first.numel()
    chunk = torch.randint(0, 256, (min(n, 8 << 20),), dtype=torch.uint8, generator=g)
    for off in range(0, n, chunk.numel()):
        m = min(chunk.numel(), n - off)
        first[off:off + m].copy_(chunk[:m])
    f, h = cfg.intermediate_size, cfg.hidden_size
    sane_meta(layout.views(first), {"w1": h, "w3": h, "w2": f}, layout.spec.bits)
    for layer in range(cfg.num_layers):
        for e in range(cfg.num_experts):
            if layer or e:
                store.buffer(layer, e).copy_(first)


def random_qweight(shape: tuple[int, int], spec: QuantSpec, device: torch.device) -> QWeight:
    """Random packed codes and 8-bit scales/zeros, made on the device (fast), with sane fp16 meta."""
    tensors = {}
    for fld in weight_fields("w", shape, spec, torch.float16):
        if fld.dtype in (torch.uint8, torch.int32):
            hi = 256 if fld.dtype == torch.uint8 else 2 ** 30
            t = torch.randint(0, hi, fld.shape, dtype=fld.dtype, device=device)
        else:
            t = torch.empty(fld.shape, dtype=fld.dtype, device=device)
        tensors[fld.name] = t
    sane_meta(tensors, {"w": shape[1]}, spec.bits)
    return qweight_from(tensors, "w", shape, spec)


def build_trunk(cfg: ModelConfig, device: torch.device, dtype: torch.dtype) -> TrunkWeights:
    """Distinct random 4-bit attention per layer (no weight shared across layers, so no layer reads
    another's weights from L2), random fp norms, gates, embeddings and lm_head, all made on the device."""
    H, hd = cfg.hidden_size, cfg.head_dim
    qo, kv = cfg.num_heads * hd, cfg.num_kv_heads * hd
    layers = []
    for _ in range(cfg.num_layers):
        layers.append(LayerWeights(
            attn_norm=torch.ones(H, dtype=dtype, device=device),
            ffn_norm=torch.ones(H, dtype=dtype, device=device),
            wq=random_qweight((qo, H), ATTN_SPEC, device), wk=random_qweight((kv, H), ATTN_SPEC, device),
            wv=random_qweight((kv, H), ATTN_SPEC, device), wo=random_qweight((H, qo), ATTN_SPEC, device),
            gate=torch.randn(cfg.num_experts, H, device=device).mul_(0.02).to(dtype)))
    embed = torch.randn(cfg.vocab_size, H, dtype=dtype, device=device)
    lm_head = torch.randn(cfg.vocab_size, H, dtype=dtype, device=device).div_(math.sqrt(H))
    return TrunkWeights(embed=embed, layers=layers, norm=torch.ones(H, dtype=dtype, device=device),
                        lm_head=lm_head)


# ---- trace-driven routing, prefetch, and the no-cache baseline -----------------------------------

class TraceModel(MoEModel):
    """Routing from a trace: the current token's experts and weights for each layer, read from device tensors
    [T, L, K] at a device scalar token index (no host->device copy per layer, and graph-safe)."""

    def __init__(self, *args, idx: torch.Tensor, weights: torch.Tensor, **kw) -> None:
        super().__init__(*args, **kw)
        self.idx, self.w = idx, weights
        self.layer_of = {id(lw): i for i, lw in enumerate(self.trunk.layers)}
        self.token = 0
        self.tok = torch.zeros(1, dtype=torch.long, device=self.device)

    def _route(self, lw: LayerWeights, h: torch.Tensor, step=None):
        if h.shape[0] != 1:
            raise ValueError("trace routing drives decode (one token) only")
        i = self.layer_of[id(lw)]
        return self.w[:, i].index_select(0, self.tok), self.idx[:, i].index_select(0, self.tok)   # [1, K] each

    def forward(self, ids: torch.Tensor, pos: int, last_only: bool = True, seq: int = 0) -> torch.Tensor:
        self.tok.fill_(self.token)
        out = super().forward(ids, pos, last_only, seq)
        self.token += 1
        return out


class TracePrefetcher(Prefetcher):
    """The real guess's kernels, then (selected on the device) a guess of layer l+d's experts from the trace,
    each right with probability ``accuracy`` (see the module docstring: an assumption standing in for the
    early-applied gate). Deterministic per seed and independent of the cache, so every variant sees the same
    guesses; ``hint`` and ``prefetch`` are the real ones."""

    def __init__(self, routing, count: int, accuracy: float, num_experts: int, seed: int, device: torch.device,
                 distance: int = 1) -> None:
        super().__init__(count, distance)
        rng = random.Random(f"gpu-offload-prefetch-{seed}")
        L = len(routing[0])
        table = []
        self.guessed = self.right = 0
        for tok in routing:
            rows = []
            for target in range(L):
                true = list(tok[target])
                chosen: list[int] = []
                for r in range(count):
                    if r < len(true) and rng.random() < accuracy:
                        chosen.append(true[r])
                    else:
                        chosen.append(rng.choice([e for e in range(num_experts) if e not in true and e not in chosen]))
                rows.append(chosen)
            table.append(rows)
        self.table = table
        self.guesses = torch.tensor(table, dtype=torch.long, device=device)      # [T, L, count]
        self.use_trace = torch.ones(count, dtype=torch.bool, device=device)

    def guess(self, model: "TraceModel", target: int, n: torch.Tensor) -> torch.Tensor:
        real = super().guess(model, target, n)
        return torch.where(self.use_trace, self.guesses[:, target].index_select(0, model.tok)[0], real)

    def accuracy_over(self, routing, tokens: range) -> tuple[int, int]:
        """(guessed, right) over the given tokens, for every target layer the prefetcher guessed."""
        g = r = 0
        for t in tokens:
            for target in range(self.distance, len(routing[t])):
                chosen = self.table[t][target]
                g += len(chosen)
                r += sum(e in routing[t][target] for e in chosen)
        return g, r


class NoCache(ExpertCache):
    """Naive synchronous offload: every slot is forgotten at the start of each token, so every access is a
    miss (counted as one, with its bytes), and each miss is copied on the compute stream and waited for
    before anything else happens."""

    def next_token(self) -> None:
        super().next_token()
        for i, L in enumerate(self.layers):
            for s, e in enumerate(L.expert_in):
                if e >= 0:
                    L.policy.on_remove(e)
                    L.expert_in[s] = -1
                    self.stats.on_slot(i, s, -1)
            L.slot_of.clear()
            L.prefetched.clear()

    def _load(self, layer: int, expert: int, slot: int) -> None:
        L = self.layers[layer]
        L.leaving[slot] = -1
        L.slots[slot].copy_(self.store.buffer(layer, expert))          # on the compute stream
        if self.cuda:
            torch.cuda.current_stream(self.device).synchronize()      # ... and wait for it
        L.expert_in[slot] = expert
        L.slot_of[expert] = slot
        L.policy.on_insert(expert, self.tick)
        self.stats.on_slot(layer, slot, expert)


# ---- measurements --------------------------------------------------------------------------------

def copy_seconds(src: torch.Tensor, dst: torch.Tensor, repeats: int, device: torch.device) -> float:
    """Seconds per copy of ``src`` into ``dst`` (after one untimed copy)."""
    cuda = device.type == "cuda"
    dst.copy_(src, non_blocking=cuda)
    sync(device)
    if cuda:
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(repeats):
            dst.copy_(src, non_blocking=True)
        b.record()
        b.synchronize()
        return a.elapsed_time(b) / 1000 / repeats
    t = time.perf_counter()
    for _ in range(repeats):
        dst.copy_(src)
    return (time.perf_counter() - t) / repeats


def measure_bandwidth(store: InclusiveStore, device: torch.device, repeats: int, big_bytes: int) -> dict:
    cuda = device.type == "cuda"
    src = store.buffer(0, 0)
    dst = torch.empty(src.shape, dtype=torch.uint8, device=device)
    s = copy_seconds(src, dst, repeats, device)
    out = {"expert_bytes": src.numel(), "expert_copy_s": s, "expert_copy_GBps": src.numel() / s / 1e9,
           "expert_copies": repeats, "pinned": bool(cuda and store.pinned)}
    del dst
    host = torch.empty(big_bytes, dtype=torch.uint8, pin_memory=cuda)
    host.fill_(7)
    dst = torch.empty(big_bytes, dtype=torch.uint8, device=device)
    reps = max(2, repeats // 8)
    s = copy_seconds(host, dst, reps, device)
    out.update(big_bytes=big_bytes, big_copy_s=s, big_copy_GBps=big_bytes / s / 1e9, big_copies=reps)
    del host, dst
    if cuda:
        torch.cuda.empty_cache()
    return out


def counters(stats: Stats) -> dict[str, int]:
    return {c: getattr(stats, c) for c in COUNTERS}


def decode_tokens(model: TraceModel, step: torch.Tensor, stats: Stats, positions: range) -> torch.Tensor:
    """The app's decode loop without sampling: argmax, the one host sync per token for the id."""
    logits = None
    for pos in positions:
        logits = model.forward(step, pos)
        step.copy_(logits[0].argmax())
        int(step.item())                                # the generate loop's per-token sync
        stats.end_token()
    return logits


def run_variant(name: str, ctx: dict, args: argparse.Namespace, deadline: float) -> dict:
    k, policy, prefetch, naive, graphs = VARIANTS[name]
    cfg, device, dtype, store = ctx["cfg"], ctx["device"], ctx["dtype"], ctx["store"]
    E, L, K = cfg.num_experts, cfg.num_layers, cfg.top_k
    k = E if k is None else k
    if args.fail == name:
        raise RuntimeError(f"--fail {name}: injected failure (testing)")
    cuda = device.type == "cuda"
    t_setup = time.perf_counter()
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    sizes = (k,) * L
    stats = Stats(L, E, K, sizes, policy)
    cache = (NoCache if naive else ExpertCache)(store, sizes, policy, device, stats)
    n_timed_end = args.warmup + args.tokens
    n_total = n_timed_end + COUNTED_TOKENS
    model = TraceModel(cfg, ctx["trunk"], cache, stats, n_total + 1, device, dtype,
                         kernel=resolve_kernel(args.kernel, device), idx=ctx["idx"], weights=ctx["w"])
    if prefetch:
        model.prefetcher = TracePrefetcher(ctx["routing"], K, args.prefetch_accuracy, E, args.seed, device)
    if graphs:
        from mixoff_app.cuda_graphs import DecodeGraphs
        model.graphs = DecodeGraphs(model)
    if k == E:                            # all resident: load everything before the clock starts
        for i in range(L):
            cache.prefetch(i, list(range(E)))
            cache.layers[i].prefetched.clear()
    sync(device)
    setup_s = time.perf_counter() - t_setup

    step = torch.zeros(1, dtype=torch.long, device=device)
    finite, absmax = True, 0.0
    times: list[float] = []
    m0 = counters(stats)
    with torch.inference_mode():
        logits = decode_tokens(model, step, stats, range(args.warmup))
        if time.perf_counter() > deadline:
            raise TimeoutError(f"budget spent during warm-up ({args.warmup} tokens)")
        if args.warmup:
            finite &= bool(torch.isfinite(logits).all())
        sync(device)
        m1 = counters(stats)
        t0 = time.perf_counter()
        for pos in range(args.warmup, n_timed_end):
            t = time.perf_counter()
            logits = decode_tokens(model, step, stats, range(pos, pos + 1))
            times.append(time.perf_counter() - t)
            if time.perf_counter() > deadline:
                break
        sync(device)
        elapsed = time.perf_counter() - t0
        m2 = counters(stats)
        finite &= bool(torch.isfinite(logits).all())
        absmax = float(logits.abs().max())
        n = len(times)
        # The counted tokens continue the sequence right after the timed ones.
        first = args.warmup + n
        with count_syncs() as syncs, count_ops() as ops:
            decode_tokens(model, step, stats, range(first, first + COUNTED_TOKENS))
    d = {c: m2[c] - m1[c] for c in COUNTERS}
    acc = d["hits"] + d["misses"]
    out = {
        "ok": True, "k": k, "policy": policy, "prefetch": K if prefetch else 0, "naive": naive,
        "cuda_graphs": graphs,
        "tokens_timed": n, "truncated": n < args.tokens, "timed_s": elapsed,
        "tokens_per_s": n / elapsed if elapsed > 0 else None,
        "s_per_token_median": statistics.median(times) if times else None,
        "s_per_token_min": min(times) if times else None,
        "hit_rate": d["hits"] / acc if acc else 0.0,
        "misses_per_token": d["misses"] / n if n else None,
        "bytes_h2d_per_token": d["bytes_h2d"] / n if n else None,
        "round_trips_per_token": syncs.total / COUNTED_TOKENS,
        "dispatched_ops_per_token": ops.total / COUNTED_TOKENS,
        "timed": d,
        "all_tokens": {c: m2[c] - m0[c] for c in COUNTERS},
        "device_slot_bytes": cache.device_bytes,
        "torch_peak_allocated": torch.cuda.max_memory_allocated(device) if cuda else None,
        "logits_finite": finite, "logits_absmax": absmax,
        "setup_s": setup_s,
    }
    if prefetch:
        g, r = model.prefetcher.accuracy_over(ctx["routing"], range(args.warmup, args.warmup + n))
        out["prefetch_guesses"] = g
        out["prefetch_guess_accuracy"] = r / g if g else None
    if not naive and not prefetch and k < E:
        # The runtime cache and the trace simulator follow the same rules: their counts must agree.
        sim = simulate(ctx["routing"][:args.warmup + n], k, policy)
        out["simulated"] = {"hits": sum(sim.hits), "misses": sum(sim.misses), "hit_rate": sim.hit_rate}
    del model, cache
    return out


def add_limits(result: dict) -> None:
    """Copy-overlap limit, fraction of it achieved and speedup vs naive, for every variant that ran."""
    variants, bw = result["variants"], result.get("bandwidth", {}).get("expert_copy_GBps")
    res = variants.get("all_resident", {})
    naive = variants.get("naive", {})
    t_res = 1 / res["tokens_per_s"] if res.get("ok") and res.get("tokens_per_s") else None
    eb = result["expert_bytes"]
    for name, v in variants.items():
        if not v.get("ok") or not v.get("tokens_per_s"):
            continue
        if naive.get("ok") and naive.get("tokens_per_s"):
            v["speedup_vs_naive"] = v["tokens_per_s"] / naive["tokens_per_s"]
        if t_res is None or not bw:
            continue
        lim = max(v["misses_per_token"] * eb / (bw * 1e9), t_res)
        lim_all = max(v["bytes_h2d_per_token"] / (bw * 1e9), t_res)
        v["limit_s_per_token"] = lim
        v["limit_tokens_per_s"] = 1 / lim
        v["fraction_of_limit"] = v["tokens_per_s"] * lim
        v["limit_all_h2d_tokens_per_s"] = 1 / lim_all
        v["fraction_of_limit_all_h2d"] = v["tokens_per_s"] * lim_all
    goals = {}
    for name in OFFLOAD:
        v = variants.get(name, {})
        if v.get("ok"):
            sp, fr = v.get("speedup_vs_naive"), v.get("fraction_of_limit")
            goals[name] = {"speedup_vs_naive": sp, "meets_2x_naive": None if sp is None else sp >= GOAL_SPEEDUP,
                           "fraction_of_limit": fr,
                           "meets_0.7_limit": None if fr is None else fr >= GOAL_FRACTION}
    ceiling = res.get("speedup_vs_naive")
    result["goals"] = {"speedup_vs_naive_min": GOAL_SPEEDUP, "fraction_of_limit_min": GOAL_FRACTION,
                       # no cache beats all-resident: if this is under 2, the 2x goal is out of reach at k < 8
                       "all_resident_speedup_vs_naive": ceiling,
                       "variants": goals}
    result["summary"] = {n: {"tokens_per_s": v.get("tokens_per_s"), "hit_rate": v.get("hit_rate"),
                             "misses_per_token": v.get("misses_per_token"),
                             "speedup_vs_naive": v.get("speedup_vs_naive"),
                             "fraction_of_limit": v.get("fraction_of_limit"),
                             "round_trips_per_token": v.get("round_trips_per_token"),
                             "dispatched_ops_per_token": v.get("dispatched_ops_per_token")} if v.get("ok") else
                         {"error": v.get("error") or v.get("skipped")}
                         for n, v in variants.items()}


def kernels_bench(args: argparse.Namespace) -> dict:
    """bench/fused_kernels.py's JSON (the fused matmul micro-benchmark), when that script exists."""
    script = Path(__file__).resolve().parent / "fused_kernels.py"
    if not script.exists():
        return {"skipped": "bench/fused_kernels.py is not in this tree"}
    import shlex
    import subprocess
    cmd = [sys.executable, str(script), *shlex.split(args.kernels_args)]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.kernels_timeout_s)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {args.kernels_timeout_s}s", "command": cmd}
    text = p.stdout.strip()
    try:
        return {"command": cmd, "returncode": p.returncode, "result": json.loads(text[text.index("{"):])}
    except ValueError:
        return {"command": cmd, "returncode": p.returncode, "error": "no JSON on stdout",
                "stderr_tail": p.stderr[-2000:]}


# ---- main ----------------------------------------------------------------------------------------

def _rounded(x):
    if isinstance(x, float):
        return round(x, 4)
    if isinstance(x, dict):
        return {k: _rounded(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_rounded(v) for v in x]
    return x


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda", help="cuda | cuda:N | cpu (default cuda)")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="mixtral")
    ap.add_argument("--layers", type=int, default=None,
                    help="override the layer count (checks real matrix sizes on a small machine; not for timing)")
    ap.add_argument("--tokens", type=int, default=32, help="timed decode tokens per variant")
    ap.add_argument("--warmup", type=int, default=None, help="untimed decode tokens before them (8 on cuda, 4 on cpu)")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of: " + ", ".join(VARIANTS))
    ap.add_argument("--prefetch-accuracy", type=float, default=0.8,
                    help="probability each guessed expert is right (an assumption; see the docstring)")
    ap.add_argument("--seed", type=int, default=1, help="trace seed (weights and guesses derive from it)")
    ap.add_argument("--bw-repeats", type=int, default=32, help="timed copies of one expert buffer")
    ap.add_argument("--big-copy-mib", type=int, default=None, help="pinned buffer size (default 1024 on cuda, 16 on cpu)")
    ap.add_argument("--dtype", choices=("auto", "float16", "bfloat16", "float32"), default="auto",
                    help="compute dtype (auto: float16 on cuda, float32 on cpu)")
    ap.add_argument("--budget-s", type=float, default=420.0,
                    help="stop starting variants (and cut the timed loop) after this many seconds from start")
    ap.add_argument("--kernel", choices=KERNELS, default="auto",
                    help="quantized matmul: auto (triton on cuda, torch on cpu), triton or torch")
    ap.add_argument("--kernels-args", default="", help="arguments for bench/fused_kernels.py (run when it exists)")
    ap.add_argument("--kernels-timeout-s", type=int, default=150)
    ap.add_argument("--fail", default=None, help=argparse.SUPPRESS)   # tests: make this variant raise
    args = ap.parse_args(argv)
    bad = [v for v in args.variants.split(",") if v and v not in VARIANTS]
    if bad:
        ap.error(f"unknown variant(s) {', '.join(bad)}: choose from {', '.join(VARIANTS)}")
    if args.warmup is None:
        args.warmup = 4 if args.device.startswith("cpu") else 8
    if args.tokens < 1 or args.warmup < 0:
        ap.error("--tokens must be >= 1 and --warmup >= 0")
    if not 0 <= args.prefetch_accuracy <= 1:
        ap.error("--prefetch-accuracy must be within 0..1")
    return args


def run(args: argparse.Namespace, result: dict) -> None:
    phases = result["phases_s"]
    deadline = T0 + args.budget_s
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda asked for, but torch sees no CUDA GPU (use --device cpu)")
        if device.index is None:
            device = torch.device("cuda:0")
        torch.cuda.set_device(device)
        result["gpu_name"] = torch.cuda.get_device_name(device)
        result["cuda"] = torch.version.cuda
    cuda = device.type == "cuda"
    if not cuda:
        torch.set_num_threads(1)          # tiny ops: threads only add overhead (and the CPU is shared)
    dtype = {"auto": torch.float16 if cuda else torch.float32, "float16": torch.float16,
             "bfloat16": torch.bfloat16, "float32": torch.float32}[args.dtype]
    result["device"], result["dtype"] = str(device), str(dtype).replace("torch.", "")
    torch.manual_seed(args.seed)
    cfg = SHAPES[args.shape]
    if args.layers:
        cfg = replace(cfg, num_layers=args.layers)
    result["model"] = {k: getattr(cfg, k) for k in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                                                    "num_heads", "num_kv_heads", "head_dim", "num_experts", "top_k")}
    layout = ExpertLayout.for_model(cfg, EXPERT_SPEC, torch.float16)
    result["expert_bytes"] = layout.nbytes
    n_total = args.warmup + args.tokens + COUNTED_TOKENS

    t = time.perf_counter()
    log(f"{args.shape}: allocating {'and pinning ' if cuda else ''}{cfg.num_layers * cfg.num_experts} experts x "
        f"{layout.nbytes / 2**20:.1f} MiB = {cfg.num_layers * cfg.num_experts * layout.nbytes / 2**30:.2f} GiB host")
    try:
        store = InclusiveStore(cfg, layout, pin=cuda)
    except RuntimeError as exc:           # cudaHostRegister refused: measure unpinned rather than nothing
        if not cuda:
            raise
        result["errors"].append({"phase": "pin", "error": f"{exc}; continuing with pageable host memory"})
        log(f"pinning failed ({exc}); continuing unpinned")
        gc.collect()
        store = InclusiveStore(cfg, layout, pin=False)
    phases["alloc_pin"] = time.perf_counter() - t
    t = time.perf_counter()
    fill_experts(store, layout, cfg, args.seed)
    phases["fill"] = time.perf_counter() - t
    result["memory"] = {"host_expert_bytes": store.nbytes, "pinned_host_bytes": store.pinned_bytes}
    log(f"experts ready (alloc/pin {phases['alloc_pin']:.1f}s, fill {phases['fill']:.1f}s)")

    t = time.perf_counter()
    trunk = build_trunk(cfg, device, dtype)
    sync(device)
    phases["trunk"] = time.perf_counter() - t
    t = time.perf_counter()
    trace = synthetic_trace(n_total, num_layers=cfg.num_layers, num_experts=cfg.num_experts, top_k=cfg.top_k,
                            seed=args.seed)
    idx = torch.tensor(trace.routing, dtype=torch.long, device=device)            # [T, L, K]
    w = torch.tensor(trace.weights, dtype=torch.float32, device=device)           # [T, L, K]
    phases["trace"] = time.perf_counter() - t
    result["trace"] = {"source": "mixoff_app.trace.synthetic_trace", "seed": args.seed, "num_tokens": n_total}
    log(f"trunk {phases['trunk']:.1f}s, trace {phases['trace']:.1f}s")

    t = time.perf_counter()
    big = (args.big_copy_mib if args.big_copy_mib is not None else (1024 if cuda else 16)) << 20
    try:
        result["bandwidth"] = measure_bandwidth(store, device, args.bw_repeats, big)
        result["bandwidth"]["used_for_limit"] = "expert_copy_GBps"
        result["memory"]["pinned_bandwidth_buffer_bytes"] = big if cuda else 0
        log(f"bandwidth: expert {result['bandwidth']['expert_copy_GBps']:.1f} GB/s, "
            f"{big >> 20} MiB {result['bandwidth']['big_copy_GBps']:.1f} GB/s")
    except Exception as exc:                          # the variants still run; limits are then omitted
        result["errors"].append({"phase": "bandwidth", "error": f"{type(exc).__name__}: {exc}"})
        log(f"bandwidth failed: {exc}")
    phases["bandwidth"] = time.perf_counter() - t

    ctx = {"cfg": cfg, "device": device, "dtype": dtype, "store": store, "trunk": trunk, "idx": idx, "w": w,
           "routing": trace.routing}
    wanted = [v for v in args.variants.split(",") if v]
    if not cuda:
        result["not_applicable"] = {v: "CUDA graphs need a CUDA device" for v in wanted if VARIANTS[v][4]}
        wanted = [v for v in wanted if v not in result["not_applicable"]]
    for name in [v for v in RUN_ORDER if v in wanted]:
        if time.perf_counter() > deadline:
            result["variants"][name] = {"ok": False, "skipped": f"budget of {args.budget_s:.0f}s spent"}
            result["skipped"].append(name)
            log(f"{name}: skipped (budget)")
            continue
        t = time.perf_counter()
        log(f"{name}: running")
        try:
            v = run_variant(name, ctx, args, deadline)
            log(f"{name}: {v['tokens_per_s']:.2f} tok/s, hit rate {v['hit_rate']:.3f}, "
                f"{v['misses_per_token']:.1f} misses/token")
        except Exception as exc:
            v = {"ok": False, "error": f"{type(exc).__name__}: {exc}",
                 "traceback": traceback.format_exc(limit=4)[-2000:]}
            log(f"{name}: FAILED {v['error']}")
        gc.collect()
        if cuda:
            torch.cuda.synchronize(device)
            torch.cuda.empty_cache()
        v["wall_s"] = time.perf_counter() - t
        phases[f"variant:{name}"] = v["wall_s"]
        result["variants"][name] = v
    if cuda:
        result["memory"]["torch_peak_allocated"] = max(
            (v.get("torch_peak_allocated") or 0) for v in result["variants"].values()) or None
    result["variants"] = {n: result["variants"][n] for n in VARIANTS if n in result["variants"]}
    t = time.perf_counter()
    result["kernels"] = kernels_bench(args)
    phases["kernels"] = time.perf_counter() - t


def main(argv=None) -> int:
    args = parse_args(argv)
    result: dict = {
        "benchmark": "gpu_offload", "ok": False, "shape": args.shape, "torch": torch.__version__,
        "argv": sys.argv[1:] if argv is None else list(argv),
        "tokens": args.tokens, "warmup": args.warmup, "budget_s": args.budget_s,
        "quant": {"experts": f"{EXPERT_SPEC.describe()} (scale_group {EXPERT_SPEC.scale_group})",
                  "attention": f"{ATTN_SPEC.describe()} (scale_group {ATTN_SPEC.scale_group})"},
        "prefetch_accuracy": args.prefetch_accuracy, "prefetch_accuracy_note": PREFETCH_NOTE,
        "limit_formula": "max(misses_per_token * expert_bytes / expert_copy_GBps, all_resident s/token)",
        "variants": {}, "skipped": [], "errors": [], "phases_s": {"import": T0 - _STARTED},
    }
    try:
        run(args, result)
        add_limits(result)
        result["ok"] = not result["errors"] and all(v.get("ok") for v in result["variants"].values())
    except BaseException as exc:              # still print what we have (KeyboardInterrupt included)
        result["errors"].append({"phase": "setup", "error": f"{type(exc).__name__}: {exc}",
                                 "traceback": traceback.format_exc(limit=6)[-3000:]})
        log(f"FAILED: {type(exc).__name__}: {exc}")
        try:
            add_limits(result)
        except Exception:
            pass
    finally:
        result["phases_s"]["total"] = time.perf_counter() - _STARTED
        text = json.dumps(result, indent=1, default=str)
        print(text, flush=True)
        brief = {"ok": result["ok"], "bandwidth_GBps": result.get("bandwidth", {}).get("expert_copy_GBps"),
                 "summary": result.get("summary"), "errors": [e["error"] for e in result["errors"]],
                 "skipped": result["skipped"], "total_s": result["phases_s"]["total"]}
        log("result: " + json.dumps(_rounded(brief), default=str))
        out = os.environ.get("OUT")
        if out:
            try:
                Path(out).mkdir(parents=True, exist_ok=True)
                (Path(out) / "gpu_offload.json").write_text(text)
            except OSError as exc:
                log(f"could not write $OUT/gpu_offload.json: {exc}")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
