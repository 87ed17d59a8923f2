"""Routing statistics and synthetic traces calibrated to Mixtral's (Table 5 of the Mixtral paper).

Pure Python apart from a small numpy solve used to calibrate the generator; no torch.
"""
from __future__ import annotations

import bisect
import functools
import itertools
import math
import random
from dataclasses import dataclass
from typing import Optional, Sequence, Union

from .format import Routing, Trace
from .replay import _routing


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
