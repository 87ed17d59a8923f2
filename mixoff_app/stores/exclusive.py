"""Exclusive placement: each expert lives in exactly one place, a device slot or a host row.

Layer l keeps ``k_l`` experts in device slots and ``E - k_l`` in host rows; one spare host row lets a swap
write the evicted expert back while the needed one is still being read from its own row (the row it vacates
becomes the next spare). Host rows are separate allocations, so re-planning ``k`` can grow or shrink the host
share without a second copy of it.

Swap on CUDA. The load (host row -> slot) and the write-back (slot -> host) touch the same slot, so they must
not race, yet running them one after the other would leave one direction of the full-duplex bus idle. The
victim is first snapshotted into one device staging buffer (a device-to-device copy, ~100x faster than the
bus), ordered before the load on the copy stream; the write-back then reads the snapshot on its own stream
while the load overwrites the slot, and both directions move at once. The write-back goes into a spare host
row, never into the row the load is still reading; that row becomes the spare once the load has read it (an
event orders the next write into it).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..config import ModelConfig
from .base import Residents, SlotCopies, Slots
from .layout import ExpertLayout, host_buffer


def _event(events: dict, key: int) -> "torch.cuda.Event":
    """The event kept for ``key``, made on first use only (setdefault would build one on every call)."""
    ev = events.get(key)
    if ev is None:
        ev = events[key] = torch.cuda.Event()
    return ev


class ExclusiveStore(SlotCopies):
    """The device slot blocks are made here (the loader writes the first ``k_l`` experts of each layer straight
    into them) and handed to the cache by ``open_slots``; the store still knows which slot holds which expert,
    since every swap goes through it."""

    placement = "exclusive"
    write_back = True

    def __init__(self, cfg: ModelConfig, layout: ExpertLayout, sizes: Sequence[int], device: torch.device,
                 pin: bool = False) -> None:
        self.cfg, self.layout, self.pinned = cfg, layout, pin
        E = cfg.num_experts
        self.rows: list[Optional[torch.Tensor]] = []
        self.free: list[int] = []
        self.home: list[list[int]] = []            # layer -> expert -> host row (-1: on the device)
        self._slots: Optional[Slots] = [
            torch.zeros((k, layout.nbytes), dtype=torch.uint8, device=device) for k in sizes]
        self._on_device: list[dict[int, torch.Tensor]] = [   # layer -> expert -> its slot
            {e: block[e] for e in range(block.shape[0])} for block in self._slots]
        for k in sizes:
            self.home.append([-1] * k + [self.new_row() for _ in range(E - k)])
        self.free.append(self.new_row())
        self._stage: Optional[torch.Tensor] = None     # made on the first swap on CUDA (none while k = E)

    # ---- rows -----------------------------------------------------------------------------------
    def new_row(self) -> int:
        self.rows.append(host_buffer((self.layout.nbytes,), self.pinned))
        return len(self.rows) - 1

    def drop_row(self, row: int) -> None:
        self.rows[row] = None

    def take_free(self) -> int:
        return self.free.pop() if self.free else self.new_row()

    def trim(self, spare: int = 1) -> None:
        """Keep exactly ``spare`` unused host rows (after a re-plan moved experts between the tiers)."""
        while len(self.free) > spare:
            self.drop_row(self.free.pop())
        while len(self.free) < spare:
            self.free.append(self.new_row())

    # ---- the store interface --------------------------------------------------------------------
    def buffer(self, layer: int, expert: int) -> torch.Tensor:
        """Where the expert's bytes are now: its host row, or its device slot."""
        row = self.home[layer][expert]
        return self.rows[row] if row >= 0 else self._on_device[layer][expert]

    def attach(self, device: torch.device) -> None:
        super().attach(device)
        if self.cuda and not hasattr(self, "d2h_stream"):
            self.d2h_stream = torch.cuda.Stream(device=self.device)
            self._staged, self._stage_free = torch.cuda.Event(), torch.cuda.Event()
            self._row_read: dict[int, torch.cuda.Event] = {}      # host row -> last load that read it
            self._row_written: dict[int, torch.cuda.Event] = {}   # host row -> last write-back into it

    def open_slots(self, sizes: Sequence[int], device: torch.device) -> tuple[Slots, Residents]:
        """Hand the device slots, already holding the first ``k_l`` experts of each layer, to the cache (once)."""
        slots = self._slots
        if slots is None:
            raise RuntimeError("the device slots were already handed to a cache")
        if tuple(s.shape[0] for s in slots) != tuple(sizes):
            raise ValueError(f"the exclusive store was built for sizes {tuple(s.shape[0] for s in slots)}, "
                             f"not {tuple(sizes)}")
        self.attach(device)
        self._slots = None
        return slots, [list(range(s.shape[0])) for s in slots]

    def load_into(self, layer: int, expert: int, slot: torch.Tensor, victim: int,
                  ready: Optional["torch.cuda.Event"], done: Optional["torch.cuda.Event"]) -> int:
        """``expert`` comes up from its host row into ``slot``; ``victim`` (if any) goes down into a spare row;
        the row ``expert`` vacates becomes a spare."""
        row = self.home[layer][expert]
        if row < 0:
            raise RuntimeError(f"layer {layer} expert {expert} is neither on the device nor on the host")
        dest = self.take_free() if victim >= 0 else -1
        if self.cuda:
            cs, ds = self.copy_stream, self.d2h_stream
            with torch.cuda.stream(cs):
                if victim >= 0:
                    if self._stage is None:
                        self._stage = torch.empty(self.layout.nbytes, dtype=torch.uint8, device=self.device)
                    cs.wait_event(self._stage_free)                 # the last write-back has read the stage
                    self._stage.copy_(slot, non_blocking=True)
                    self._staged.record(cs)
                cs.wait_event(done)                                 # queued compute no longer reads the slot
                if row in self._row_written:
                    cs.wait_event(self._row_written[row])           # the row holds its expert by now
                slot.copy_(self.rows[row], non_blocking=True)
                ready.record(cs)
                _event(self._row_read, row).record(cs)
            if victim >= 0:
                with torch.cuda.stream(ds):
                    ds.wait_event(self._staged)
                    if dest in self._row_read:
                        ds.wait_event(self._row_read[dest])         # its last load has read it
                    self.rows[dest].copy_(self._stage, non_blocking=True)
                    _event(self._row_written, dest).record(ds)
                    self._stage_free.record(ds)
        else:
            if victim >= 0:
                self.rows[dest].copy_(slot)
            slot.copy_(self.rows[row])
        on_device = self._on_device[layer]
        if victim >= 0:
            self.home[layer][victim] = dest
            del on_device[victim]
        self.home[layer][expert] = -1
        on_device[expert] = slot
        self.free.append(row)
        return 0

    def resize(self, slots: list[Optional[torch.Tensor]], residents: Residents,
               sizes: Sequence[int]) -> tuple[Slots, Residents]:
        """Move experts between the tiers, one layer at a time (so the extra memory at any moment is one layer's
        slots): experts that lose their slot go to new host rows, and a larger k pulls experts up from the
        host, whose rows are then freed."""
        E = self.cfg.num_experts
        new_slots, initial = [], []
        for i, k in enumerate(sizes):
            old, where = slots[i], {e: s for s, e in enumerate(residents[i]) if e >= 0}
            keep, out = list(where)[:k], list(where)[k:]
            for e in out:                                   # device -> a new host row
                row = self.take_free()
                self.rows[row].copy_(old[where[e]])
                self.home[i][e] = row
            block = torch.empty((k, self.layout.nbytes), dtype=torch.uint8, device=self.device)
            for s, e in enumerate(keep):
                block[s].copy_(old[where[e]])
            up = [e for e in range(E) if self.home[i][e] >= 0][:k - len(keep)]
            for j, e in enumerate(up):                      # host -> device; its row is freed
                row = self.home[i][e]
                block[len(keep) + j].copy_(self.rows[row])
                self.home[i][e] = -1
                self.free.append(row)
            slots[i] = old = None                           # drop the old block before the next layer
            self._on_device[i] = {e: block[s] for s, e in enumerate(keep + up)}
            new_slots.append(block)
            initial.append(keep + up)
        if self.cuda:
            torch.cuda.synchronize(self.device)
        self.trim(1)
        if self.cuda:
            self._row_read.clear()
            self._row_written.clear()
            torch.cuda.empty_cache()
        return new_slots, initial

    def device_buffers(self) -> list[torch.Tensor]:
        return [] if self._stage is None else [self._stage]

    @property
    def host_rows(self) -> int:
        return sum(r is not None for r in self.rows)

    @property
    def nbytes(self) -> int:
        return self.host_rows * self.layout.nbytes
