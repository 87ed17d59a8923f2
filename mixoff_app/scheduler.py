"""Continuous batching: answers join the running batch at the next step and leave it the moment they end.

One thread, the step loop, owns the model. Each turn of the loop it

1. admits waiting answers into free KV slots, first come first served, except that one client (an API key, a
   browser session) holds at most ``per_client`` slots while others wait;
2. runs one prefill chunk of the earliest admitted answer still reading its prompt (so a newcomer's prompt
   delays the others by one chunk per turn, never by its whole length);
3. runs one decode step for every answer that is generating: one token each, each expert fetched once for all
   the rows routed to it (``MoEModel.decode``), each row bit for bit what it would be alone.

A caller reads its answer's events from a queue. Stop, a closed stream or a client gone sets the answer's
cancel event; it leaves at the next step and its slot is free. Beyond ``max_waiting`` answers waiting for a
slot, a new one is refused at once (``Busy``) rather than queued without bound.

A slot keeps the tokens whose K/V it holds, and whose session put them there: a session's next turn goes to
its own slot when that is free and prefills only what is new (never another session's tokens: no conversation
serves, or times, another's).
"""
from __future__ import annotations

import atexit
import contextlib
import queue
import threading
import time
import weakref
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, ContextManager, Iterator, Optional

import torch

from .config import SamplingParams
from .events import TokenEvent
from .generate import TextStream, sample
from .limits import Busy
from .model import MoEModel
from .route_log import RouteLog, Segment
from .stats import Stats

IDLE_S = 2.0          # an idle step loop ends its thread (the next answer starts another)
_RUNNING: "weakref.WeakSet[Scheduler]" = weakref.WeakSet()


@atexit.register
def _stop_loops() -> None:
    """At exit, each step loop ends between two steps before the interpreter goes: a thread still inside torch
    while it is torn down aborts the process."""
    for s in list(_RUNNING):
        s.close()


@dataclass
class Slot:
    """One sequence's KV cache: the tokens whose K/V it holds from position 0, the prefill chunks [a, b) that
    computed them, their routing (aligned with ``ids`` when it could be kept whole), and the session whose answer
    put them there."""
    owner: Optional[str] = None
    ids: list[int] = field(default_factory=list)
    chunks: list[tuple[int, int]] = field(default_factory=list)
    routes: RouteLog = field(default_factory=RouteLog)
    used_at: float = 0.0
    busy: bool = False


class Answer:
    """One request in the step loop, from the line to its last event."""

    def __init__(self, ids: list[int], params: SamplingParams, cancel: Optional[threading.Event],
                 session: Optional[str], client: Optional[str], notices: list[str], eos_ids: set[int],
                 tokenizer) -> None:
        self.ids, self.params, self.session = ids, params, session
        self.client = client if client is not None else session
        self.cancel = cancel if cancel is not None else threading.Event()
        self.events: queue.Queue = queue.Queue()
        self.eos_ids, self.tokenizer = eos_ids, tokenizer
        self.submitted = time.perf_counter()
        self.slot = -1
        self.stats = None                 # AnswerStats, from admission
        self.phase = "waiting"            # waiting -> prefill -> decode -> done
        self.start = self.pos = 0         # prompt tokens already in the slot; the next position to feed
        self.pending: Optional[int] = None    # sampled, not yet fed
        self.finish_after: Optional[str] = None
        self.sampled = 0
        self.stream = TextStream(tokenizer, params.stop)
        self.gen: Optional[torch.Generator] = None
        self.t0 = 0.0
        for n in notices:
            self.put(TokenEvent("notice", n))

    def put(self, ev: object) -> None:
        self.events.put(ev)

    def read(self, stats: Stats) -> Iterator[TokenEvent]:
        """The caller's side: events as the step loop makes them. Stopping early (Stop, a client gone, an
        exception) cancels the answer, which leaves the batch at the next step."""
        try:
            while True:
                ev = self.events.get()
                if isinstance(ev, BaseException):
                    raise ev
                if ev.kind == "token" and self.stats is not None:
                    stats.first_token_sent(self.stats)
                yield ev
                if ev.kind == "done":
                    return
        finally:
            self.cancel.set()


