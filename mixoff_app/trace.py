"""Routing traces: record, read, replay through eviction policies, bound with Belady, synthesize.

A trace is the experts each generated token was routed to, per layer. File format (JSON Lines), one
line per (token, layer), optionally preceded by one header line:

    {"header": {"model": "...", "num_layers": 32, "num_experts": 8, "top_k": 2}}
    {"token": 0, "layer": 0, "experts": [3, 5], "weights": [0.62, 0.38]}

Replay mirrors ``ExpertCache``'s rules: per token and layer, each needed expert is a hit if
resident, otherwise a miss that fills an empty slot or evicts the policy's victim among residents
the current token does not need. Pure Python apart from a small numpy solve used to calibrate the
synthetic generator; no torch.
"""
from __future__ import annotations

import argparse
import bisect
import functools
import itertools
import json
import math
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence, Union

from .policy import POLICY_CLASSES, EvictionPolicy, make_policy

Routing = list[list[tuple[int, ...]]]          # routing[token][layer] -> experts, first choice first


class TraceError(ValueError):
    """A trace file or record that cannot be read; the message names the file and line."""


# --------------------------------------------------------------------------------------------
# the trace and its file format


@dataclass
class Trace:
    header: dict
    routing: Routing
    weights: Optional[list[list[tuple[float, ...]]]] = None

    @property
    def num_tokens(self) -> int:
        return len(self.routing)

    @property
    def num_layers(self) -> int:
        if "num_layers" in self.header:
            return int(self.header["num_layers"])
        return len(self.routing[0]) if self.routing else 0

    @property
    def num_experts(self) -> int:
        if "num_experts" in self.header:
            return int(self.header["num_experts"])
        return 1 + max((e for tok in self.routing for ex in tok for e in ex), default=-1)

    @property
    def top_k(self) -> int:
        if "top_k" in self.header:
            return int(self.header["top_k"])
        return max((len(ex) for tok in self.routing for ex in tok), default=0)

    def records(self) -> Iterator[dict]:
        yield from records_from_routing(self.routing, self.weights)


def records_from_routing(routing: Sequence[Sequence[Sequence[int]]],
                         weights: Optional[Sequence[Sequence[Sequence[float]]]] = None) -> Iterator[dict]:
    """``routing[token][layer]`` (and the matching weights) -> trace records."""
    for t, layers in enumerate(routing):
        for l, experts in enumerate(layers):
            rec = {"token": t, "layer": l, "experts": [int(e) for e in experts]}
            if weights is not None:
                rec["weights"] = [round(float(w), 6) for w in weights[t][l]]
            yield rec


def write_trace(path: Union[str, Path], records: Union[Trace, Iterable[dict]], header: Optional[dict] = None) -> int:
    """Write a header line (if any) and one JSON line per record; returns the number of records."""
    if isinstance(records, Trace):
        header = records.header if header is None else header
        records = records.records()
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        if header is not None:
            f.write(json.dumps({"header": header}, separators=(",", ":")) + "\n")
        for rec in records:
            f.write(json.dumps(rec, separators=(",", ":")) + "\n")
            n += 1
    return n


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _parse_record(obj: Any, header: dict) -> tuple[int, int, tuple[int, ...], Optional[tuple[float, ...]]]:
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    missing = [k for k in ("token", "layer", "experts") if k not in obj]
    if missing:
        raise ValueError(f"missing field(s) {', '.join(missing)}")
    t, l, experts = obj["token"], obj["layer"], obj["experts"]
    if not _is_int(t) or t < 0:
        raise ValueError(f"'token' must be a whole number >= 0, not {t!r}")
    if not _is_int(l) or l < 0:
        raise ValueError(f"'layer' must be a whole number >= 0, not {l!r}")
    if not isinstance(experts, list) or not experts or not all(_is_int(e) and e >= 0 for e in experts):
        raise ValueError(f"'experts' must be a non-empty list of expert ids >= 0, not {experts!r}")
    if len(set(experts)) != len(experts):
        raise ValueError(f"'experts' has a duplicate expert: {experts!r}")
    num_experts, num_layers, top_k = header.get("num_experts"), header.get("num_layers"), header.get("top_k")
    if num_experts is not None and max(experts) >= num_experts:
        raise ValueError(f"expert id {max(experts)} is out of range for num_experts={num_experts}")
    if num_layers is not None and l >= num_layers:
        raise ValueError(f"layer {l} is out of range for num_layers={num_layers}")
    if top_k is not None and len(experts) != top_k:
        raise ValueError(f"{len(experts)} experts given but the header says top_k={top_k}")
    w = obj.get("weights")
    if w is not None:
        if (not isinstance(w, list) or len(w) != len(experts)
                or not all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in w)):
            raise ValueError(f"'weights' must be a list of {len(experts)} finite numbers, not {w!r}")
        w = tuple(float(x) for x in w)
    return t, l, tuple(experts), w


