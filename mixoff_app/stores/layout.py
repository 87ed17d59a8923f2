"""How one expert sits in memory: its three matrices, with their packed codes, scales and zeros, back to back
in one uint8 buffer described by an ``ExpertLayout``, so moving an expert to a device slot is a single copy
and the tensors the forward uses are views into the slot, made once.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import NamedTuple, Union

import torch

from ..config import ModelConfig, QuantSpec
from ..quant import Field, QWeight, qweight_from, weight_fields

ALIGN = 64   # every field starts on a 64-byte boundary: safe for any dtype view and coalesced device reads

Weight = Union[torch.Tensor, QWeight]


class ExpertWeights(NamedTuple):
    w1: Weight   # gate projection  [F, H]
    w3: Weight   # up projection    [F, H]
    w2: Weight   # down projection  [H, F]


@dataclass(frozen=True)
class ExpertLayout:
    fields: tuple[Field, ...]
    offsets: tuple[int, ...]
    nbytes: int
    spec: QuantSpec
    shapes: tuple[tuple[int, int], ...]      # (w1, w3, w2) weight shapes

    @classmethod
    def for_model(cls, cfg: ModelConfig, spec: QuantSpec, dense_dtype: torch.dtype) -> "ExpertLayout":
        f, h = cfg.intermediate_size, cfg.hidden_size
        shapes = ((f, h), (f, h), (h, f))
        fields: list[Field] = []
        for name, shape in zip(("w1", "w3", "w2"), shapes):
            fields += weight_fields(name, shape, spec, dense_dtype)
        offsets, off = [], 0
        for fld in fields:
            offsets.append(off)
            off += -(-fld.nbytes // ALIGN) * ALIGN
        return cls(tuple(fields), tuple(offsets), off, spec, shapes)

    def views(self, buf: torch.Tensor) -> dict[str, torch.Tensor]:
        """Typed views of every field inside a uint8 buffer of ``nbytes`` (no copies)."""
        out = {}
        for fld, off in zip(self.fields, self.offsets):
            out[fld.name] = buf[off:off + fld.nbytes].view(fld.dtype).view(fld.shape)
        return out

    def weights(self, buf: torch.Tensor) -> ExpertWeights:
        v = self.views(buf)
        ws = []
        for name, shape in zip(("w1", "w3", "w2"), self.shapes):
            ws.append(qweight_from(v, name, shape, self.spec) if self.spec.enabled else v[f"{name}.weight"])
        return ExpertWeights(*ws)

    def fill(self, buf: torch.Tensor, tensors: dict[str, torch.Tensor]) -> None:
        """Copy named tensors (``w1.W_q``, ``w2.weight``, ...) into their places; checks names and shapes."""
        v = self.views(buf)
        missing = set(v) - set(tensors)
        if missing:
            raise KeyError(f"expert is missing tensors: {', '.join(sorted(missing))}")
        for name, t in tensors.items():
            if name not in v:
                raise KeyError(f"unexpected expert tensor {name!r}")
            if tuple(t.shape) != tuple(v[name].shape):
                raise ValueError(f"expert tensor {name}: shape {tuple(t.shape)}, expected {tuple(v[name].shape)}")
            v[name].copy_(t.to(v[name].dtype))


def host_buffer(shape: tuple[int, ...], pin: bool) -> torch.Tensor:
    """A uint8 host tensor, page-locked when ``pin``.

    Not ``torch.empty(pin_memory=True)``: torch's caching host allocator rounds every pinned block up to a
    power of two, so a 531 MB layer of Mixtral experts would take 1 GiB (32 GiB for the model). Pageable
    memory registered with ``cudaHostRegister`` is pinned at its exact size; it is unregistered when the
    tensor is freed.
    """
    t = torch.zeros(shape, dtype=torch.uint8)       # zeroed: the alignment padding is deterministic
    if pin and t.numel():
        cudart = torch.cuda.cudart()
        ptr = t.data_ptr()
        err = int(cudart.cudaHostRegister(ptr, t.numel(), 0))
        if err != 0:
            raise RuntimeError(f"cudaHostRegister of {t.numel()} bytes failed (cudaError {err})")
        weakref.finalize(t.untyped_storage(), cudart.cudaHostUnregister, ptr).atexit = False
    return t


def expert_tensors_from_dense(w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor, spec: QuantSpec,
                              device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Quantize (or pass through) one expert's fp weights into the named tensors of its layout."""
    from ..quant import quantize
    out: dict[str, torch.Tensor] = {}
    for name, w in (("w1", w1), ("w3", w3), ("w2", w2)):
        if spec.enabled:
            for k, t in quantize(w, spec, device).tensors().items():
                out[f"{name}.{k}"] = t.cpu()
        else:
            out[f"{name}.weight"] = w
    return out
