"""Disk placement: experts stay in the checkpoint file and are read on demand through pinned staging buffers.

Only the mixoff format (``python -m mixoff_app quantize``) has what this needs: each expert stored as one
``...experts.E.packed`` blob in the store's layout, so serving a miss is one read at a known file offset.
The offsets come from the safetensors headers (8-byte little-endian length, a JSON header, then the data).

Reads use ``os.preadv`` straight into a staging buffer rather than a memory map: pages of a map count in
the process's RSS and stay resident until unmapped, which would grow the footprint toward the whole
checkpoint; a positioned read leaves the pages in the kernel's page cache, which the system reclaims
freely (and which still makes a re-read of a hot expert fast).
"""
from __future__ import annotations

import ctypes
import json
import os
import struct
import weakref
from pathlib import Path
from typing import Iterator, Optional

import torch

from ..config import ConfigError, ModelConfig
from .base import SlotCopies
from .disk_reader import DiskReader
from .layout import ExpertLayout, host_buffer


def safetensors_header(path: Path) -> tuple[dict, int]:
    """(header dict, byte offset where the data section starts)."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise ConfigError(f"{path}: not a safetensors file (too short)")
        (n,) = struct.unpack("<Q", head)
        if n > 100 << 20:
            raise ConfigError(f"{path}: implausible safetensors header length {n}")
        header = json.loads(f.read(n))
    return header, 8 + n


def is_mixoff_checkpoint(folder: str | os.PathLike) -> bool:
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.exists():
        try:
            return bool(json.loads(index.read_text()).get("metadata", {}).get("mixoff.format"))
        except ValueError:
            return False
    single = folder / "model.safetensors"
    if single.exists():
        try:
            return bool(safetensors_header(single)[0].get("__metadata__", {}).get("mixoff.format"))
        except (ConfigError, ValueError):
            return False
    return False


def expert_blob_offsets(folder: str | os.PathLike, cfg: ModelConfig,
                        nbytes: int) -> dict[tuple[int, int], tuple[Path, int]]:
    """(expert layer, expert) -> (file, absolute byte offset) of every expert blob of a mixoff checkpoint (file
    names carry the decoder layer; dense layers have no blobs)."""
    folder = Path(folder)
    if not is_mixoff_checkpoint(folder):
        raise ConfigError(
            f"--placement disk reads experts straight from a mixoff-format checkpoint, and {folder} is not one. "
            f"Convert it once with `python -m mixoff_app quantize {folder} OUT_FOLDER` and pass --model OUT_FOLDER")
    files = sorted(folder.glob("*.safetensors"))
    fam = cfg.traits             # the family's row names each blob
    wanted = {fam.expert_blob_key(i, e): (j, e) for j, i in enumerate(cfg.moe_layers) for e in range(cfg.num_experts)}
    out: dict[tuple[int, int], tuple[Path, int]] = {}
    for path in files:
        header, data = safetensors_header(path)
        for key, info in header.items():
            where = wanted.get(key)
            if where is None:
                continue
            begin, end = info["data_offsets"]
            if end - begin != nbytes or info.get("dtype") != "U8":
                raise ConfigError(f"{path}: {key} holds {end - begin} bytes ({info.get('dtype')}), expected "
                                  f"{nbytes} (U8): the file was written by a different mixoff layout; quantize again")
            out[where] = (path, data + begin)
    missing = [(j, e) for j in range(cfg.num_moe_layers) for e in range(cfg.num_experts) if (j, e) not in out]
    if missing:
        j, e = missing[0]
        raise ConfigError(f"{folder}: no blob for layer {cfg.moe_layers[j]} expert {e} ({len(missing)} experts missing); "
                          f"the checkpoint is incomplete")
    return out


def _host_view(buf: torch.Tensor) -> memoryview:
    """The bytes of a contiguous host uint8 tensor as a writable memoryview (no Tensor method: a disk read
    is host work, and must not look like, or become, a device round trip)."""
    return memoryview((ctypes.c_char * buf.numel()).from_address(buf.data_ptr())).cast("B")


def pread_into(fd: int, buf: torch.Tensor, offset: int) -> int:
    mv = _host_view(buf)
    done = 0
    while done < len(mv):
        if hasattr(os, "preadv"):
            n = os.preadv(fd, [mv[done:]], offset + done)
        else:   # pragma: no cover - platforms without preadv
            os.lseek(fd, offset + done, os.SEEK_SET)
            n = os.readv(fd, [mv[done:]])
        if n <= 0:
            raise OSError(f"short read at offset {offset + done}")
        done += n
    return done


class DiskStore(SlotCopies):
    """Experts served from the checkpoint file; the host holds only ``staging`` pinned buffers.

    Eviction is free (the file always has every expert); a miss reads the blob into a staging buffer and
    copies it to the device slot, both on a reader thread (``disk_reader``), so the decode thread computes
    meanwhile and settles the slot just before it reads it. Staging buffers rotate so the read of one miss
    overlaps the device copy of the previous one.
    """

    placement = "disk"
    deferred_loads = True

    def __init__(self, cfg: ModelConfig, layout: ExpertLayout, folder: str | os.PathLike, staging: int = 2,
                 pin: bool = False) -> None:
        if staging < 1:
            raise ConfigError("the disk tier needs at least one staging buffer")
        self.cfg, self.layout, self.pinned = cfg, layout, pin
        self.folder = Path(folder)
        self._fds: dict[Path, int] = {}        # before anything can fail: __del__ closes them
        self._reader: Optional[DiskReader] = None      # made by attach: reads off the decode thread
        locs = expert_blob_offsets(self.folder, cfg, layout.nbytes)
        self._loc: dict[tuple[int, int], tuple[int, int]] = {}
        for key, (path, off) in locs.items():
            if path not in self._fds:
                self._fds[path] = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
            self._loc[key] = (self._fds[path], off)
        self.staging = host_buffer((staging, layout.nbytes), pin)
        self.bytes_read = 0

    def read_into(self, layer: int, expert: int, out: torch.Tensor) -> int:
        """Read one expert's blob into a contiguous host uint8 tensor of ``layout.nbytes``."""
        fd, off = self._loc[(layer, expert)]
        n = pread_into(fd, out, off)
        self.bytes_read += n
        return n

    def buffer(self, layer: int, expert: int) -> torch.Tensor:
        """A fresh host copy of the expert's bytes (inspection and tests; the cache uses ``read_into``)."""
        out = torch.empty(self.layout.nbytes, dtype=torch.uint8)
        self.read_into(layer, expert, out)
        return out

    def fill(self, layer: int, expert: int, tensors: dict[str, torch.Tensor]) -> None:
        raise ConfigError("the disk tier is read-only: experts come from the checkpoint file")

    def load_targets(self) -> Iterator[tuple[int, int, torch.Tensor]]:
        return iter(())          # nothing is read at load time: misses read on demand

    def attach(self, device: torch.device) -> None:
        super().attach(device)
        if self._reader is None:
            # The thread must not keep the store alive (closing the store stops the thread).
            ref = weakref.ref(self)
            self._reader = DiskReader(lambda layer, expert, buf: ref().read_into(layer, expert, buf), self.staging,
                                      self.device, self.copy_stream)

    def load_into(self, layer: int, expert: int, slot: torch.Tensor, victim: int,
                  ready: Optional["torch.cuda.Event"], done: Optional["torch.cuda.Event"]) -> int:
        """Hand the read (and the copy to the slot after it) to the reader thread; ``settle`` waits for it."""
        self._reader.submit(layer, expert, slot, ready, done)
        return self.layout.nbytes

    def settle(self, slot: torch.Tensor) -> None:
        self._reader.settle(slot)

    def resize(self, slots, residents, sizes):
        self._reader.drain()
        return super().resize(slots, residents, sizes)

    @property
    def nbytes(self) -> int:
        return self.staging.numel()

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
        for fd in self._fds.values():
            try:
                os.close(fd)
            except OSError:
                pass
        self._fds.clear()

    def __del__(self) -> None:
        self.close()