def read_trace(path: Union[str, Path]) -> Trace:
    """Read a JSONL trace (with or without a header line). Raises ``TraceError`` naming file:line."""
    path = str(path)
    header: dict = {}
    cells: dict[tuple[int, int], tuple] = {}
    where: dict[tuple[int, int], int] = {}
    try:
        f = open(path, encoding="utf-8")
    except OSError as e:
        raise TraceError(f"{path}: cannot open trace: {e.strerror or e}") from None
    with f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise TraceError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
            if isinstance(obj, dict) and "header" in obj:
                if cells or header:
                    raise TraceError(f"{path}:{lineno}: a header is only allowed on the first line")
                if not isinstance(obj["header"], dict):
                    raise TraceError(f"{path}:{lineno}: 'header' must be a JSON object")
                header = obj["header"]
                for key in ("num_layers", "num_experts", "top_k"):
                    if key in header and (not _is_int(header[key]) or header[key] < 1):
                        raise TraceError(f"{path}:{lineno}: header {key!r} must be a whole number >= 1, "
                                         f"not {header[key]!r}")
                continue
            try:
                t, l, experts, w = _parse_record(obj, header)
            except ValueError as e:
                raise TraceError(f"{path}:{lineno}: {e}") from None
            if (t, l) in cells:
                raise TraceError(f"{path}:{lineno}: token {t} layer {l} already given on line {where[t, l]}")
            cells[t, l] = (experts, w)
            where[t, l] = lineno
    if not cells:
        raise TraceError(f"{path}: the trace has no records")
    num_tokens = 1 + max(t for t, _ in cells)
    num_layers = header.get("num_layers") or 1 + max(l for _, l in cells)
    if len(cells) != num_tokens * num_layers:
        gap = next((t, l) for t in range(num_tokens) for l in range(num_layers) if (t, l) not in cells)
        raise TraceError(f"{path}: incomplete trace: no record for token {gap[0]} layer {gap[1]} "
                         f"(expected tokens 0..{num_tokens - 1} x layers 0..{num_layers - 1})")
    routing = [[cells[t, l][0] for l in range(num_layers)] for t in range(num_tokens)]
    have_w = [c[1] is not None for c in cells.values()]
    weights = None
    if all(have_w):
        weights = [[cells[t, l][1] for l in range(num_layers)] for t in range(num_tokens)]
    elif any(have_w):
        t, l = next(k for k, c in cells.items() if c[1] is None)
        raise TraceError(f"{path}:{where[t, l]}: 'weights' missing here but given on other lines")
    return Trace(header=dict(header), routing=routing, weights=weights)


# --------------------------------------------------------------------------------------------
# replay


