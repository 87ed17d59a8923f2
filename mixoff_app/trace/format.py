"""Routing traces and their file format.

A trace is the experts each generated token was routed to, per layer. File format (JSON Lines), one
line per (token, layer), optionally preceded by one header line:

    {"header": {"model": "...", "num_layers": 32, "num_experts": 8, "top_k": 2}}
    {"token": 0, "layer": 0, "experts": [3, 5], "weights": [0.62, 0.38]}
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Sequence, Union

Routing = list[list[tuple[int, ...]]]          # routing[token][layer] -> experts, first choice first


class TraceError(ValueError):
    """A trace file or record that cannot be read; the message names the file and line."""


# --------------------------------------------------------------------------------------------
# the trace and its file format


@dataclass
class Trace:
    header: dict
    routing: Routing
    weights: Optional[list[list[tuple[float, ...]]]] = None

    @property
    def num_tokens(self) -> int:
        return len(self.routing)

    @property
    def num_layers(self) -> int:
        if "num_layers" in self.header:
            return int(self.header["num_layers"])
        return len(self.routing[0]) if self.routing else 0

    @property
    def num_experts(self) -> int:
        if "num_experts" in self.header:
            return int(self.header["num_experts"])
        return 1 + max((e for tok in self.routing for ex in tok for e in ex), default=-1)

    @property
    def top_k(self) -> int:
        if "top_k" in self.header:
            return int(self.header["top_k"])
        return max((len(ex) for tok in self.routing for ex in tok), default=0)

    def records(self) -> Iterator[dict]:
        yield from records_from_routing(self.routing, self.weights)


def records_from_routing(routing: Sequence[Sequence[Sequence[int]]],
                         weights: Optional[Sequence[Sequence[Sequence[float]]]] = None) -> Iterator[dict]:
    """``routing[token][layer]`` (and the matching weights) -> trace records."""
    for t, layers in enumerate(routing):
        for l, experts in enumerate(layers):
            rec = {"token": t, "layer": l, "experts": [int(e) for e in experts]}
            if weights is not None:
                rec["weights"] = [round(float(w), 6) for w in weights[t][l]]
            yield rec


def write_trace(path: Union[str, Path], records: Union[Trace, Iterable[dict]], header: Optional[dict] = None) -> int:
    """Write a header line (if any) and one JSON line per record; returns the number of records."""
    if isinstance(records, Trace):
        header = records.header if header is None else header
        records = records.records()
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        if header is not None:
            f.write(json.dumps({"header": header}, separators=(",", ":")) + "\n")
        for rec in records:
            f.write(json.dumps(rec, separators=(",", ":")) + "\n")
            n += 1
    return n


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _parse_record(obj: Any, header: dict) -> tuple[int, int, tuple[int, ...], Optional[tuple[float, ...]]]:
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    missing = [k for k in ("token", "layer", "experts") if k not in obj]
    if missing:
        raise ValueError(f"missing field(s) {', '.join(missing)}")
    t, l, experts = obj["token"], obj["layer"], obj["experts"]
    if not _is_int(t) or t < 0:
        raise ValueError(f"'token' must be a whole number >= 0, not {t!r}")
    if not _is_int(l) or l < 0:
        raise ValueError(f"'layer' must be a whole number >= 0, not {l!r}")
    if not isinstance(experts, list) or not experts or not all(_is_int(e) and e >= 0 for e in experts):
        raise ValueError(f"'experts' must be a non-empty list of expert ids >= 0, not {experts!r}")
    if len(set(experts)) != len(experts):
        raise ValueError(f"'experts' has a duplicate expert: {experts!r}")
    num_experts, num_layers, top_k = header.get("num_experts"), header.get("num_layers"), header.get("top_k")
    if num_experts is not None and max(experts) >= num_experts:
        raise ValueError(f"expert id {max(experts)} is out of range for num_experts={num_experts}")
    if num_layers is not None and l >= num_layers:
        raise ValueError(f"layer {l} is out of range for num_layers={num_layers}")
    if top_k is not None and len(experts) != top_k:
        raise ValueError(f"{len(experts)} experts given but the header says top_k={top_k}")
    w = obj.get("weights")
    if w is not None:
        if (not isinstance(w, list) or len(w) != len(experts)
                or not all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in w)):
            raise ValueError(f"'weights' must be a list of {len(experts)} finite numbers, not {w!r}")
        w = tuple(float(x) for x in w)
    return t, l, tuple(experts), w


def _lines(f, path: str):
    """(line number, text) of a text file; a binary or non-UTF-8 file is one clear error naming it."""
    lineno = 0
    try:
        for lineno, line in enumerate(f, 1):
            if "\x00" in line:
                raise TraceError(f"{path}:{lineno}: not a text file (a JSONL trace is UTF-8 text, one JSON "
                                 f"object per line)")
            yield lineno, line
    except UnicodeDecodeError:
        raise TraceError(f"{path}:{lineno + 1}: not UTF-8 text (a JSONL trace is UTF-8 text, one JSON object "
                         f"per line); is this the right file?") from None


def read_trace(path: Union[str, Path]) -> Trace:
    """Read a JSONL trace (with or without a header line). Raises ``TraceError`` naming file:line."""
    path = str(path)
    header: dict = {}
    cells: dict[tuple[int, int], tuple] = {}
    where: dict[tuple[int, int], int] = {}
    try:
        f = open(path, encoding="utf-8")
    except OSError as e:
        raise TraceError(f"{path}: cannot open trace: {e.strerror or e}") from None
    with f:
        for lineno, line in _lines(f, path):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise TraceError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
            if isinstance(obj, dict) and "header" in obj:
                if cells or header:
                    raise TraceError(f"{path}:{lineno}: a header is only allowed on the first line")
                if not isinstance(obj["header"], dict):
                    raise TraceError(f"{path}:{lineno}: 'header' must be a JSON object")
                header = obj["header"]
                for key in ("num_layers", "num_experts", "top_k"):
                    if key in header and (not _is_int(header[key]) or header[key] < 1):
                        raise TraceError(f"{path}:{lineno}: header {key!r} must be a whole number >= 1, "
                                         f"not {header[key]!r}")
                continue
            try:
                t, l, experts, w = _parse_record(obj, header)
            except ValueError as e:
                raise TraceError(f"{path}:{lineno}: {e}") from None
            if (t, l) in cells:
                raise TraceError(f"{path}:{lineno}: token {t} layer {l} already given on line {where[t, l]}")
            cells[t, l] = (experts, w)
            where[t, l] = lineno
    if not cells:
        raise TraceError(f"{path}: the trace has no records")
    num_tokens = 1 + max(t for t, _ in cells)
    num_layers = header.get("num_layers") or 1 + max(l for _, l in cells)
    if len(cells) != num_tokens * num_layers:
        gap = next((t, l) for t in range(num_tokens) for l in range(num_layers) if (t, l) not in cells)
        raise TraceError(f"{path}: incomplete trace: no record for token {gap[0]} layer {gap[1]} "
                         f"(expected tokens 0..{num_tokens - 1} x layers 0..{num_layers - 1})")
    routing = [[cells[t, l][0] for l in range(num_layers)] for t in range(num_tokens)]
    have_w = [c[1] is not None for c in cells.values()]
    weights = None
    if all(have_w):
        weights = [[cells[t, l][1] for l in range(num_layers)] for t in range(num_tokens)]
    elif any(have_w):
        t, l = next(k for k, c in cells.items() if c[1] is None)
        raise TraceError(f"{path}:{where[t, l]}: 'weights' missing here but given on other lines")
    return Trace(header=dict(header), routing=routing, weights=weights)
