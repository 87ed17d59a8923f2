"""Our server's ``/v1/mixoff/stats`` JSON back into the ``StatsSnapshot`` the panel renders, field by field, so a
page in front of a remote ``serve`` draws the same live panel as one with a local engine."""
from __future__ import annotations

from dataclasses import MISSING, fields
from typing import Any

from ..stats import LayerEvents, MemoryReading, StatsSnapshot

# JSON keys that the snapshot's attributes may spell otherwise (the JSON is a contract; attributes get renamed).
ALIASES = {"num_moe_layers": "num_layers"}


def _tuples(value: Any, depth: int) -> Any:
    if depth == 0 or not isinstance(value, list):
        return value
    return tuple(_tuples(v, depth - 1) for v in value)


DEPTH = {"cache_sizes": 1, "resident": 2, "layer_hits": 1, "layer_misses": 1, "hit_rate_history": 1, "routing": 3}


def _field(d: dict, name: str) -> Any:
    if name in d:
        return d[name]
    if ALIASES.get(name) in d:
        return d[ALIASES[name]]
    raise ValueError(f"the server's stats lack {name!r}: is the server a different mixoff version?")


def snapshot_from_dict(d: dict) -> StatsSnapshot:
    """Raises ValueError (naming the field) when ``d`` is not a stats snapshot."""
    if not isinstance(d, dict):
        raise ValueError("the server's stats are not a JSON object")
    try:
        return StatsSnapshot(**_values(d))
    except (TypeError, AttributeError) as exc:
        raise ValueError(f"the server's stats do not read as a snapshot ({exc})") from None


def _values(d: dict) -> dict:
    values = {}
    for f in fields(StatsSnapshot):
        if f.name not in d and f.default is not MISSING:
            continue              # a field an older server does not send (batching's): its default
        v = _field(d, f.name)
        if f.name == "memory":
            v = MemoryReading(**{m.name: v[m.name] for m in fields(MemoryReading) if m.name in v})
        elif f.name == "last_token":
            known = {f.name for f in fields(LayerEvents)}      # a newer server's extra kinds are not drawn here
            v = tuple(LayerEvents(**{k: tuple(x) for k, x in ev.items() if k in known}) for ev in v)
        else:
            v = _tuples(v, DEPTH.get(f.name, 0))
        values[f.name] = v
    return values