@dataclass
class ReplayResult:
    """Hits/misses/evictions per layer for one policy (or Belady) at one cache size per layer.

    ``cold_misses`` are first-ever uses: no cache of any policy avoids them, so ``cold_bound`` is
    the hit rate an infinite cache would reach, an upper bound above Belady's.
    """
    policy: str
    cache_sizes: tuple[int, ...]
    hits: list[int]
    misses: list[int]
    evictions: list[int]
    cold_misses: list[int]

    @property
    def accesses(self) -> int:
        return sum(self.hits) + sum(self.misses)

    @property
    def hit_rate(self) -> float:
        return sum(self.hits) / self.accesses if self.accesses else 0.0

    @property
    def layer_hit_rates(self) -> list[float]:
        return [h / (h + m) if h + m else 0.0 for h, m in zip(self.hits, self.misses)]

    @property
    def cold_bound(self) -> float:
        return 1.0 - sum(self.cold_misses) / self.accesses if self.accesses else 0.0

    @property
    def layer_cold_bounds(self) -> list[float]:
        return [1.0 - c / (h + m) if h + m else 0.0 for c, h, m in zip(self.cold_misses, self.hits, self.misses)]

    def to_dict(self) -> dict:
        return {"policy": self.policy, "cache_sizes": list(self.cache_sizes), "hit_rate": self.hit_rate,
                "hits": sum(self.hits), "misses": sum(self.misses), "evictions": sum(self.evictions),
                "cold_misses": sum(self.cold_misses), "cold_bound": self.cold_bound,
                "layer_hit_rates": self.layer_hit_rates, "layer_hits": list(self.hits),
                "layer_misses": list(self.misses), "layer_evictions": list(self.evictions)}


def _routing(trace: Union[Trace, Routing]) -> tuple[Routing, int]:
    if isinstance(trace, Trace):
        return trace.routing, trace.num_experts
    return trace, 1 + max((e for tok in trace for ex in tok for e in ex), default=-1)


def _sizes(cache_size: Union[int, Sequence[int]], num_layers: int, num_experts: int) -> tuple[int, ...]:
    sizes = (cache_size,) * num_layers if isinstance(cache_size, int) else tuple(cache_size)
    if len(sizes) != num_layers:
        raise ValueError(f"{len(sizes)} per-layer cache sizes given for {num_layers} layers")
    for k in sizes:
        if not _is_int(k) or not 1 <= k <= num_experts:
            raise ValueError(f"cache size {k!r} must be between 1 and the number of experts ({num_experts})")
    return sizes


PolicySpec = Union[str, Callable[[int], EvictionPolicy]]


def _replay_layer(column: Sequence[tuple[int, ...]], k: int, choose: Callable, policy: Optional[EvictionPolicy]):
    """One layer's replay, in ``ExpertCache.fetch``'s order; ``choose(tick, candidates) -> victim``.

    Per token: every hit is accessed first; then each miss takes an empty slot or the victim's slot,
    candidates being residents the token does not need (in slot order); the loaded experts are
    accessed after all of them are in. Only when k < top_k do candidates run out: the remaining
    misses then reuse slots of experts this token has already been served.
    """
    slots: list[int] = []                 # expert per slot, in slot order
    hits = misses = evictions = 0
    for tick, needed in enumerate(column):
        present = [e for e in needed if e in slots]
        absent = [e for e in needed if e not in slots]
        hits += len(present)
        misses += len(absent)
        if policy is not None:
            for e in present:
                policy.on_access(e, tick)
        pending = set(needed)
        issued = 0
        for e in absent:
            if len(slots) < k:
                slots.append(e)
            else:
                candidates = [r for r in slots if r not in pending]
                if not candidates:
                    break
                v = choose(tick, candidates)
                slots[slots.index(v)] = e
                evictions += 1
                if policy is not None:
                    policy.on_remove(v)
            issued += 1
            if policy is not None:
                policy.on_insert(e, tick)
        pending.difference_update(present)
        for e in absent[:issued]:
            pending.discard(e)
            if policy is not None:
                policy.on_access(e, tick)
        for e in absent[issued:]:         # k < top_k
            v = choose(tick, [r for r in slots if r not in pending])
            slots[slots.index(v)] = e
            evictions += 1
            pending.discard(e)
            if policy is not None:
                policy.on_remove(v)
                policy.on_insert(e, tick)
                policy.on_access(e, tick)
    return hits, misses, evictions


