"""Per-layer device cache of experts: k slots per layer, allocated at load (and again only when the cache is
re-planned), filled by whole-buffer copies.

On CUDA, copies run on the store's copy stream. Each slot has two events: ``ready`` (recorded on the copy
stream when its copy lands; compute waits on it) and ``done`` (recorded on the compute stream after the
slot's last use; a later copy into the slot waits on it). So resident experts compute while misses are
in flight, and a copy never overwrites weights a queued kernel still reads.

The cache decides which slot an expert goes to; the store (``stores``) decides how it gets there: a copy
from host RAM (inclusive), a swap that writes the victim back (exclusive), or a read from the checkpoint
file (disk), on the store's own streams.

On the CPU the same code runs with the CPU as "device": slots are separate buffers and copies are
synchronous, so every line of the bookkeeping and its counters is exercised by the CPU tests.
"""
from __future__ import annotations

from typing import Iterable, Iterator, Optional

import torch

from .policy import EvictionPolicy, make_policy
from .stats import Stats
from .stores import ExpertLayout, ExpertStore, ExpertWeights


class _Layer:
    __slots__ = ("slots", "weights", "expert_in", "slot_of", "policy", "ready", "done", "prefetched",
                 "leaving")

    def __init__(self, k: int, layout: ExpertLayout, policy: EvictionPolicy, cuda: bool,
                 slots: torch.Tensor) -> None:
        self.slots = slots
        self.weights = [layout.weights(self.slots[i]) for i in range(k)]   # views made once
        self.expert_in = [-1] * k            # slot -> expert (-1: empty)
        self.slot_of: dict[int, int] = {}    # expert -> slot
        self.leaving = [-1] * k              # slot -> expert just evicted from it (the store may write it back)
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
        self.expert_bytes = store.layout.nbytes
        self.placement = store.placement
        self._deferred = store.deferred_loads      # loads finish off this thread: settle a slot before use
        self.policy_name = policy
        self.tick = 0
        self._build(sizes, policy, *store.open_slots(tuple(sizes), self.device))

    def _build(self, sizes: tuple[int, ...], policy: str, slots: list[torch.Tensor],
               residents: list[list[int]]) -> None:
        num_experts = self.store.cfg.num_experts
        self.sizes = tuple(sizes)
        self.layers = [_Layer(k, self.store.layout, make_policy(policy, num_experts), self.cuda, slots[i])
                       for i, k in enumerate(self.sizes)]
        self.stats.configure(self.sizes, policy, self.placement)
        for i, experts in enumerate(residents):      # exclusive: the slots already hold experts
            L = self.layers[i]
            for s, e in enumerate(experts):
                if e < 0:
                    continue
                L.expert_in[s] = e
                L.slot_of[e] = s
                L.policy.on_insert(e, self.tick)
                self.stats.on_slot(i, s, e)

    def resize(self, sizes: tuple[int, ...], policy: str) -> None:
        """Re-plan: drop every slot and allocate the new ones (the model itself is untouched). The store
        decides what moves: nothing where eviction is free; under exclusive placement, experts between the
        tiers."""
        E = self.store.cfg.num_experts
        if len(sizes) != len(self.layers) or not all(1 <= k <= E for k in sizes):
            raise ValueError(f"bad cache sizes {tuple(sizes)}")
        if self.cuda:
            torch.cuda.synchronize(self.device)
        self.policy_name = policy
        slots = [L.slots for L in self.layers]
        residents = [list(L.expert_in) for L in self.layers]
        self.layers = []                     # the store may free the old blocks layer by layer
        self._build(sizes, policy, *self.store.resize(slots, residents, tuple(sizes)))

    @property
    def device_bytes(self) -> int:
        """Bytes of the device slots (plus what the store keeps on the device, e.g. the swap's staging buffer)."""
        return sum(self.sizes) * self.expert_bytes + sum(t.numel() for t in self.store.device_buffers())

    def device_buffers(self) -> list[torch.Tensor]:
        """Every device tensor of the expert tier: the slot blocks and the store's own."""
        return [L.slots for L in self.layers] + self.store.device_buffers()

    def next_token(self) -> None:
        self.tick += 1

    def resident(self, layer: int) -> list[int]:
        return list(self.layers[layer].expert_in)

    def holds(self, layer: int, expert: int) -> bool:
        return expert in self.layers[layer].slot_of

    # ---- the hot path ---------------------------------------------------------------------------
    def fetch(self, layer: int, experts: list[int]) -> Iterable[tuple[int, ExpertWeights, int]]:
        """(expert, weights, slot) for every requested expert, in turn: resident ones first, while the
        copies of the missing ones are already in flight. The caller must call ``release(layer, slot)``
        after issuing the compute that reads a slot.

        When every expert is resident and nothing needs settling (the CPU with every expert held, the common
        step of a fine-grained model), a list, counted as the generator counts it: no generator frame per
        expert and none of the bookkeeping that only misses need."""
        L = self.layers[layer]
        slot_of = L.slot_of
        slots = [slot_of.get(e) for e in experts]
        if None in slots or self._deferred or self.cuda:
            return self.fetch_each(layer, experts)
        st, tick, on_access, prefetched, weights = self.stats, self.tick, L.policy.on_access, L.prefetched, L.weights
        for e in experts:
            st.on_hit(layer, e)
            on_access(e, tick)
            if e in prefetched:
                prefetched.discard(e)
                st.on_prefetch_used(layer, e)
        return [(e, weights[s], s) for e, s in zip(experts, slots)]

    def fetch_each(self, layer: int, experts: list[int]) -> Iterator[tuple[int, ExpertWeights, int]]:
        """``fetch`` as a generator, one expert at a time, whatever is resident (the per-expert loop)."""
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
            self._use(L, s)   # a hit may be a prefetch still in flight; waiting on a landed copy is free
            yield e, L.weights[s], s
        for e, s in issued:
            pending.discard(e)
            self._use(L, s)
            L.policy.on_access(e, tick)
            yield e, L.weights[s], s
        # Fewer slots than experts in flight (k smaller than this request): reuse slots one by one.
        for e in misses[len(issued):]:
            s = self._slot_for(layer, pending)
            self._load(layer, e, s)
            st.on_miss(layer, e, self.expert_bytes)
            pending.discard(e)
            self._use(L, s)
            L.policy.on_access(e, tick)
            yield e, L.weights[s], s

    def _use(self, L: _Layer, s: int) -> None:
        """Order the coming compute after the slot's copy: the store settles it (a disk read may still be on
        its reader thread), then the compute stream waits on its ``ready`` event."""
        if self._deferred:
            self.store.settle(L.slots[s])
        if self.cuda:
            torch.cuda.current_stream(self.device).wait_event(L.ready[s])

    def release(self, layer: int, slot: int) -> None:
        """The compute reading ``slot`` has been issued; a later copy into it must wait for it."""
        if self.cuda:
            self.layers[layer].done[slot].record(torch.cuda.current_stream(self.device))

    def prefetch(self, layer: int, experts: list[int]) -> int:
        """Start loading ``experts`` into ``layer`` ahead of need. Only empty slots, or slots whose expert
        is not itself guessed, are used. Returns how many copies were issued."""
        L, n = self.layers[layer], 0
        keep = set(experts)
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
        L.leaving[s] = victim                  # _load, which always follows, tells the store
        self.stats.on_evict(layer, victim, self.expert_bytes if self.store.write_back else 0)
        return s

    def _load(self, layer: int, expert: int, slot: int) -> None:
        L = self.layers[layer]
        victim, L.leaving[slot] = L.leaving[slot], -1
        n = self.store.load_into(layer, expert, L.slots[slot], victim,
                                 L.ready[slot] if self.cuda else None, L.done[slot] if self.cuda else None)
        if n:
            self.stats.on_disk_read(n)
        L.expert_in[slot] = expert
        L.slot_of[expert] = slot
        L.policy.on_insert(expert, self.tick)
        self.stats.on_slot(layer, slot, expert)
