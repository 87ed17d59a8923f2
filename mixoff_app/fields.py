"""``Field``: one named tensor of a stored weight (its name, shape and dtype), the unit every size and layout is
counted in: the expert layout, the checkpoint writer and the planner all add up Fields."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Field:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()
