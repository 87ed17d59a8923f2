"""What an expert cache of k per layer would have done with one answer's routing: our trace simulator's policies
and the Belady bound (``trace.compare``) over the decoded tokens, one look-up per token, layer and chosen expert
as in our engine's decode, starting from an empty cache.

For a model of a known shape (a preset, e.g. Mixtral-8x7B or Qwen3-30B-A3B) the memory planner also says which
k a 12 GB card with 32 GB of RAM would hold, and how many bytes an expert is: "what would this answer cost there".
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

from ..trace import POLICY_NAMES, Trace, compare

CARD = (12, 32)           # the reference card: GiB of VRAM and of RAM (README's "12 GB card, 32 GB RAM")


@dataclass(frozen=True)
class CardPlan:
    """The planner's k per layer for the reference card, and one expert's bytes in the family's quantization."""
    label: str
    sizes: tuple[int, ...]
    expert_bytes: int


@dataclass(frozen=True)
class ReplayRow:
    label: str                         # "k = 4", or the card's
    sizes: tuple[int, ...]             # k per layer
    hit_rates: dict                    # policy name -> hit rate (lru, lfu, lrfu, belady)
    cold_bound: float                  # only first uses miss: no cache of this size does better
    misses_per_token: float            # LRU's, the engine's default policy
    bytes_per_token: Optional[float]   # LRU's misses times one expert's bytes, when the expert's size is known


def replayable(rows: Sequence) -> list:
    """Tokens every layer of which names real experts (vLLM marks positions it could not route with -1)."""
    return [tok for tok in rows if all(e >= 0 for ex in tok for e in ex)]


def candidate_ks(num_experts: int, top_k: int, chosen: Optional[int] = None) -> list[int]:
    """A few cache sizes from top-k up to all but one expert per layer, and the operator's chosen k."""
    ks = {top_k, num_experts // 4, num_experts // 2, 3 * num_experts // 4}
    if chosen:
        ks.add(chosen)
    return sorted(k for k in ks if 1 <= k <= num_experts and (k < num_experts or k == chosen))


def replay_answer(rows: Sequence, num_experts: int, ks: Sequence[int], card: Optional[CardPlan] = None
                  ) -> tuple[ReplayRow, ...]:
    """One row per k (and one for ``card``) over the decoded tokens ``rows`` ([token][layer][k] expert ids)."""
    rows = replayable(rows)
    if not rows:
        return ()
    L = len(rows[0])
    trace = Trace(header={"num_layers": L, "num_experts": num_experts, "top_k": len(rows[0][0])},
                  routing=[list(tok) for tok in rows])
    plans = [(f"k = {k}", (k,) * L, None) for k in ks]
    if card is not None and len(card.sizes) == L:
        plans.append((card.label, card.sizes, card.expert_bytes))
    out = []
    for label, sizes, expert_bytes in plans:
        results = compare(trace, list(sizes), POLICY_NAMES)
        misses = sum(results["lru"].misses) / len(rows)
        out.append(ReplayRow(label, tuple(sizes), {n: r.hit_rate for n, r in results.items()},
                             results["belady"].cold_bound, misses,
                             misses * expert_bytes if expert_bytes else None))
    return tuple(out)


def card_plan(model_names: Sequence[str]) -> Optional[CardPlan]:
    """The planner on the reference card for the first name that is a known shape (None: none is)."""
    from ..presets import PRESETS, preset_name
    name = next((n for n in map(preset_name, filter(None, model_names)) if n), None)
    if name is None:
        return None
    # The planner is pure sizing, but its module imports torch: only when a known model asks for it.
    from ..config import FAMILY, QuantConfig
    from ..plan import GiB, plan_for
    vram, ram = CARD
    p = plan_for(PRESETS[name], QuantConfig.from_bits(4, FAMILY), 4096, vram_bytes=vram * GiB, ram_bytes=ram * GiB,
                 device="cuda", model_name=name)
    if not p.feasible:
        return None
    ks = sorted(set(p.sizes))
    k = str(ks[0]) if len(ks) == 1 else f"{ks[0]}–{ks[-1]}"
    return CardPlan(f"{vram} GB card, {ram} GB RAM ({name}, planner): k = {k}", tuple(p.sizes), p.bytes.expert)
