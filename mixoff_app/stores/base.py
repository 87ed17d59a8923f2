"""The one interface every placement implements, and what the three share.

The cache decides which slot; the store decides how an expert gets there. A store owns its host copies, its
copy streams, the events that order them and any write-back; the cache owns the device slots' bookkeeping
(which expert is in which slot, the policy, the counters) and the two events per slot that order copies
against compute:

- ``ready`` is recorded by the store on its copy stream once the copy into the slot is queued; compute
  waits on it before reading the slot.
- ``done`` is recorded by the cache on the compute stream after the slot's last use; the store makes its
  copy into the slot wait on it, so a copy never overwrites weights a queued kernel still reads.

On the CPU the events are None and copies are synchronous.
"""
from __future__ import annotations

from typing import Iterator, Optional, Protocol, Sequence, runtime_checkable

import torch

from ..config import ModelConfig
from .layout import ExpertLayout, ExpertWeights

Slots = list[torch.Tensor]          # per layer, one [k, nbytes] uint8 block of device slots
Residents = list[list[int]]         # per layer, slot -> expert (-1: empty)


@runtime_checkable
class ExpertStore(Protocol):
    placement: str        # "inclusive" | "exclusive" | "disk"
    deferred_loads: bool  # load_into returns before the copy is queued: settle() before reading the slot
    write_back: bool      # evicting an expert moves its bytes back to the host
    cfg: ModelConfig
    layout: ExpertLayout
    pinned: bool

    def load_targets(self) -> Iterator[tuple[int, int, torch.Tensor]]:
        """(layer, expert, buffer) for every expert the loader must read now, in checkpoint order."""

    def fill(self, layer: int, expert: int, tensors: dict[str, torch.Tensor]) -> None: ...

    def buffer(self, layer: int, expert: int) -> torch.Tensor:
        """The expert's bytes: where they are now (host row or device slot), or a fresh host copy."""

    def weights(self, layer: int, expert: int) -> ExpertWeights: ...

    def open_slots(self, sizes: Sequence[int], device: torch.device) -> tuple[Slots, Residents]:
        """The device slots for ``sizes`` experts per layer and who is in them (the cache owns them from now)."""

    def load_into(self, layer: int, expert: int, slot: torch.Tensor, victim: int,
                  ready: Optional["torch.cuda.Event"], done: Optional["torch.cuda.Event"]) -> int:
        """Start bringing ``expert`` into ``slot``, whose previous expert ``victim`` (-1: none) was evicted.
        Returns the bytes read from disk for it."""

    def settle(self, slot: torch.Tensor) -> None:
        """Return once the latest ``load_into(slot)`` is queued (its ``ready`` recorded; CPU: done): called
        just before the slot is read. Immediate for stores that queue the copy inside ``load_into``."""

    def resize(self, slots: list[Optional[torch.Tensor]], residents: Residents,
               sizes: Sequence[int]) -> tuple[Slots, Residents]:
        """New slots for ``sizes`` in place of ``slots`` (which the store may drop layer by layer: the caller
        holds no other reference); called with every copy finished."""

    def device_buffers(self) -> list[torch.Tensor]:
        """Device tensors the store holds besides the slots."""

    @property
    def nbytes(self) -> int:
        """Host bytes of the expert tier."""

    @property
    def pinned_bytes(self) -> int: ...


class SlotCopies:
    """What the three placements share: the copy stream, new empty slots, and reading experts by ``buffer``."""

    cfg: ModelConfig
    layout: ExpertLayout
    pinned: bool
    write_back = False
    deferred_loads = False
    device: Optional[torch.device] = None
    cuda = False
    copy_stream: Optional["torch.cuda.Stream"] = None

    def buffer(self, layer: int, expert: int) -> torch.Tensor:
        raise NotImplementedError

    def fill(self, layer: int, expert: int, tensors: dict[str, torch.Tensor]) -> None:
        self.layout.fill(self.buffer(layer, expert), tensors)

    def weights(self, layer: int, expert: int) -> ExpertWeights:
        return self.layout.weights(self.buffer(layer, expert))

    def load_targets(self) -> Iterator[tuple[int, int, torch.Tensor]]:
        for i in range(self.cfg.num_layers):
            for e in range(self.cfg.num_experts):
                yield i, e, self.buffer(i, e)

    def attach(self, device: torch.device) -> None:
        """Copies into slots on ``device`` run on their own stream, so resident experts compute meanwhile."""
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        if self.cuda and self.copy_stream is None:
            self.copy_stream = torch.cuda.Stream(device=self.device)

    def empty_slots(self, sizes: Sequence[int]) -> tuple[Slots, Residents]:
        return ([torch.empty((k, self.layout.nbytes), dtype=torch.uint8, device=self.device) for k in sizes],
                [[-1] * k for k in sizes])

    def open_slots(self, sizes: Sequence[int], device: torch.device) -> tuple[Slots, Residents]:
        self.attach(device)
        return self.empty_slots(sizes)

    def resize(self, slots: list[Optional[torch.Tensor]], residents: Residents,
               sizes: Sequence[int]) -> tuple[Slots, Residents]:
        """Eviction is free here (the host or the file keeps every expert): drop the old slots, start empty."""
        slots.clear()
        if self.cuda:
            torch.cuda.empty_cache()
        return self.empty_slots(sizes)

    def settle(self, slot: torch.Tensor) -> None:
        """Copies are queued inside ``load_into``: nothing to wait for."""

    def device_buffers(self) -> list[torch.Tensor]:
        return []

    def copy_into(self, slot: torch.Tensor, src: torch.Tensor, ready, done) -> None:
        """``src`` (host) -> ``slot``: on the copy stream after the slot's last use, then mark it ready."""
        if self.cuda:
            with torch.cuda.stream(self.copy_stream):
                self.copy_stream.wait_event(done)
                slot.copy_(src, non_blocking=True)
                ready.record(self.copy_stream)
        else:
            slot.copy_(src)

    @property
    def pinned_bytes(self) -> int:
        return self.nbytes if self.pinned else 0