class Scheduler:
    def __init__(self, model: MoEModel, stats: Stats, max_batch: int, per_client: Optional[int] = None,
                 max_waiting: int = 16) -> None:
        if max_batch < 1 or max_batch > model.kv_slots:
            raise ValueError(f"max_batch {max_batch} must be within 1..{model.kv_slots} (the model's KV slots)")
        self.model, self.stats = model, stats
        self.max_batch = max_batch
        self.per_client = per_client or max(1, (max_batch + 1) // 2)
        self.max_waiting = max_waiting
        self.slots = [Slot() for _ in range(model.kv_slots)]
        self.waiting: deque[Answer] = deque()
        self.active: list[Answer] = []
        self.step_lock = threading.Lock()       # held while the model runs; cache re-plans take it between steps
        self.step_context: Callable[[], ContextManager] = contextlib.nullcontext   # around each step (benchmarks)
        self._cv = threading.Condition()
        self._thread: Optional[threading.Thread] = None
        self._closed = False
        stats.set_load(0, 0, max_batch)

    # ---- the callers' side ----------------------------------------------------------------------
    def submit(self, answer: Answer) -> Iterator[TokenEvent]:
        """Queue the answer (``Busy`` when the line is full) and return its events."""
        with self._cv:
            # Those the loop has not admitted yet but will at its next turn (free slots) are not waiting.
            if len(self.waiting) - max(0, self.max_batch - len(self.active)) >= self.max_waiting:
                raise Busy(f"the server is busy: {len(self.active)} answers are running and {len(self.waiting)} "
                           f"are waiting; try again in a moment")
            mine = sum(a.client == answer.client for a in (*self.active, *self.waiting))
            if len(self.active) + len(self.waiting) >= self.max_batch or mine >= self.per_client:
                answer.put(TokenEvent("waiting", f"{len(self.active)} answers are running; this one starts when "
                                                 f"one of them ends ({len(self.waiting)} waiting before it)"))
            if self._closed:
                raise Busy("the server is shutting down")
            self.waiting.append(answer)
            self._publish_load()
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="mixoff-steps", daemon=True)
                self._thread.start()
                _RUNNING.add(self)
            self._cv.notify_all()
        return answer.read(self.stats)

    def close(self, timeout: float = 30.0) -> None:
        """End the step loop after its current step (answers still running get no more tokens)."""
        with self._cv:
            self._closed = True
            thread = self._thread
            self._cv.notify_all()
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def load(self) -> tuple[int, int]:
        """(answers holding a slot, answers waiting for one)."""
        with self._cv:
            return len(self.active), len(self.waiting)

    def forget(self) -> None:
        """Every slot forgets its tokens (the next answers prefill their whole prompts); waits for the current step."""
        with self.step_lock:
            for s in self.slots:
                if not s.busy:
                    s.ids, s.chunks, s.owner = [], [], None
                    s.routes.keep(0)

    def _publish_load(self) -> None:
        self.stats.set_load(len(self.active), len(self.waiting), self.max_batch)

    # ---- the step loop ------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self.waiting and not self.active and not self._closed:
                    if not self._cv.wait(IDLE_S) and not self.waiting and not self.active:
                        self._thread = None      # idle: end; submit starts another (and the engine can be freed)
                        return
                if self._closed:
                    self._thread = None
                    return
                self._admit()
            with self.step_lock, self.step_context():
                self._prefill_one()
                self._decode_all()
            with self._cv:
                self._publish_load()

    def _admit(self) -> None:
        """Waiting answers into free slots, in arrival order; a client at its cap waits, the others go on."""
        held: dict[Optional[str], int] = {}
        for a in self.active:
            held[a.client] = held.get(a.client, 0) + 1
        for a in list(self.waiting):
            if a.cancel.is_set():            # stopped while it waited: nothing was computed
                self.waiting.remove(a)
                a.put(TokenEvent("done", "", None, 0, 0.0, finish_reason="cancelled", prompt_tokens=len(a.ids)))
                continue
            if len(self.active) >= self.max_batch:
                break
            if held.get(a.client, 0) >= self.per_client:
                continue
            slot = self._slot_for(a)
            if slot is None:
                break
            self.waiting.remove(a)
            held[a.client] = held.get(a.client, 0) + 1
            self._start(a, slot)
        self._publish_load()

    def _slot_for(self, a: Answer) -> Optional[int]:
        """The free slot sharing the longest prefix with this session's new prompt, else an empty one, else the
        least recently used (whose tokens another session's next turn is then the least likely to want)."""
        free = [i for i, s in enumerate(self.slots) if not s.busy]
        if not free:
            return None
        def shared(i: int) -> int:
            s = self.slots[i]
            if s.owner != a.session or not s.ids:
                return -1
            n = 0
            for x, y in zip(s.ids, a.ids):
                if x != y:
                    break
                n += 1
            return n
        return max(free, key=lambda i: (shared(i), not self.slots[i].ids, -self.slots[i].used_at))

    def _start(self, a: Answer, i: int) -> None:
        s = self.slots[i]
        if s.owner != a.session:
            s.ids, s.chunks = [], []          # another conversation's tokens: never reused, whatever they hold
        start, n = 0, min(len(a.ids) - 1, len(s.ids))     # at least one token is prefilled, for its logits
        while start < n and s.ids[start] == a.ids[start]:
            start += 1
        # Reuse stops at the start of the prefill chunk the shared prefix ends in, so the tokens after it go
        # through the same chunk as before: a retried prompt's logits are then bit for bit those of its first
        # answer (one token re-run alone and the same token inside a chunk differ in the last bits, enough to
        # flip a near-tied greedy choice). Decoded tokens were each their own step: reuse ends anywhere there.
        start = next((c0 for c0, c1 in s.chunks if c0 < start < c1), start)
        c = self.model.prefill_chunk
        s.ids = s.ids[:start]
        s.routes.keep(start)
        s.chunks = [(c0, c1) for c0, c1 in s.chunks if c1 <= start] + \
            [(c0, min(c0 + c, len(a.ids))) for c0 in range(start, len(a.ids), c)]
        s.owner, s.busy, s.used_at = a.session, True, time.perf_counter()
        a.slot, a.start, a.pos, a.phase = i, start, start, "prefill"
        a.t0 = time.perf_counter()
        a.stats = self.stats.begin_answer(a.session, queued_s=a.t0 - a.submitted)
        # Shorter than start only when an earlier answer's routing could not be lined up: no prompt routing then.
        a.stats.prompt_prefix = s.routes.segments() if len(s.routes) == start else None
        if not a.params.is_greedy:
            a.gen = torch.Generator(device=self.model.device)
            a.gen.manual_seed(a.params.seed if a.params.seed is not None else int(time.time_ns() % (1 << 62)))
        self.active.append(a)

    def _prefill_one(self) -> None:
        a = next((x for x in self.active if x.phase == "prefill"), None)
        if a is None:
            return
        s, m = self.slots[a.slot], self.model
        end = min(a.pos + m.prefill_chunk, len(a.ids))
        before = self.stats.counters()
        self.stats.begin_prefill_chunk()
        logits = self._run([a], lambda: m.forward(torch.tensor(a.ids[a.pos:end], dtype=torch.long, device=m.device),
                                                  pos=a.pos, seq=a.slot))
        if logits is None:
            return
        a.stats.prefill_routing.append(self.stats.take_prefill_route(end - a.pos))
        s.ids.extend(a.ids[a.pos:end])
        a.pos = end
        if end < len(a.ids):
            a.stats.add("prefill", before, self.stats.counters())
            return
        self.stats.end_prefill(len(a.ids) - a.start, a.stats, before)
        a.phase = "decode"
        self._next(a, logits)

    def _decode_all(self) -> None:
        rows = [a for a in self.active if a.phase == "decode"]
        if not rows:
            return
        m = self.model
        ids = torch.tensor([a.pending for a in rows], dtype=torch.long, device=m.device)
        before = self.stats.begin_step(len(rows))
        logits = self._run(rows, lambda: m.decode(ids, [a.pos for a in rows], [a.slot for a in rows]))
        if logits is None:
            return
        self.stats.end_step([a.stats for a in rows], before)
        greedy = [a for a in rows if a.params.is_greedy and a.finish_after is None]
        picks = dict(zip(map(id, greedy), logits[[rows.index(a) for a in greedy]].argmax(-1).tolist())) \
            if greedy else {}         # one host transfer for every greedy row
        for b, a in enumerate(rows):
            self.slots[a.slot].ids.append(a.pending)
            a.pos += 1
            if a.finish_after == "eos":
                a.put(TokenEvent("token", "", a.pending, a.sampled - 1, time.perf_counter() - a.t0))
            a.pending = None
            self._next(a, logits[b:b + 1], picks.get(id(a)))

    def _next(self, a: Answer, logits: torch.Tensor, pick: Optional[int] = None) -> None:
        """After a step fed the answer's latest token: finish, or sample the next one (it is fed next step)."""
        if a.finish_after is not None:
            return self._finish(a, a.finish_after)
        if a.sampled >= a.params.max_new_tokens:
            return self._finish(a, "length")
        if a.cancel.is_set():
            return self._finish(a, "cancelled")
        tok = pick if pick is not None else int(sample(logits, a.params, a.gen).item())
        i, a.sampled = a.sampled, a.sampled + 1
        if tok in a.eos_ids:
            a.finish_after = "eos"        # fed like any token (the next turn's template starts with it), then done
        else:
            delta, stopped = a.stream.push(tok)
            a.put(TokenEvent("token", delta, tok, i, time.perf_counter() - a.t0))
            if stopped:
                a.finish_after = "stop"
        if a.pos >= self.model.max_seq:
            return self._finish(a, "context")
        a.pending = tok

    def _finish(self, a: Answer, reason: str) -> None:
        rest = a.stream.flush() if reason != "stop" else ""
        if rest:
            a.put(TokenEvent("token", rest, None, a.params.max_new_tokens, time.perf_counter() - a.t0))
        self.stats.end_answer(a.stats)
        self._leave(a)
        a.put(TokenEvent("done", "", None, 0, time.perf_counter() - a.t0, finish_reason=reason,
                         prompt_tokens=len(a.ids), answer=a.stats.copy()))

    def _leave(self, a: Answer) -> None:
        """The answer frees its slot; the slot's route log takes its rows (when they line up with its tokens)."""
        a.phase = "done"
        s = self.slots[a.slot]
        s.busy, s.used_at = False, time.perf_counter()
        if a.stats is not None:
            segments = a.stats.prefill_routing + [Segment(tuple(a.stats.routing))]
            s.routes.settle(len(s.ids), [] if None in segments else segments)
        with self._cv:
            self.active.remove(a)
            self._publish_load()

    def _run(self, answers: list[Answer], step) -> Optional[torch.Tensor]:
        """The step's logits; None when it failed, after its answers were ended (the loop goes on)."""
        try:
            return step()
        except torch.OutOfMemoryError:
            pass           # leave the except block first: its traceback would keep the step's tensors alive
        except BaseException as exc:      # noqa: BLE001 - each answer's caller gets it, in its own thread
            self._fail(answers, exc)
            return None
        self._out_of_memory(answers)
        return None

    def _out_of_memory(self, answers: list[Answer]) -> None:
        """The step's answers end with a notice; the device hands its cached blocks back; the others go on.
        Every token in a slot's list went through the model whole, so the next turn may still reuse them."""
        self.model.free_scratch()
        for a in answers:
            context = len(a.ids) if a.phase == "prefill" else a.pos + 1
            a.put(TokenEvent("notice", f"out of GPU memory at {context} tokens of context: "
                                       f"lower --max-context or --cache-size"))
            self.stats.end_answer(a.stats)
            self._leave(a)
            a.put(TokenEvent("done", "", None, 0, time.perf_counter() - a.t0, finish_reason="oom",
                             prompt_tokens=len(a.ids), answer=a.stats.copy()))

    def _fail(self, answers: list[Answer], exc: BaseException) -> None:
        """An unexpected error: each answer of the step gets it (raised in its caller's thread); their slots may
        hold a partial step, so they are not trusted for the next turn."""
        for a in answers:
            s = self.slots[a.slot]
            s.ids, s.chunks, s.owner = [], [], None
            s.routes.keep(0)
            self.stats.end_answer(a.stats)
            self._leave(a)
            a.put(exc)
