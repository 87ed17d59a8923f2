"""Disk reads off the decode thread: one reader thread fills pinned staging buffers and queues their copies.

A miss served from disk costs a file read (tens of milliseconds for a Mixtral expert) before its copy can
start. Done on the decode thread, that read stalls everything queued behind it, prefetches included. Here
``submit`` only hands the job to the reader thread and returns; the decode thread goes on (computing the
experts that hit, issuing the next layer's prefetch) and calls ``settle(slot)`` just before it needs that
slot, which returns once the slot's copy is queued on the copy stream (CUDA: the slot's ``ready`` event is
recorded, so the usual ``wait_event`` orders compute after it) or done (CPU).

Jobs run one at a time in submission order, so two loads into one slot, or into one staging buffer, never
race; a staging buffer is read into again only after the copy that last read it has finished (an event,
waited on by the reader thread, not the decode thread). A failed read is raised by ``settle``.
"""
from __future__ import annotations

import queue
import threading
from typing import Callable, Optional

import torch

ReadInto = Callable[[int, int, torch.Tensor], int]    # (layer, expert, host buffer) -> bytes read


class _Job:
    __slots__ = ("layer", "expert", "slot", "ready", "done", "queued", "error")

    def __init__(self, layer, expert, slot, ready, done) -> None:
        self.layer, self.expert, self.slot, self.ready, self.done = layer, expert, slot, ready, done
        self.queued = threading.Event()
        self.error: Optional[BaseException] = None


class DiskReader:
    def __init__(self, read_into: ReadInto, staging: torch.Tensor, device: torch.device,
                 copy_stream: Optional["torch.cuda.Stream"] = None) -> None:
        self.read_into, self.staging = read_into, staging
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.copy_stream = copy_stream
        self._stage_done = [torch.cuda.Event() for _ in range(staging.shape[0])] if self.cuda else None
        self._next = 0
        self._jobs: "queue.Queue[Optional[_Job]]" = queue.Queue()
        self._pending: dict[int, _Job] = {}            # slot's data pointer -> its latest job
        self._thread = threading.Thread(target=self._run, name="mixoff-disk-reader", daemon=True)
        self._thread.start()

    def submit(self, layer: int, expert: int, slot: torch.Tensor, ready=None, done=None) -> None:
        """Read ``expert`` into ``slot`` (after the compute recorded in ``done``); returns at once."""
        job = _Job(layer, expert, slot, ready, done)
        self._pending[slot.data_ptr()] = job
        self._jobs.put(job)

    def settle(self, slot: torch.Tensor) -> None:
        """Block until the latest load into ``slot`` is queued on the copy stream (CUDA) or done (CPU)."""
        job = self._pending.pop(slot.data_ptr(), None)
        if job is None:
            return
        job.queued.wait()
        if job.error is not None:
            raise job.error

    def drain(self) -> None:
        """Wait for every submitted job (before slots are dropped or re-planned)."""
        for key in list(self._pending):
            job = self._pending.pop(key)
            job.queued.wait()

    def close(self) -> None:
        if self._thread.is_alive():
            self._jobs.put(None)
            self._thread.join(timeout=5)

    # ---- the reader thread ------------------------------------------------------------------------
    def _run(self) -> None:
        if self.cuda:
            torch.cuda.set_device(self.device)
        while True:
            job = self._jobs.get()
            if job is None:
                return
            try:
                self._load(job)
            except BaseException as exc:       # handed to the decode thread by settle
                job.error = exc
            finally:
                job.queued.set()

    def _load(self, job: _Job) -> None:
        i = self._next
        self._next = (i + 1) % self.staging.shape[0]
        buf = self.staging[i]
        if self.cuda:
            self._stage_done[i].synchronize()          # the copy that last read this buffer has finished
        self.read_into(job.layer, job.expert, buf)
        if self.cuda:
            cs = self.copy_stream
            with torch.cuda.stream(cs):
                if job.done is not None:
                    cs.wait_event(job.done)            # queued compute no longer reads the slot
                job.slot.copy_(buf, non_blocking=True)
                job.ready.record(cs)
                self._stage_done[i].record(cs)
        else:
            job.slot.copy_(buf)