def _cold(column: Sequence[tuple[int, ...]]) -> int:
    return len({e for needed in column for e in needed})


def simulate(trace: Union[Trace, Routing], cache_size: Union[int, Sequence[int]], policy: PolicySpec) -> ReplayResult:
    """Replay ``trace`` through a per-layer cache of ``cache_size`` experts run by ``policy``.

    ``policy`` is a name from ``POLICY_CLASSES`` or a factory ``num_experts -> EvictionPolicy``
    (one instance per layer, as in the real cache).
    """
    routing, num_experts = _routing(trace)
    num_layers = len(routing[0]) if routing else 0
    sizes = _sizes(cache_size, num_layers, num_experts)
    factory = (lambda n: make_policy(policy, n)) if isinstance(policy, str) else policy
    name = policy if isinstance(policy, str) else getattr(factory(num_experts), "name", "custom")
    hits, misses, evictions, cold = [], [], [], []
    for l in range(num_layers):
        column = [tok[l] for tok in routing]
        pol = factory(num_experts)
        h, m, ev = _replay_layer(column, sizes[l], lambda tick, cands: pol.victim(cands), pol)
        hits.append(h), misses.append(m), evictions.append(ev), cold.append(_cold(column))
    return ReplayResult(name, sizes, hits, misses, evictions, cold)


def belady(trace: Union[Trace, Routing], cache_size: Union[int, Sequence[int]]) -> ReplayResult:
    """Offline optimum (MIN): evict the candidate whose next use is farthest away; experts the current
    token needs are never candidates (same rules as ``simulate``)."""
    routing, num_experts = _routing(trace)
    num_layers = len(routing[0]) if routing else 0
    sizes = _sizes(cache_size, num_layers, num_experts)
    hits, misses, evictions, cold = [], [], [], []
    never = len(routing)
    for l in range(num_layers):
        column = [tok[l] for tok in routing]
        # next_use[t][e]: first token after t that uses e (``never`` if none)
        next_use: list[list[int]] = [[]] * len(column)
        ahead = [never] * max(num_experts, 1)
        for t in range(len(column) - 1, -1, -1):
            next_use[t] = ahead[:]
            for e in column[t]:
                ahead[e] = t

        def choose(tick: int, candidates: list[int]) -> int:
            nu = next_use[tick]
            return max(candidates, key=lambda e: nu[e])

        h, m, ev = _replay_layer(column, sizes[l], choose, None)
        hits.append(h), misses.append(m), evictions.append(ev), cold.append(_cold(column))
    return ReplayResult("belady", sizes, hits, misses, evictions, cold)


# --------------------------------------------------------------------------------------------
# routing statistics and the synthetic generator


def routing_stats(trace: Union[Trace, Routing]) -> list[dict]:
    """Per layer, over consecutive token pairs: ``first_same`` = P(same first-choice expert) and
    ``share_any`` = P(at least one expert in common) -- the two rows of Mixtral's Table 5."""
    routing, _ = _routing(trace)
    num_layers = len(routing[0]) if routing else 0
    n = max(len(routing) - 1, 0)
    out = []
    for l in range(num_layers):
        same = share = 0
        for t in range(1, len(routing)):
            a, b = routing[t - 1][l], routing[t][l]
            same += a[0] == b[0]
            share += not set(a).isdisjoint(b)
        out.append({"layer": l, "first_same": same / n if n else 0.0, "share_any": share / n if n else 0.0})
    return out


# Mixtral 8x7B, arXiv 2401.04088 Table 5 (repetition of expert assignment between consecutive
# tokens, across datasets): layer -> (first choice same, at least one shared). Point targets are the
# middle of the published ranges.
TABLE5_ANCHORS = {0: (0.140, 0.475), 15: (0.260, 0.645), 31: (0.230, 0.495)}
TABLE5_LAYERS = 32


