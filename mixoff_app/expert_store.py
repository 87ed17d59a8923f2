"""Host-side home of the experts: one contiguous (pinned, where CUDA exists) buffer per expert.

Three placements share one interface (``buffer``, ``fill``, ``weights``, ``load_targets``, ``nbytes``,
``pinned_bytes``, ``placement``): ``ExpertStore`` (inclusive: the host holds every expert),
``ExclusiveStore`` (each expert in one place: host row or device slot) and ``disk_store.DiskStore``
(experts read from the checkpoint file on demand).

An expert's three matrices, with their packed codes, scales and zeros, sit back to back in one uint8
buffer described by an ``ExpertLayout``, so moving an expert to a device slot is a single copy and the
tensors the forward uses are views into the slot, made once.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Iterator, NamedTuple, Optional, Sequence, Union

import torch

from .config import ModelConfig, QuantSpec
from .quant import Field, QWeight, qweight_from, weight_fields

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


class _BufferStore:
    """What every placement shares: fill, read and enumerate experts through ``buffer(layer, expert)``."""

    cfg: ModelConfig
    layout: ExpertLayout

    def buffer(self, layer: int, expert: int) -> torch.Tensor:
        raise NotImplementedError

    def fill(self, layer: int, expert: int, tensors: dict[str, torch.Tensor]) -> None:
        self.layout.fill(self.buffer(layer, expert), tensors)

    def weights(self, layer: int, expert: int) -> ExpertWeights:
        return self.layout.weights(self.buffer(layer, expert))

    def load_targets(self) -> Iterator[tuple[int, int, torch.Tensor]]:
        """(expert layer, expert, buffer) for every expert the loader must read now, in checkpoint order."""
        for i in range(self.cfg.num_moe_layers):
            for e in range(self.cfg.num_experts):
                yield i, e, self.buffer(i, e)


class ExpertStore(_BufferStore):
    """Every expert of every expert layer in host memory (inclusive placement), one buffer per expert. Layers
    here are expert layers (``cfg.moe_layers``): a dense layer has no experts to store.

    Buffers are allocated per layer as one [E, nbytes] block; pinned when ``pin`` so host->device
    copies are truly asynchronous. Evicting a device copy is free: the host still holds the expert.
    """

    placement = "inclusive"

    def __init__(self, cfg: ModelConfig, layout: ExpertLayout, pin: bool = False) -> None:
        self.cfg, self.layout = cfg, layout
        self.pinned = pin
        self._layers = [host_buffer((cfg.num_experts, layout.nbytes), pin) for _ in range(cfg.num_moe_layers)]

    def buffer(self, layer: int, expert: int) -> torch.Tensor:
        return self._layers[layer][expert]


    @property
    def nbytes(self) -> int:
        return sum(t.numel() for t in self._layers)

    @property
    def pinned_bytes(self) -> int:
        return self.nbytes if self.pinned else 0


class ExclusiveStore(_BufferStore):
    """Exclusive placement: each expert lives in exactly one place, a device slot or a host row.

    Layer l keeps ``k_l`` experts in device slots and ``E - k_l`` in host rows; one spare host row lets a
    swap write the evicted expert back while the needed one is still being read from its own row (the row
    it vacates becomes the next spare). Host rows are separate allocations, so re-planning ``k`` can grow or
    shrink the host share without a second copy of it.

    The device slot blocks are made here (the loader writes the first ``k_l`` experts of each layer straight
    into them) and handed to the ``ExpertCache``, which owns them from then on.
    """

    placement = "exclusive"

    def __init__(self, cfg: ModelConfig, layout: ExpertLayout, sizes: Sequence[int], device: torch.device,
                 pin: bool = False) -> None:
        self.cfg, self.layout, self.pinned = cfg, layout, pin
        E = cfg.num_experts
        self.rows: list[Optional[torch.Tensor]] = []
        self.free: list[int] = []
        self.home: list[list[int]] = []            # layer -> expert -> host row (-1: on the device)
        self.slots: Optional[list[torch.Tensor]] = [
            torch.zeros((k, layout.nbytes), dtype=torch.uint8, device=device) for k in sizes]
        self.initial = [list(range(k)) for k in sizes]   # slot -> expert, before the cache takes over
        self._cache = None
        for k in sizes:
            self.home.append([-1] * k + [self.new_row() for _ in range(E - k)])
        self.free.append(self.new_row())

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

    def take_slots(self, cache) -> tuple[list[torch.Tensor], list[list[int]]]:
        """Hand the device slots and their residents to the cache (once)."""
        slots, initial = self.slots, self.initial
        if slots is None:
            raise RuntimeError("the device slots were already handed to a cache")
        self.slots, self._cache = None, cache
        return slots, initial

    # ---- the common store interface -------------------------------------------------------------
    def buffer(self, layer: int, expert: int) -> torch.Tensor:
        """Where the expert's bytes are now: its host row, or its device slot."""
        row = self.home[layer][expert]
        if row >= 0:
            return self.rows[row]
        if self.slots is not None:
            return self.slots[layer][self.initial[layer].index(expert)]
        return self._cache.slot_buffer(layer, expert)


    @property
    def host_rows(self) -> int:
        return sum(r is not None for r in self.rows)

    @property
    def nbytes(self) -> int:
        return self.host_rows * self.layout.nbytes

    @property
    def pinned_bytes(self) -> int:
        return self.nbytes if self.pinned else 0


def expert_tensors_from_dense(w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor, spec: QuantSpec,
                              device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Quantize (or pass through) one expert's fp weights into the named tensors of its layout."""
    from .quant import quantize
    out: dict[str, torch.Tensor] = {}
    for name, w in (("w1", w1), ("w3", w3), ("w2", w2)):
        if spec.enabled:
            for k, t in quantize(w, spec, device).tensors().items():
                out[f"{name}.{k}"] = t.cpu()
        else:
            out[f"{name}.weight"] = w
    return out
