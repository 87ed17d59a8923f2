"""Counters of the expert cache and the generate loop, and the immutable snapshot the UI reads.

Counters are bumped where each event happens (cache fetch, eviction, copy, token end) with plain
Python ints: the cache decision is made on the host anyway, so counting costs no device sync.
``snapshot()`` copies them under a lock; the UI polls it on a timer and never touches tensors.
"""
from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import asdict, dataclass
from typing import Optional

from .route_log import Segment

ROLLING_TOKENS = 64
HISTORY_TOKENS = 512


@dataclass(frozen=True)
class MemoryReading:
    gpu_name: Optional[str]            # None: no CUDA GPU in use (the panel says so)
    vram_used: int = 0                 # bytes used on the device (pynvml, else torch reserved)
    vram_total: int = 0
    torch_allocated: int = 0
    torch_reserved: int = 0
    torch_peak_allocated: int = 0
    process_rss: int = 0
    system_ram_used: int = 0
    system_ram_total: int = 0
    pinned_bytes: int = 0              # host bytes held in page-locked expert buffers
    host_expert_bytes: int = 0         # host bytes held by expert buffers, pinned or not


@dataclass(frozen=True)
class LayerEvents:
    """What one layer did for the latest token."""
    hits: tuple[int, ...] = ()
    misses: tuple[int, ...] = ()       # loaded on demand
    prefetched: tuple[int, ...] = ()   # loaded ahead by the prefetcher (for this or the next token)
    evicted: tuple[int, ...] = ()


@dataclass(frozen=True)
class StatsSnapshot:
    seq: int                           # grows with every token; equal seq means nothing changed
    num_moe_layers: int
    num_experts: int
    top_k: int
    cache_sizes: tuple[int, ...]
    policy: str
    placement: str
    resident: tuple[tuple[int, ...], ...]   # per layer, the expert in each device slot (-1: empty)
    last_token: tuple[LayerEvents, ...]
    hits: int
    misses: int
    evictions: int
    bytes_h2d: int
    bytes_d2h: int
    bytes_disk: int
    prefetch_issued: int
    prefetch_used: int
    prefetch_wasted: int
    layer_hits: tuple[int, ...]
    layer_misses: tuple[int, ...]
    hit_rate: float                    # since start
    answer_hit_rate: float             # this (or the last) answer
    rolling_hit_rate: float            # over the last ROLLING_TOKENS tokens
    hit_rate_history: tuple[float, ...]  # per token, the fraction of expert look-ups that hit
    tokens_total: int
    answer_tokens: int
    tokens_per_s: float                # over the last few tokens
    avg_tokens_per_s: float            # this answer's decode
    ttft_s: float                      # from the answer's start to its first token event reaching the caller
    prefill_s: float
    decode_s: float
    prefill_tokens: int
    copy_bandwidth: float              # bytes/s moved host->device over this answer's wall time
    generating: bool
    routing: tuple[tuple[tuple[int, ...], ...], ...]  # last answer: token -> layer -> experts
    memory: MemoryReading

    def to_dict(self) -> dict:
        d = asdict(self)
        d["num_layers"] = self.num_moe_layers     # the JSON's original name for it, kept for API clients
        return d


def _rate(h: int, m: int) -> float:
    return h / (h + m) if h + m else 0.0