def random_baseline(num_experts: int, top_k: int) -> tuple[float, float]:
    """(first_same, share_any) for uniform random top-k routing: 1/8 and 46.4% for Mixtral."""
    first = 1.0 / num_experts
    if 2 * top_k > num_experts:
        return first, 1.0
    return first, 1.0 - math.comb(num_experts - top_k, top_k) / math.comb(num_experts, top_k)


def synthetic_targets(num_layers: int = 32, num_experts: int = 8, top_k: int = 2) -> list[tuple[float, float]]:
    """Per-layer (first_same, share_any) targets: Table 5's anchors linearly interpolated over depth.

    Other depths are mapped onto Mixtral's 32 layers; other (num_experts, top_k) keep the same
    lift above random routing, ``(target - random) / (1 - random)``.
    """
    anchors = sorted(TABLE5_ANCHORS.items())
    r1, r2 = random_baseline(8, 2)
    q1, q2 = random_baseline(num_experts, top_k)
    out = []
    for l in range(num_layers):
        x = l * (TABLE5_LAYERS - 1) / (num_layers - 1) if num_layers > 1 else 0.0
        for (xa, (a1, a2)), (xb, (b1, b2)) in zip(anchors, anchors[1:]):
            if x <= xb:
                f = (x - xa) / (xb - xa)
                s1, s2 = a1 + f * (b1 - a1), a2 + f * (b2 - a2)
                break
        if (num_experts, top_k) != (8, 2):
            s1 = q1 + (s1 - r1) / (1 - r1) * (1 - q1)
            s2 = q2 + (s2 - r2) / (1 - r2) * (1 - q2)
        out.append((s1, s2))
    return out


@dataclass(frozen=True)
class LayerProcess:
    """One layer's sticky routing process.

    First choice: with probability ``stick`` the previous first choice, else a draw from
    ``popularity`` (which may land on the same expert again). Later choices: drawn without
    replacement from ``popularity`` with the previous token's experts weighted by ``affinity``
    (> 1 sticky, < 1 avoiding them).
    """
    popularity: tuple[float, ...]
    stick: float
    affinity: float


_MAX_STATES = 2000


def _chain_share(popularity: Sequence[float], stick: float, affinity: float, top_k: int) -> float:
    """Exact stationary P(consecutive tokens share an expert) of a ``LayerProcess`` (numpy, small E)."""
    import numpy as np

    pi = np.asarray(popularity, dtype=float)
    E = len(pi)
    states = np.array(list(itertools.permutations(range(E), top_k)))            # [n, K]
    n = len(states)
    inprev = np.zeros((n, E), dtype=bool)                                         # [n, E]
    inprev[np.arange(n)[:, None], states] = True
    w = pi[None, :] * np.where(inprev, affinity, 1.0)                             # [n, E]
    first = stick * (states[:, 0][:, None] == states[None, :, 0]) + (1 - stick) * pi[states[None, :, 0]]
    T = first                                                                     # [n, n]
    remaining = w.sum(1)[:, None] - w[:, states[:, 0]]
    for r in range(1, top_k):
        wr = w[:, states[:, r]]
        T = T * wr / remaining
        remaining = remaining - wr
    # stationary distribution: mu T = mu, sum(mu) = 1 (one balance equation swapped for the sum)
    A = T.T - np.eye(n)
    A[-1] = 1.0
    b = np.zeros(n)
    b[-1] = 1.0
    mu = np.linalg.solve(A, b)
    overlap = inprev[:, states].any(-1)                                           # [n, n]
    return float(mu @ (T * overlap).sum(1))


