"""Per-layer device cache of experts: k slots per layer, allocated once, filled by whole-buffer copies.

On CUDA, copies run on their own stream. Each slot has two events: ``ready`` (recorded on the copy
stream when its copy lands; compute waits on it) and ``done`` (recorded on the compute stream after the
slot's last use; a later copy into the slot waits on it). So resident experts compute while misses are
in flight, and a copy never overwrites weights a queued kernel still reads.

Placements (the store decides): inclusive (the host holds every expert, eviction is free), exclusive
(each expert in one place: a miss swaps the needed expert in and writes the victim back to the host) and
disk (misses are read from the checkpoint file through pinned staging buffers; eviction is free).

Exclusive swap on CUDA. The load (host row -> slot) and the write-back (slot -> host) touch the same slot,
so they must not race, yet running them one after the other would leave one direction of the full-duplex
bus idle. The victim is first snapshotted into one device staging buffer (a device-to-device copy, ~100x
faster than the bus), ordered before the load on the copy stream; the write-back then reads the snapshot
on its own stream while the load overwrites the slot, and both directions move at once. The write-back
goes into a spare host row, never into the row the load is still reading; that row becomes the spare
once the load has read it (an event orders the next write into it).

On the CPU the same code runs with the CPU as "device": slots are separate buffers and copies are
synchronous, so every line of the bookkeeping and its counters is exercised by the CPU tests.
"""
from __future__ import annotations

import weakref
from typing import Iterator, Optional

import torch

from .disk_reader import DiskReader
from .expert_store import ExpertLayout, ExpertStore, ExpertWeights
from .policy import EvictionPolicy, make_policy
from .stats import Stats


def _event(events: dict, key: int) -> "torch.cuda.Event":
    """The event kept for ``key``, made on first use only (setdefault would build one on every call)."""
    ev = events.get(key)
    if ev is None:
        ev = events[key] = torch.cuda.Event()
    return ev


class _Layer:
    __slots__ = ("slots", "weights", "expert_in", "slot_of", "policy", "ready", "done", "prefetched",
                 "leaving")

    def __init__(self, k: int, layout: ExpertLayout, device: torch.device, policy: EvictionPolicy,
                 cuda: bool, slots: Optional[torch.Tensor] = None) -> None:
        self.slots = (slots if slots is not None
                      else torch.empty((k, layout.nbytes), dtype=torch.uint8, device=device))
        self.weights = [layout.weights(self.slots[i]) for i in range(k)]   # views made once
        self.expert_in = [-1] * k            # slot -> expert (-1: empty)
        self.slot_of: dict[int, int] = {}    # expert -> slot
        self.leaving = [-1] * k              # slot -> expert just evicted from it (exclusive write-back)
        self.policy = policy
        self.ready = [torch.cuda.Event() for _ in range(k)] if cuda else None
        self.done = [torch.cuda.Event() for _ in range(k)] if cuda else None
        self.prefetched: set[int] = set()    # resident by prefetch and not yet used