class Stats:
    """Mutable counters owned by the engine; one instance per loaded model."""

    def __init__(self, num_moe_layers: int, num_experts: int, top_k: int, cache_sizes: tuple[int, ...],
                 policy: str = "lru", placement: str = "inclusive") -> None:
        self.num_moe_layers, self.num_experts, self.top_k = num_moe_layers, num_experts, top_k
        self._lock = threading.Lock()
        self.configure(cache_sizes, policy, placement)
        self.hits = self.misses = self.evictions = 0
        self.bytes_h2d = self.bytes_d2h = self.bytes_disk = 0
        self.prefetch_issued = self.prefetch_used = self.prefetch_wasted = 0
        self.layer_hits = [0] * num_moe_layers
        self.layer_misses = [0] * num_moe_layers
        self.tokens_total = 0
        self.seq = 0
        self._history: deque = deque(maxlen=HISTORY_TOKENS)   # (hits, misses) per token
        self._token_times: deque = deque(maxlen=16)
        self._new_token_buffers()
        self._reset_answer()
        self._mark_start, self._mark_prefill = self._counters(), None

    # ---- configuration ------------------------------------------------------------------------
    def configure(self, cache_sizes: tuple[int, ...], policy: str, placement: str) -> None:
        with self._lock:
            self.cache_sizes = tuple(cache_sizes)
            self.policy, self.placement = policy, placement
            self.resident = [[-1] * k for k in self.cache_sizes]

    def _new_token_buffers(self) -> None:
        n = self.num_moe_layers
        self._tok_hits = [[] for _ in range(n)]
        self._tok_misses = [[] for _ in range(n)]
        self._tok_prefetched = [[] for _ in range(n)]
        self._tok_evicted = [[] for _ in range(n)]
        self._tok_routing = [()] * n
        self._tok_weights = [()] * n
        self._tok_h = self._tok_m = 0

    def _reset_answer(self) -> None:
        self.answer_hits = self.answer_misses = 0
        self.answer_tokens = 0
        self.answer_bytes_h2d = 0
        self.answer_start = self.first_token_at = self.last_token_at = 0.0
        self.first_sent_at = 0.0
        self.prefill_s = 0.0
        self.prefill_tokens = 0
        self.routing: list = []            # this answer: token -> layer -> experts (by routing rank)
        self.routing_weights: list = []    # the same shape: each expert's routing weight
        self.prefill_routing: list = []    # this answer's prefilled tokens: route_log segments, in order
        self._prefill_chunks: list = []    # while prefilling: per chunk, per layer, [T, k] expert ids
        self._prefill_chunk: Optional[list] = None
        self.generating = False
        self.last_token = tuple(LayerEvents() for _ in range(self.num_moe_layers))

    # ---- cache events (called by ExpertCache) -------------------------------------------------
    def on_hit(self, layer: int, expert: int) -> None:
        self.hits += 1
        self.layer_hits[layer] += 1
        self._tok_h += 1
        self._tok_hits[layer].append(expert)

    def on_miss(self, layer: int, expert: int, nbytes: int) -> None:
        self.misses += 1
        self.layer_misses[layer] += 1
        self._tok_m += 1
        self.bytes_h2d += nbytes
        self.answer_bytes_h2d += nbytes
        self._tok_misses[layer].append(expert)

    def on_evict(self, layer: int, expert: int, nbytes_written_back: int = 0) -> None:
        self.evictions += 1
        self.bytes_d2h += nbytes_written_back
        self._tok_evicted[layer].append(expert)

    def on_disk_read(self, nbytes: int) -> None:
        self.bytes_disk += nbytes

    def on_prefetch(self, layer: int, expert: int, nbytes: int) -> None:
        self.prefetch_issued += 1
        self.bytes_h2d += nbytes
        self.answer_bytes_h2d += nbytes
        self._tok_prefetched[layer].append(expert)

    def on_prefetch_used(self, layer: int, expert: int) -> None:
        self.prefetch_used += 1

    def on_prefetch_wasted(self, layer: int, expert: int) -> None:
        self.prefetch_wasted += 1

    def on_slot(self, layer: int, slot: int, expert: int) -> None:
        self.resident[layer][slot] = expert

    def on_prefill_route(self, layer: int, experts) -> None:
        """A prefill chunk's routing for one layer, ``experts`` [T, k] as the router left it (kept, not read:
        the host reads it only if someone asks for the prompt's routing). Layers arrive in order, chunk by chunk."""
        chunk = self._prefill_chunk
        if not chunk or len(chunk) == self.num_moe_layers:
            chunk = self._prefill_chunk = []
            self._prefill_chunks.append(chunk)
        chunk.append(experts)

    def on_route(self, layer: int, experts: tuple[int, ...], weights: tuple[float, ...] = ()) -> None:
        """A decode step's routing for one layer: the model's one home for it (ids and weights arrive in
        the same host transfer, so recording them costs nothing)."""
        self._tok_routing[layer] = experts
        self._tok_weights[layer] = weights

    # ---- generate-loop events -----------------------------------------------------------------
    def _counters(self) -> tuple[int, ...]:
        return (self.hits, self.misses, self.evictions, self.bytes_h2d, self.bytes_d2h, self.bytes_disk,
                self.prefetch_issued, self.prefetch_used, self.prefetch_wasted)

    def answer_counters(self) -> dict[str, dict[str, int]]:
        """This answer's counters, split into its prefill and its decode (one look-up per token and layer
        and chosen expert while decoding; one per distinct expert and layer in prefill)."""
        names = ("hits", "misses", "evictions", "bytes_h2d", "bytes_d2h", "bytes_disk",
                 "prefetch_issued", "prefetch_used", "prefetch_wasted")
        with self._lock:
            now = self._counters()
            a, b = self._mark_start, self._mark_prefill or now
        return {"prefill": dict(zip(names, (y - x for x, y in zip(a, b)))),
                "decode": dict(zip(names, (y - x for x, y in zip(b, now))))}

    def begin_answer(self) -> None:
        with self._lock:
            self._reset_answer()
            self._mark_start, self._mark_prefill = self._counters(), None
            self.answer_start = time.perf_counter()
            self.generating = True
            self._new_token_buffers()

    def end_prefill(self, num_tokens: int) -> None:
        """Prefill's look-ups count in the totals but not in the per-token history."""
        with self._lock:
            self.prefill_s = time.perf_counter() - self.answer_start
            self.prefill_tokens = num_tokens
            self._mark_prefill = self._counters()
            self._keep_prefill_routing()
            self.answer_hits += self._tok_h
            self.answer_misses += self._tok_m
            self._publish_token_events()
            self._new_token_buffers()

    def _keep_prefill_routing(self) -> None:
        # A one-token chunk (a prompt of one new token, or a chunked prompt's last token) ran the decode path:
        # its routing is this step's, recorded by on_route.
        single = [Segment((tuple(self._tok_routing),))] if all(self._tok_routing) and self.num_moe_layers else []
        self.prefill_routing = [Segment(chunk=c) for c in self._prefill_chunks] + single
        self._prefill_chunks, self._prefill_chunk = [], None

    def first_token_sent(self) -> None:
        """The answer's first token event is being handed to the caller: time to first token ends here."""
        with self._lock:
            self.first_sent_at = time.perf_counter()

    def end_token(self) -> None:
        now = time.perf_counter()
        with self._lock:
            h, m = self._tok_h, self._tok_m
            self.answer_hits += h
            self.answer_misses += m
            self._history.append((h, m))
            self._token_times.append(now)
            if self.answer_tokens == 0:
                self.first_token_at = now
            self.last_token_at = now
            self.answer_tokens += 1
            self.tokens_total += 1
            self.routing.append(tuple(self._tok_routing))
            self.routing_weights.append(tuple(self._tok_weights))
            self._publish_token_events()
            self.seq += 1
            self._new_token_buffers()

    def end_answer(self) -> None:
        with self._lock:
            self.generating = False
            self.seq += 1

    def _publish_token_events(self) -> None:
        self.last_token = tuple(
            LayerEvents(tuple(self._tok_hits[i]), tuple(self._tok_misses[i]),
                        tuple(self._tok_prefetched[i]), tuple(self._tok_evicted[i]))
            for i in range(self.num_moe_layers))

    # ---- read side ----------------------------------------------------------------------------
    def answer_routing(self) -> tuple[list, list]:
        """(experts, weights) of this (or the last) answer's decoded tokens: token -> layer -> tuple."""
        with self._lock:
            return list(self.routing), list(self.routing_weights)

    def answer_route_segments(self) -> list:
        """This answer's routing by position: its prefilled tokens, then its decoded ones (route_log segments)."""
        with self._lock:
            return list(self.prefill_routing) + [Segment(tuple(self.routing))]

    def snapshot(self, memory: MemoryReading) -> StatsSnapshot:
        with self._lock:
            hist = list(self._history)
            recent = hist[-ROLLING_TOKENS:]
            rh, rm = sum(h for h, _ in recent), sum(m for _, m in recent)
            times = list(self._token_times)
            current = (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 and times[-1] > times[0] else 0.0
            decode_s = (self.last_token_at - self.first_token_at) if self.answer_tokens > 1 else 0.0
            avg = (self.answer_tokens - 1) / decode_s if decode_s > 0 else 0.0
            wall = (self.last_token_at or time.perf_counter()) - self.answer_start if self.answer_start else 0.0
            return StatsSnapshot(
                seq=self.seq, num_moe_layers=self.num_moe_layers, num_experts=self.num_experts, top_k=self.top_k,
                cache_sizes=self.cache_sizes, policy=self.policy, placement=self.placement,
                resident=tuple(tuple(r) for r in self.resident), last_token=self.last_token,
                hits=self.hits, misses=self.misses, evictions=self.evictions,
                bytes_h2d=self.bytes_h2d, bytes_d2h=self.bytes_d2h, bytes_disk=self.bytes_disk,
                prefetch_issued=self.prefetch_issued, prefetch_used=self.prefetch_used,
                prefetch_wasted=self.prefetch_wasted,
                layer_hits=tuple(self.layer_hits), layer_misses=tuple(self.layer_misses),
                hit_rate=_rate(self.hits, self.misses),
                answer_hit_rate=_rate(self.answer_hits, self.answer_misses),
                rolling_hit_rate=_rate(rh, rm),
                hit_rate_history=tuple(_rate(h, m) for h, m in hist),
                tokens_total=self.tokens_total, answer_tokens=self.answer_tokens,
                tokens_per_s=current, avg_tokens_per_s=avg,
                ttft_s=(self.first_sent_at - self.answer_start) if self.first_sent_at else 0.0,
                prefill_s=self.prefill_s, decode_s=decode_s, prefill_tokens=self.prefill_tokens,
                copy_bandwidth=self.answer_bytes_h2d / wall if wall > 0 else 0.0,
                generating=self.generating, routing=tuple(self.routing), memory=memory,
            )