def calibrate_layer(popularity: Sequence[float], first_same: float, share_any: float, top_k: int) -> LayerProcess:
    """Solve ``stick`` in closed form (the first choice's stationary law is ``popularity``, so
    P(same) = stick + (1 - stick) * sum(p^2)) and ``affinity`` by bisection on the exact chain."""
    sq = sum(p * p for p in popularity)
    stick = min(max((first_same - sq) / (1 - sq), 0.0), 1.0)
    E = len(popularity)
    if top_k < 2 or math.perm(E, top_k) > _MAX_STATES:
        return LayerProcess(tuple(popularity), stick, 1.0)
    lo, hi = -8.0, 8.0
    for _ in range(32):
        mid = (lo + hi) / 2
        if _chain_share(popularity, stick, math.exp(mid), top_k) < share_any:
            lo = mid
        else:
            hi = mid
    return LayerProcess(tuple(popularity), stick, math.exp((lo + hi) / 2))


@functools.lru_cache(maxsize=16)
def synthetic_processes(num_layers: int = 32, num_experts: int = 8, top_k: int = 2, seed: int = 0,
                        skew: float = 0.2) -> tuple[LayerProcess, ...]:
    """Calibrated per-layer processes; popularity is mildly non-uniform (log-normal, sigma ``skew``)."""
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k ({top_k}) must be within 1..num_experts ({num_experts})")
    rng = random.Random(f"mixoff-popularity-{seed}")
    out = []
    for s1, s2 in synthetic_targets(num_layers, num_experts, top_k):
        raw = [math.exp(skew * rng.gauss(0.0, 1.0)) for _ in range(num_experts)]
        total = sum(raw)
        out.append(calibrate_layer([x / total for x in raw], s1, s2, top_k))
    return tuple(out)


def _draw(rng: random.Random, weights: Sequence[float], total: float) -> int:
    x = rng.random() * total
    for e, w in enumerate(weights):
        x -= w
        if x < 0:
            return e
    return max(i for i, w in enumerate(weights) if w > 0)


def synthetic_trace(num_tokens: int, num_layers: int = 32, num_experts: int = 8, top_k: int = 2,
                    seed: int = 0) -> Trace:
    """A routing trace whose consecutive-token repetition matches Mixtral's Table 5 per layer.

    Each layer is an independent ``LayerProcess`` (see ``synthetic_processes``), calibrated
    exactly on its Markov chain, so a long trace's ``routing_stats`` land on
    ``synthetic_targets`` up to sampling noise. Weights are softmax-renormalised top-k gates with
    exponential logit gaps (first >= second >= ...).
    """
    if num_tokens < 1 or num_layers < 1:
        raise ValueError("num_tokens and num_layers must be >= 1")
    procs = synthetic_processes(num_layers, num_experts, top_k, seed)
    rng = random.Random(f"mixoff-routing-{seed}")
    wrng = random.Random(f"mixoff-weights-{seed}")
    cums = [list(itertools.accumulate(p.popularity)) for p in procs]
    prev: list[Optional[tuple[int, ...]]] = [None] * num_layers
    routing: Routing = []
    weights = []
    for _ in range(num_tokens):
        row, wrow = [], []
        for l, proc in enumerate(procs):
            last = prev[l]
            pop = proc.popularity
            if last is not None and rng.random() < proc.stick:
                first = last[0]
            else:
                first = min(bisect.bisect_right(cums[l], rng.random() * cums[l][-1]), num_experts - 1)
            chosen = [first]
            if top_k > 1:
                if last is None or proc.affinity == 1.0:
                    w = list(pop)
                else:
                    w = [p * proc.affinity if e in last else p for e, p in enumerate(pop)]
                w[first] = 0.0
                total = sum(w)
                for _r in range(1, top_k):
                    e = _draw(rng, w, total)
                    chosen.append(e)
                    total -= w[e]
                    w[e] = 0.0
            experts = tuple(chosen)
            prev[l] = experts
            row.append(experts)
            logits = [0.0]
            for _r in range(1, top_k):
                logits.append(logits[-1] - wrng.expovariate(1.0))
            z = [math.exp(x) for x in logits]
            s = sum(z)
            wrow.append(tuple(round(x / s, 4) for x in z))
        routing.append(row)
        weights.append(wrow)
    header = {"model": "synthetic-mixtral-table5", "num_layers": num_layers, "num_experts": num_experts,
              "top_k": top_k, "seed": seed, "source": "synthetic"}
    return Trace(header=header, routing=routing, weights=weights)