class ExpertCache:
    def __init__(self, store: ExpertStore, sizes: tuple[int, ...], policy: str, device: torch.device,
                 stats: Stats) -> None:
        self.store, self.stats = store, stats
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.copy_stream = torch.cuda.Stream(device=self.device) if self.cuda else None
        self.expert_bytes = store.layout.nbytes
        self.placement = getattr(store, "placement", "inclusive")
        self.exclusive = self.placement == "exclusive"
        self.disk = self.placement == "disk"
        self.policy_name = policy
        self.tick = 0
        if self.exclusive and self.cuda:
            self.d2h_stream = torch.cuda.Stream(device=self.device)
            self._stage: Optional[torch.Tensor] = None     # made on the first swap (none while k = E)
            self._staged, self._stage_free = torch.cuda.Event(), torch.cuda.Event()
            self._row_read: dict[int, torch.cuda.Event] = {}      # host row -> last load that read it
            self._row_written: dict[int, torch.cuda.Event] = {}   # host row -> last write-back into it
        if self.disk:
            self._reader = DiskReader(store.read_into, store.staging, self.device, self.copy_stream)
            weakref.finalize(self, self._reader.close)
        if self.exclusive:
            slots, initial = store.take_slots(self)
            if tuple(s.shape[0] for s in slots) != tuple(sizes):
                raise ValueError(f"the exclusive store was built for sizes {tuple(s.shape[0] for s in slots)}, "
                                 f"not {tuple(sizes)}")
            self._build(sizes, policy, slots, initial)
        else:
            self._build(sizes, policy)

    def _build(self, sizes: tuple[int, ...], policy: str, slots: Optional[list[torch.Tensor]] = None,
               initial: Optional[list[list[int]]] = None) -> None:
        num_experts = self.store.cfg.num_experts
        self.sizes = tuple(sizes)
        self.layers = [_Layer(k, self.store.layout, self.device, make_policy(policy, num_experts), self.cuda,
                              None if slots is None else slots[i])
                       for i, k in enumerate(self.sizes)]
        self.stats.configure(self.sizes, policy, self.placement)
        if initial is not None:          # exclusive: the slots already hold experts
            for i, residents in enumerate(initial):
                L = self.layers[i]
                for s, e in enumerate(residents):
                    L.expert_in[s] = e
                    L.slot_of[e] = s
                    L.policy.on_insert(e, self.tick)
                    self.stats.on_slot(i, s, e)

    def resize(self, sizes: tuple[int, ...], policy: str) -> None:
        """Re-plan: drop every slot and allocate the new ones (the model itself is untouched).

        Exclusive placement moves experts between the tiers, one layer at a time (so the extra memory at
        any moment is one layer's slots): experts that lose their slot go to new host rows, and a larger k
        pulls experts up from the host, whose rows are then freed."""
        if self.disk:
            self._reader.drain()
        if self.cuda:
            torch.cuda.synchronize(self.device)
        self.policy_name = policy
        if not self.exclusive:
            self.layers = []
            if self.cuda:
                torch.cuda.empty_cache()
            self._build(sizes, policy)
            return
        store, E = self.store, self.store.cfg.num_experts
        if len(sizes) != len(self.layers) or not all(1 <= k <= E for k in sizes):
            raise ValueError(f"bad cache sizes {tuple(sizes)}")
        new_slots, initial = [], []
        for i, k in enumerate(sizes):
            L = self.layers[i]
            residents = [e for e in L.expert_in if e >= 0]
            keep, out = residents[:k], residents[k:]
            for e in out:                                   # device -> a new host row
                row = store.take_free()
                store.rows[row].copy_(L.slots[L.slot_of[e]])
                store.home[i][e] = row
            slots = torch.empty((k, self.expert_bytes), dtype=torch.uint8, device=self.device)
            for s, e in enumerate(keep):
                slots[s].copy_(L.slots[L.slot_of[e]])
            up = [e for e in range(E) if store.home[i][e] >= 0][:k - len(keep)]
            for e in up:                                    # host -> device; its row is freed
                row = store.home[i][e]
                slots[len(keep) + up.index(e)].copy_(store.rows[row])
                store.home[i][e] = -1
                store.free.append(row)
            L.slots = L.weights = None                      # drop the old block before the next layer
            new_slots.append(slots)
            initial.append(keep + up)
        if self.cuda:
            torch.cuda.synchronize(self.device)
        store.trim(1)
        self.layers = []
        if self.cuda:
            self._row_read.clear()
            self._row_written.clear()
            torch.cuda.empty_cache()
        self._build(sizes, policy, new_slots, initial)

    @property
    def device_bytes(self) -> int:
        """Bytes of the device slots (plus the exclusive swap's staging buffer on CUDA)."""
        extra = self.expert_bytes if self.exclusive and self.cuda and self._stage is not None else 0
        return sum(k for k in self.sizes) * self.expert_bytes + extra

    def slot_buffer(self, layer: int, expert: int) -> torch.Tensor:
        """The device slot holding ``expert`` (KeyError if it is not resident)."""
        L = self.layers[layer]
        return L.slots[L.slot_of[expert]]

    def next_token(self) -> None:
        self.tick += 1

    def resident(self, layer: int) -> list[int]:
        return list(self.layers[layer].expert_in)

    # ---- the hot path ---------------------------------------------------------------------------
    def fetch(self, layer: int, experts: list[int]) -> Iterator[tuple[int, ExpertWeights, int]]:
        """Yield (expert, weights, slot) for every requested expert: resident ones first, while the
        copies of the missing ones are already in flight. The caller must call ``release(layer, slot)``
        after issuing the compute that reads a slot."""
        L, st, tick = self.layers[layer], self.stats, self.tick
        hits, misses = [], []
        for e in experts:
            s = L.slot_of.get(e)
            if s is None:
                misses.append(e)
            else:
                hits.append((e, s))
                st.on_hit(layer, e)
                L.policy.on_access(e, tick)
                if e in L.prefetched:
                    L.prefetched.discard(e)
                    st.on_prefetch_used(layer, e)
        pending = set(experts)
        # Start every copy that has a slot to go to without displacing an expert this request needs.
        issued = []
        for e in misses:
            s = self._slot_for(layer, pending)
            if s is None:
                break
            self._load(layer, e, s)
            st.on_miss(layer, e, self.expert_bytes)
            issued.append((e, s))
        for e, s in hits:
            pending.discard(e)
            self._settle(L, s)
            if self.cuda:   # a hit may be a prefetch still in flight; waiting on a landed copy is free
                torch.cuda.current_stream(self.device).wait_event(L.ready[s])
            yield e, L.weights[s], s
        for e, s in issued:
            pending.discard(e)
            self._settle(L, s)
            if self.cuda:
                torch.cuda.current_stream(self.device).wait_event(L.ready[s])
            L.policy.on_access(e, tick)
            yield e, L.weights[s], s
        # Fewer slots than experts in flight (k smaller than this request): reuse slots one by one.
        for e in misses[len(issued):]:
            s = self._slot_for(layer, pending)
            self._load(layer, e, s)
            st.on_miss(layer, e, self.expert_bytes)
            pending.discard(e)
            self._settle(L, s)
            if self.cuda:
                torch.cuda.current_stream(self.device).wait_event(L.ready[s])
            L.policy.on_access(e, tick)
            yield e, L.weights[s], s

    def release(self, layer: int, slot: int) -> None:
        """The compute reading ``slot`` has been issued; a later copy into it must wait for it."""
        if self.cuda:
            self.layers[layer].done[slot].record(torch.cuda.current_stream(self.device))

    def prefetch(self, layer: int, experts: list[int], protect: tuple[int, ...] = ()) -> int:
        """Start loading ``experts`` into ``layer`` ahead of need. Only empty slots, or slots whose expert
        is neither guessed nor protected, are used. Returns how many copies were issued."""
        L, n = self.layers[layer], 0
        keep = set(experts) | set(protect)
        for e in experts:
            if e in L.slot_of:
                continue
            s = self._slot_for(layer, keep)
            if s is None:
                break
            self._load(layer, e, s)
            L.prefetched.add(e)
            self.stats.on_prefetch(layer, e, self.expert_bytes)
            n += 1
        return n

    def hint(self, layer: int, experts: list[int]) -> None:
        self.layers[layer].policy.on_hint(experts, self.tick)

    # ---- internals ----------------------------------------------------------------------------
    def _slot_for(self, layer: int, keep: set[int]) -> Optional[int]:
        """An empty slot, else the policy's victim among residents not in ``keep``; None if none."""
        L = self.layers[layer]
        for s, e in enumerate(L.expert_in):
            if e < 0:
                return s
        candidates = [e for e in L.expert_in if e not in keep]
        if not candidates:
            return None
        victim = L.policy.victim(candidates)
        s = L.slot_of.pop(victim)
        L.expert_in[s] = -1
        L.policy.on_remove(victim)
        if victim in L.prefetched:
            L.prefetched.discard(victim)
            self.stats.on_prefetch_wasted(layer, victim)
        L.leaving[s] = victim                  # _load, which always follows, writes it back (exclusive)
        self.stats.on_evict(layer, victim, self.expert_bytes if self.exclusive else 0)
        return s

    def _load(self, layer: int, expert: int, slot: int) -> None:
        L = self.layers[layer]
        victim, L.leaving[slot] = L.leaving[slot], -1
        if self.exclusive:
            self._swap(layer, expert, slot, victim)
        elif self.disk:
            self._read(layer, expert, slot)
        else:
            src = self.store.buffer(layer, expert)
            if self.cuda:
                with torch.cuda.stream(self.copy_stream):
                    self.copy_stream.wait_event(L.done[slot])
                    L.slots[slot].copy_(src, non_blocking=True)
                    L.ready[slot].record(self.copy_stream)
            else:
                L.slots[slot].copy_(src)
        L.expert_in[slot] = expert
        L.slot_of[expert] = slot
        L.policy.on_insert(expert, self.tick)
        self.stats.on_slot(layer, slot, expert)

    def _swap(self, layer: int, expert: int, slot: int, victim: int) -> None:
        """Exclusive: ``expert`` comes up from its host row into ``slot``; ``victim`` (if any) goes down into a
        spare row; the row ``expert`` vacates becomes a spare."""
        L, store = self.layers[layer], self.store
        row = store.home[layer][expert]
        if row < 0:
            raise RuntimeError(f"layer {layer} expert {expert} is neither on the device nor on the host")
        dest = store.take_free() if victim >= 0 else -1
        if self.cuda:
            cs, ds = self.copy_stream, self.d2h_stream
            with torch.cuda.stream(cs):
                if victim >= 0:
                    if self._stage is None:
                        self._stage = torch.empty(self.expert_bytes, dtype=torch.uint8, device=self.device)
                    cs.wait_event(self._stage_free)                 # the last write-back has read the stage
                    self._stage.copy_(L.slots[slot], non_blocking=True)
                    self._staged.record(cs)
                cs.wait_event(L.done[slot])                         # queued compute no longer reads the slot
                if row in self._row_written:
                    cs.wait_event(self._row_written[row])           # the row holds its expert by now
                L.slots[slot].copy_(store.rows[row], non_blocking=True)
                L.ready[slot].record(cs)
                _event(self._row_read, row).record(cs)
            if victim >= 0:
                with torch.cuda.stream(ds):
                    ds.wait_event(self._staged)
                    if dest in self._row_read:
                        ds.wait_event(self._row_read[dest])         # its last load has read it
                    store.rows[dest].copy_(self._stage, non_blocking=True)
                    _event(self._row_written, dest).record(ds)
                    self._stage_free.record(ds)
        else:
            if victim >= 0:
                store.rows[dest].copy_(L.slots[slot])
            L.slots[slot].copy_(store.rows[row])
        if victim >= 0:
            store.home[layer][victim] = dest
        store.home[layer][expert] = -1
        store.free.append(row)

    def _read(self, layer: int, expert: int, slot: int) -> None:
        """Disk: the reader thread reads the blob and queues its copy; ``_settle`` waits for it before use."""
        L = self.layers[layer]
        self._reader.submit(layer, expert, L.slots[slot], L.ready[slot] if self.cuda else None,
                            L.done[slot] if self.cuda else None)
        self.stats.on_disk_read(self.expert_bytes)

    def _settle(self, L: _Layer, slot: int) -> None:
        if self.disk:
            self._reader.settle(L.slots[slot])
