"""The expert routing of every token whose K/V sit in the cache, by position.

A turn that reuses the KV cache prefills only its new tokens, so the routing of the reused ones was computed
in an earlier answer; this log keeps it, aligned with the engine's cached token ids, so an answer's prompt
routing (``prompt_routed_experts`` in the API) covers the whole prompt, not only what this turn prefilled.
Routing at a position depends only on the tokens up to it, and the engine reuses the cache only where a fresh
prefill would compute the same numbers, so a kept row is the row a fresh prefill would give.

Rows arrive as segments: a prefill chunk is one device tensor [T, k] per expert layer, read to the host only
when someone asks (no sync in the decode loop); decoded tokens arrive as host tuples.
"""
from __future__ import annotations

from typing import Sequence

Row = tuple[tuple[int, ...], ...]         # one token: per expert layer, the chosen experts (first choice first)


def chunk_rows(per_layer: Sequence) -> list[Row]:
    """A prefill chunk's routing (per layer, [T, k] expert ids: tensors or nested lists) -> one row per token."""
    layers = [x.tolist() if hasattr(x, "tolist") else list(x) for x in per_layer]
    return [tuple(tuple(int(e) for e in layer[t]) for layer in layers) for t in range(len(layers[0]) if layers else 0)]


class Segment:
    """Rows of consecutive positions: host rows, or a prefill chunk's tensors until first read."""

    def __init__(self, rows: Sequence[Row] = (), chunk: Sequence = ()) -> None:
        self._rows = list(rows) if not chunk else None
        self._chunk = list(chunk)
        self.size = len(self._rows) if self._rows is not None else int(chunk[0].shape[0])

    def rows(self) -> list[Row]:
        if self._rows is None:
            self._rows, self._chunk = chunk_rows(self._chunk), []
        return self._rows

    def head(self, n: int) -> "Segment":
        return self if n >= self.size else Segment(self.rows()[:n])


class RouteLog:
    def __init__(self) -> None:
        self._segments: list[Segment] = []

    def __len__(self) -> int:
        return sum(s.size for s in self._segments)

    def keep(self, n: int) -> None:
        """Keep the first ``n`` positions (the cache keeps their K/V), forget the rest."""
        kept, total = [], 0
        for s in self._segments:
            if total >= n:
                break
            kept.append(s.head(n - total))
            total += kept[-1].size
        self._segments = kept

    def extend(self, segments: Sequence[Segment]) -> None:
        self._segments.extend(s for s in segments if s.size)

    def segments(self) -> list[Segment]:
        return list(self._segments)

    def rows(self) -> list[Row]:
        return [r for s in self._segments for r in s.rows()]

    def settle(self, cached: int, segments: Sequence[Segment]) -> None:
        """After an answer: append its rows, so the log again matches the ``cached`` positions of the KV cache.
        Rows that would not line up (the answer stopped before its prefill, or failed) are never guessed."""
        added = sum(s.size for s in segments)
        have = len(self)
        if have + added == cached:
            self.extend(segments)
        elif have != cached:
            self.keep(0)