# --------------------------------------------------------------------------------------------
# CLI: mixoff trace {replay, synthetic, record}

POLICY_NAMES = tuple(POLICY_CLASSES)


def parse_cache_size(text: str) -> Union[int, tuple[int, ...]]:
    """'4' -> 4 for every layer; '2,3,4,...' -> one size per layer."""
    try:
        parts = [int(x) for x in str(text).split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"cache size must be a whole number or a comma list of them, not {text!r}")
    if any(k < 1 for k in parts):
        raise argparse.ArgumentTypeError(f"cache sizes must be >= 1, not {text!r}")
    return parts[0] if len(parts) == 1 else tuple(parts)


def compare(trace: Trace, cache_size: Union[int, Sequence[int]], policies: Sequence[PolicySpec] = POLICY_NAMES,
            ) -> dict[str, ReplayResult]:
    """Every policy plus Belady on one trace and cache size."""
    out = {}
    for p in policies:
        r = simulate(trace, cache_size, p)
        out[r.policy] = r
    out["belady"] = belady(trace, cache_size)
    return out


def format_table(trace: Trace, results: dict[str, ReplayResult], title: str = "") -> str:
    names = list(results)
    any_r = next(iter(results.values()))
    sizes = any_r.cache_sizes
    k = str(sizes[0]) if len(set(sizes)) == 1 else ",".join(map(str, sizes))
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
    n = write_trace(args.out, trace)
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
    n = write_trace(args.out, records_from_routing(routing, routing_weights), header)
    print(f"wrote {n} records ({len(routing)} tokens x {num_layers} layers) to {args.out}")
    return 0


def engine_generate(args: argparse.Namespace) -> tuple:
    """Default ``generate_fn``: load the engine, answer ``args.prompt`` once, return its decode routing.

    Routing does not depend on the cache, so the default cache configuration is used. Imported lazily:
    the rest of this module needs no torch.
    """
    from .config import EngineConfig, QuantConfig, SamplingParams, parse_bits
    from .engine import Engine

    quant = QuantConfig.from_bits(parse_bits(args.attn_bits), parse_bits(args.expert_bits))
    engine = Engine.load(EngineConfig(model=args.model, device=args.device, quant=quant),
                         progress=lambda msg: print(msg, file=sys.stderr))
    engine.model.record_weights = True
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
              "num_layers": info.num_layers, "num_experts": info.num_experts, "top_k": info.top_k}
    return routing, weights, header


def add_trace_parser(subparsers, generate_fn: Optional[GenerateFn] = None) -> argparse.ArgumentParser:
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
    s.set_defaults(func=synthetic_main)

    c = sub.add_parser("record", help="generate once and write the routing as a trace")
    c.add_argument("--model", "-m", default="tiny")
    c.add_argument("--prompt", required=True)
    c.add_argument("--max-new-tokens", type=int, default=64)
    c.add_argument("--greedy", action="store_true")
    c.add_argument("--device", default=None)
    c.add_argument("--attn-bits", default="4")
    c.add_argument("--expert-bits", default="family", help="default: the model family's")
    c.add_argument("out", metavar="OUT", help="output JSONL path")
    gen = engine_generate if generate_fn is None else generate_fn
    c.set_defaults(func=lambda a: record_main(a, gen))
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m mixoff_app.trace ...`` until the main CLI registers ``trace``."""
    parser = argparse.ArgumentParser(prog="python -m mixoff_app.trace")
    add_trace_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["trace", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
