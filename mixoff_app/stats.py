"""Counters of the expert cache and the step loop, and the immutable snapshot the UI reads.

Counters are bumped where each event happens (cache fetch, eviction, copy, step end) with plain Python ints:
the cache decision is made on the host anyway, so counting costs no device sync. ``snapshot()`` copies them
under a lock; the UI polls it on a timer and never touches tensors.

The cache's counters are the server's (every answer shares the cache). What belongs to one answer - its
routing, timings and own look-ups - lives in that answer's ``AnswerStats``; a snapshot shows the latest answer,
or a given session's latest, beside the cache. A decode step may carry several answers (continuous batching):
the model reports each row's routing, and ``end_step`` hands each row to its answer.
"""
from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import asdict, dataclass, replace
from typing import Optional

from .answer_stats import COUNTER_NAMES, AnswerStats
from .route_log import Segment

ROLLING_TOKENS = 64
HISTORY_TOKENS = 512
MAX_SESSIONS = 256      # sessions whose latest answer stays readable (each is small: its routing)


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
    cpu: tuple[int, ...] = ()          # missed, and run on the CPU from the host copy instead of loaded


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
    generating: bool                   # some answer is running
    routing: tuple[tuple[tuple[int, ...], ...], ...]  # that answer: token -> layer -> experts
    memory: MemoryReading
    batch_rows: int = 0                # sequences in the latest decode step (continuous batching)
    running_answers: int = 0           # answers holding a KV slot now (reading their prompt or generating)
    waiting_answers: int = 0           # answers waiting for a free slot
    max_batch: int = 1                 # how many answers may run at once
    cpu_experts: int = 0               # decode misses run on the CPU from their host copy (counted in misses too)
    cpu_experts_mode: str = "off"      # what --cpu-experts resolved to: off | all | cost

    def without_answer(self) -> "StatsSnapshot":
        """The cache and server as they are, without the latest answer's figures (for someone it was not for)."""
        return replace(self, answer_hit_rate=0.0, answer_tokens=0, avg_tokens_per_s=0.0, ttft_s=0.0, prefill_s=0.0,
                       decode_s=0.0, prefill_tokens=0, copy_bandwidth=0.0, routing=())

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
        self.cpu_experts = 0
        self.cpu_experts_mode = "off"
        self.layer_hits = [0] * num_moe_layers
        self.layer_misses = [0] * num_moe_layers
        self.tokens_total = 0
        self.seq = 0
        self._history: deque = deque(maxlen=HISTORY_TOKENS)   # (hits, misses) per decode step
        self._step_times: deque = deque(maxlen=16)             # (time, tokens) of the latest decode steps
        self.last_token = tuple(LayerEvents() for _ in range(num_moe_layers))
        self.latest: Optional[AnswerStats] = None              # the answer begun last
        self._by_session: dict[Optional[str], AnswerStats] = {}   # each session's latest answer
        self.batch_rows = self.running = self.waiting = 0
        self.max_batch = 1
        self._prefill_route: list = []                         # the running prefill chunk's routing, per layer
        self._new_token_buffers(1)
        self._step_mark = self.counters()

    # ---- configuration ------------------------------------------------------------------------
    def configure(self, cache_sizes: tuple[int, ...], policy: str, placement: str) -> None:
        with self._lock:
            self.cache_sizes = tuple(cache_sizes)
            self.policy, self.placement = policy, placement
            self.resident = [[-1] * k for k in self.cache_sizes]

    def _new_token_buffers(self, rows: int) -> None:
        n = self.num_moe_layers
        self._tok_hits = [[] for _ in range(n)]
        self._tok_misses = [[] for _ in range(n)]
        self._tok_prefetched = [[] for _ in range(n)]
        self._tok_evicted = [[] for _ in range(n)]
        self._tok_cpu = [[] for _ in range(n)]
        self._tok_h = self._tok_m = 0
        # Per decode row: the routing, weights and own hits/misses of each expert layer.
        self._row_routing = [[()] * n for _ in range(rows)]
        self._row_weights = [[()] * n for _ in range(rows)]
        self._row_hm = [[0, 0] for _ in range(rows)]

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
        self._tok_misses[layer].append(expert)

    def on_cpu_expert(self, layer: int, expert: int) -> None:
        """A miss run on the CPU from the host copy: a look-up that missed, with nothing copied or evicted."""
        self.misses += 1
        self.layer_misses[layer] += 1
        self._tok_m += 1
        self.cpu_experts += 1
        self._tok_cpu[layer].append(expert)

    def on_evict(self, layer: int, expert: int, nbytes_written_back: int = 0) -> None:
        self.evictions += 1
        self.bytes_d2h += nbytes_written_back
        self._tok_evicted[layer].append(expert)

    def on_disk_read(self, nbytes: int) -> None:
        self.bytes_disk += nbytes

    def on_prefetch(self, layer: int, expert: int, nbytes: int) -> None:
        self.prefetch_issued += 1
        self.bytes_h2d += nbytes
        self._tok_prefetched[layer].append(expert)

    def on_prefetch_used(self, layer: int, expert: int) -> None:
        self.prefetch_used += 1

    def on_prefetch_wasted(self, layer: int, expert: int) -> None:
        self.prefetch_wasted += 1

    def on_slot(self, layer: int, slot: int, expert: int) -> None:
        self.resident[layer][slot] = expert

    def on_route(self, layer: int, experts: tuple[int, ...], weights: tuple[float, ...] = (), row: int = 0,
                 hits: Optional[int] = None) -> None:
        """A decode step's routing for one layer and row: the model's one home for it (ids and weights arrive in
        the same host transfer, so recording them costs nothing). ``hits``: how many of the row's experts were
        resident when the step fetched them (None: counted by the cache for a one-row step)."""
        if row >= len(self._row_routing):                     # a step of more rows than announced
            n = self.num_moe_layers
            self._row_routing += [[()] * n for _ in range(row + 1 - len(self._row_routing))]
            self._row_weights += [[()] * n for _ in range(row + 1 - len(self._row_weights))]
            self._row_hm += [[0, 0] for _ in range(row + 1 - len(self._row_hm))]
        self._row_routing[row][layer] = experts
        self._row_weights[row][layer] = weights
        if hits is not None:
            self._row_hm[row][0] += hits
            self._row_hm[row][1] += len(experts) - hits

    def on_prefill_route(self, layer: int, experts) -> None:
        """A prefill chunk's routing for one layer, ``experts`` [T, k] as the router left it (kept, not read:
        the host reads it only if someone asks for the prompt's routing). Layers arrive in order."""
        self._prefill_route.append(experts)

    def begin_prefill_chunk(self) -> None:
        self._prefill_route = []
        self._row_routing[0] = [()] * self.num_moe_layers

    def take_prefill_route(self, tokens: int) -> Optional[Segment]:
        """The routing of the prefill chunk of ``tokens`` tokens that just ran (None: not recorded whole). A
        one-token chunk runs the decode path: its routing is row 0 of that one-row step."""
        chunk, self._prefill_route = self._prefill_route, []
        if tokens > 1:
            return Segment(chunk=chunk) if len(chunk) == self.num_moe_layers and self.num_moe_layers else None
        row = self._row_routing[0] if self._row_routing else ()
        return Segment((tuple(row),)) if row and all(row) else None

    # ---- answers (called by the step loop) ------------------------------------------------------
    def counters(self) -> tuple[int, ...]:
        """The cache's counters in ``answer_stats.COUNTER_NAMES`` order (deltas of two readings are an answer's)."""
        return (self.hits, self.misses, self.evictions, self.bytes_h2d, self.bytes_d2h, self.bytes_disk,
                self.prefetch_issued, self.prefetch_used, self.prefetch_wasted, self.cpu_experts)

    _counters = counters

    def begin_answer(self, session: Optional[str] = None, queued_s: float = 0.0) -> AnswerStats:
        a = AnswerStats(session=session, queued_s=queued_s, started_at=time.perf_counter())
        a.mark = self.counters()
        with self._lock:
            self.latest = self._by_session[session] = a
            if len(self._by_session) > MAX_SESSIONS:          # forget the oldest sessions' answers
                for key in list(self._by_session)[:len(self._by_session) - MAX_SESSIONS]:
                    del self._by_session[key]
            self.seq += 1
        return a

    def end_prefill(self, num_tokens: int, answer: Optional[AnswerStats] = None,
                    before: Optional[tuple[int, ...]] = None) -> None:
        """The answer's prompt is in its KV slot: its prefill look-ups are the latest token's view on the panel,
        but not a point of the per-token history. ``before``: the counters when its (last) chunk began, whose
        deltas are added to its prefill (the step loop adds each earlier chunk's itself); None: since it began."""
        a = answer or self.latest
        self._step_mark = self.counters()
        a.add("prefill", a.mark if before is None else before, self._step_mark)
        with self._lock:
            a.prefill_s = time.perf_counter() - a.started_at
            a.prefill_tokens = num_tokens
            self._publish_token_events()
            self._new_token_buffers(1)

    def first_token_sent(self, answer: Optional[AnswerStats] = None) -> None:
        """The answer's first token event is being handed to the caller: time to first token ends here."""
        a = answer or self.latest
        if a is not None and not a.first_sent_at:
            a.first_sent_at = time.perf_counter()

    def begin_step(self, rows: int) -> tuple[int, ...]:
        """A decode step of ``rows`` answers starts; returns the counters to hand to ``end_step``."""
        self._new_token_buffers(rows)
        self._step_mark = self.counters()
        return self._step_mark

    def end_step(self, answers: list[AnswerStats], before: Optional[tuple[int, ...]] = None) -> None:
        """The step fed one token of each answer (row b is ``answers[b]``): each gets its row's routing and own
        look-ups, and the cache's other counters of the step (shared by its rows)."""
        now, after = time.perf_counter(), self.counters()
        before = before if before is not None else self._step_mark      # by default: since the last step ended
        self._step_mark = after
        with self._lock:
            h, m = self._tok_h, self._tok_m
            self._history.append((h, m))
            self._step_times.append((now, len(answers)))
            self.tokens_total += len(answers)
            for b, a in enumerate(answers):
                for name, x, y in zip(COUNTER_NAMES[2:], before[2:], after[2:]):   # the step's, shared by its rows
                    a.decode[name] += y - x
                own = (h, m) if len(answers) == 1 else self._row_hm[b]     # look-ups: each row its own
                a.decode["hits"] += own[0]
                a.decode["misses"] += own[1]
                if a.tokens == 0:
                    a.first_token_at = now
                a.last_token_at = now
                a.tokens += 1
                a.routing.append(tuple(self._row_routing[b]) if b < len(self._row_routing) else ())
                a.routing_weights.append(tuple(self._row_weights[b]) if b < len(self._row_weights) else ())
            self.batch_rows = len(answers)
            self._publish_token_events()
            self.seq += 1
            self._new_token_buffers(len(answers))

    def end_token(self, answer: Optional[AnswerStats] = None, before: Optional[tuple[int, ...]] = None) -> None:
        """A one-row step of ``answer`` (by default the latest) ended."""
        self.end_step([answer or self.latest or self.begin_answer()], before)

    def end_answer(self, answer: Optional[AnswerStats] = None) -> None:
        a = answer or self.latest
        with self._lock:
            if a is not None:
                a.generating = False
            self.seq += 1

    def set_load(self, running: int, waiting: int, max_batch: int) -> None:
        """How many answers hold a slot and how many wait for one (the step loop says, as they change)."""
        with self._lock:
            self.running, self.waiting, self.max_batch = running, waiting, max_batch
            self.seq += 1

    def _publish_token_events(self) -> None:
        self.last_token = tuple(
            LayerEvents(tuple(self._tok_hits[i]), tuple(self._tok_misses[i]),
                        tuple(self._tok_prefetched[i]), tuple(self._tok_evicted[i]), tuple(self._tok_cpu[i]))
            for i in range(self.num_moe_layers))

    # ---- read side ----------------------------------------------------------------------------
    def answer(self, session: object = ...) -> Optional[AnswerStats]:
        """The latest answer (of ``session``, when given: None when that session has none)."""
        with self._lock:
            return self.latest if session is ... else self._by_session.get(session)

    def answer_counters(self, session: object = ...) -> dict[str, dict[str, int]]:
        """The latest answer's counters, split into its prefill and its decode."""
        a = self.answer(session)
        return {"prefill": dict(a.prefill), "decode": dict(a.decode)} if a is not None else \
            {"prefill": {}, "decode": {}}

    def answer_routing(self, session: object = ...) -> tuple[list, list]:
        """(experts, weights) of the latest answer's decoded tokens: token -> layer -> tuple."""
        a = self.answer(session)
        return (list(a.routing), list(a.routing_weights)) if a is not None else ([], [])

    def snapshot(self, memory: MemoryReading, session: object = ...) -> StatsSnapshot:
        """The cache and server as they are, with the latest answer's figures (``session``: that session's
        latest answer; none of its own: those figures are empty)."""
        a = self.answer(session) or AnswerStats(generating=False)
        with self._lock:
            hist = list(self._history)
            recent = hist[-ROLLING_TOKENS:]
            rh, rm = sum(h for h, _ in recent), sum(m for _, m in recent)
            steps = list(self._step_times)
            span = steps[-1][0] - steps[0][0] if len(steps) > 1 else 0.0
            current = sum(n for _, n in steps[1:]) / span if span > 0 else 0.0
            wall = (a.last_token_at or time.perf_counter()) - a.started_at if a.prefill_tokens else 0.0
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
                answer_hit_rate=a.hit_rate,
                rolling_hit_rate=_rate(rh, rm),
                hit_rate_history=tuple(_rate(h, m) for h, m in hist),
                tokens_total=self.tokens_total, answer_tokens=a.tokens,
                tokens_per_s=current, avg_tokens_per_s=a.tokens_per_s,
                ttft_s=a.ttft_s, prefill_s=a.prefill_s, decode_s=a.decode_s, prefill_tokens=a.prefill_tokens,
                copy_bandwidth=a.bytes_h2d / wall if wall > 0 else 0.0,
                generating=self.running > 0 or a.generating, routing=tuple(a.routing), memory=memory,
                batch_rows=self.batch_rows, running_answers=self.running, waiting_answers=self.waiting,
                max_batch=self.max_batch, cpu_experts=self.cpu_experts, cpu_experts_mode=self.cpu_experts_mode,
            )
