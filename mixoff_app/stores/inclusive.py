"""Inclusive placement: the host holds every expert of every layer; a device slot holds a copy."""
from __future__ import annotations

from typing import Optional

import torch

from ..config import ModelConfig
from .base import SlotCopies
from .layout import ExpertLayout, host_buffer


class InclusiveStore(SlotCopies):
    """One buffer per expert, allocated per layer as one [E, nbytes] block; pinned when ``pin`` so host->device
    copies are truly asynchronous. Evicting a device copy is free: the host still holds the expert."""

    placement = "inclusive"

    def __init__(self, cfg: ModelConfig, layout: ExpertLayout, pin: bool = False) -> None:
        self.cfg, self.layout = cfg, layout
        self.pinned = pin
        self._layers = [host_buffer((cfg.num_experts, layout.nbytes), pin) for _ in range(cfg.num_layers)]

    def buffer(self, layer: int, expert: int) -> torch.Tensor:
        return self._layers[layer][expert]

    def load_into(self, layer: int, expert: int, slot: torch.Tensor, victim: int,
                  ready: Optional["torch.cuda.Event"], done: Optional["torch.cuda.Event"]) -> int:
        self.copy_into(slot, self.buffer(layer, expert), ready, done)
        return 0

    @property
    def nbytes(self) -> int:
        return sum(t.numel() for t in self._layers)
