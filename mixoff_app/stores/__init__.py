"""Where experts live: one ``ExpertStore`` protocol, three placements, each owning its copies.

inclusive: the host holds every expert (pinned on CUDA), a slot holds a copy, eviction is free.
exclusive: each expert in exactly one place; a miss swaps, writing the victim back through a staging buffer.
disk: experts are read from a mixoff-format checkpoint through pinned staging buffers; eviction is free.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

import torch

from ..config import ModelConfig
from .base import ExpertStore
from .disk import DiskStore
from .exclusive import ExclusiveStore
from .inclusive import InclusiveStore
from .layout import ExpertLayout, ExpertWeights, expert_tensors_from_dense, host_buffer

__all__ = ["DiskStore", "ExclusiveStore", "ExpertLayout", "ExpertStore", "ExpertWeights", "InclusiveStore",
           "expert_tensors_from_dense", "host_buffer", "make_store"]


def make_store(placement: str, cfg: ModelConfig, layout: ExpertLayout, sizes: Sequence[int],
               device: torch.device, folder: Optional[str | os.PathLike] = None, pin: bool = False) -> ExpertStore:
    if placement == "exclusive":
        return ExclusiveStore(cfg, layout, sizes, device, pin=pin)
    if placement == "disk":
        return DiskStore(cfg, layout, folder, pin=pin)
    return InclusiveStore(cfg, layout, pin=pin)
