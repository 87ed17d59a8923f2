"""What the page knows of a remote backend: which engine it is (from ``/v1/models``'s ``owned_by``), which model,
and the model's shape where someone vouches for it (our own server, a known model's preset, or the routing itself).
Unknown stays unknown (None) and the page says so."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Optional

from ..config import CacheConfig

ENGINES = {"mixoff": "mixoff serve", "vllm": "vLLM", "sglang": "SGLang"}
ROUTING_BACKENDS = ("mixoff", "vllm", "sglang")      # those that document return_routed_experts


@dataclass(frozen=True)
class RemoteInfo:
    where: str                         # the API's URL (never with a key)
    backend: str = "unknown"           # mixoff | vllm | sglang | openai (some other OpenAI-compatible server)
    model: str = ""                    # the id requests name
    model_name: str = ""               # for display
    models: tuple[str, ...] = ()       # everything /v1/models lists
    reason: str = ""
    num_moe_layers: Optional[int] = None   # expert layers
    num_experts: Optional[int] = None
    top_k: Optional[int] = None
    max_context: Optional[int] = None
    shape_from: str = ""               # who vouches for the shape: "the server", "preset NAME", "its routing"
    experts_seen: int = 0              # the highest expert id in any routing so far, + 1 (a lower bound)
    cache: CacheConfig = CacheConfig(sizes=(2,))   # ours: the server's; others: the k the panel replays with
    server: Optional[dict] = None      # our server's /v1/mixoff/info (no paths)
    connected: bool = False
    problem: str = ""                  # why the backend cannot be used right now (one sentence)
    model_path: str = ""               # (the page hides paths; a remote model has none here)
    device: str = "remote"

    @property
    def engine_name(self) -> str:
        return ENGINES.get(self.backend, "an OpenAI-compatible server")

    @property
    def returns_routing(self) -> bool:
        return self.backend in ROUTING_BACKENDS

    @property
    def experts_bound(self) -> int:
        """The largest k a control may offer: the expert count, else what the routing showed (at least 8)."""
        return self.num_experts or max(self.experts_seen, self.top_k or 2, 8)


def _card(models: Any, wanted: Optional[str]) -> dict:
    data = models.get("data") if isinstance(models, dict) else None
    if not isinstance(data, list) or not data or not all(isinstance(m, dict) and isinstance(m.get("id"), str)
                                                        for m in data):
        raise ValueError("its /v1/models lists no models ({\"data\": [{\"id\": ...}]})")
    if wanted is None:
        return data[0]
    for m in data:
        if m["id"] == wanted:
            return m
    raise ValueError(f"it serves no model {wanted!r}; it serves {', '.join(m['id'] for m in data)[:200]}")


def from_models(where: str, models: Any, wanted: Optional[str], server: Optional[dict]) -> RemoteInfo:
    """RemoteInfo from /v1/models (and our server's /v1/mixoff/info when it is ours). Raises ValueError when the
    answer is not a model list or lacks ``wanted``."""
    card = _card(models, wanted)
    owner = str(card.get("owned_by", "")).lower()
    backend = owner if owner in ENGINES else "openai"
    ids = tuple(m["id"] for m in models["data"])
    info = RemoteInfo(where=where, backend=backend, model=card["id"], model_name=card["id"], models=ids,
                      connected=True, reason=f"--backend {where}: {ENGINES.get(backend, 'an OpenAI-compatible server')}"
                                             f" serving {card['id']}")
    max_len = card.get("max_model_len")
    if isinstance(max_len, int) and max_len > 0:
        info = replace(info, max_context=max_len)
    if backend == "mixoff" and isinstance(server, dict):
        return _ours(info, server)
    return _known_shape(info, (card["id"], str(card.get("root") or "")))


def _ours(info: RemoteInfo, server: dict) -> RemoteInfo:
    cache = server.get("cache") or {}
    sizes = tuple(cache.get("sizes") or ()) or (2,)
    device = str(server.get("device", "")) + (f" ({server['gpu_name']})" if server.get("gpu_name") else "")
    return replace(info, model_name=str(server.get("model_name") or info.model),
                   num_moe_layers=server.get("num_moe_layers", server.get("num_layers")),
                   num_experts=server.get("num_experts"),
                   top_k=server.get("top_k"), max_context=server.get("max_context") or info.max_context,
                   shape_from="the server", server=server, device=f"{device} at {info.where}",
                   cache=CacheConfig(sizes=sizes, policy=cache.get("policy", "lru"), prefetch=cache.get("prefetch", 0)))


def _known_shape(info: RemoteInfo, names: tuple[str, ...]) -> RemoteInfo:
    from ..presets import PRESETS, preset_name
    name = next((n for n in map(preset_name, filter(None, names)) if n), None)
    if name is None:
        return info
    cfg = PRESETS[name]
    k = info.cache.sizes[0] if info.cache.sizes[0] <= cfg.num_experts else cfg.top_k
    return replace(info, num_moe_layers=cfg.num_moe_layers, num_experts=cfg.num_experts, top_k=cfg.top_k,
                   shape_from=f"preset {name}", cache=replace(info.cache, sizes=(max(k, cfg.top_k),)))


def with_routing_shape(info: RemoteInfo, layers: int, top_k: int, seen: int) -> RemoteInfo:
    """An answer's routing shows the layer count and top-k; the expert count only as a lower bound (``seen``), which
    is kept apart from the count."""
    info = replace(info, experts_seen=max(info.experts_seen, seen))
    if info.num_moe_layers is not None:
        return info
    return replace(info, num_moe_layers=layers, top_k=top_k, shape_from="its routing",
                   cache=replace(info.cache, sizes=(max(info.cache.sizes[0], top_k),)))
