"""The panel and header for a page in front of a remote backend: pure functions to HTML, like ``panel.py``.

Our own server sends its stats snapshot, so the live panel is ``panel.render_panel`` as for a local engine;
vLLM, SGLang and other servers get ``render_remote``: the answer's routing as returned, a replay of it through our
cache simulator, the latency and speed measured by this page, and a line naming what the backend does not report.
"""
from __future__ import annotations

from html import escape
from types import SimpleNamespace
from typing import Any

from ..remote.info import RemoteInfo
from ..remote.snapshot import RemoteSnapshot
from . import panel
from .panel import _stat, fmt_bytes, fmt_pct, fmt_secs, fmt_tps

POLICY_COLUMNS = (("lru", "LRU"), ("lfu", "LFU"), ("lrfu", "LRFU"), ("belady", "Belady"))


def render_any_panel(snap: Any, info: Any) -> str:
    """The panel for whatever the engine's ``stats()`` gave: a local or remote mixoff snapshot, or a remote view."""
    if isinstance(snap, RemoteSnapshot):
        return render_remote(snap, info)
    body = panel.render_panel(snap, info)
    if isinstance(info, RemoteInfo) and info.problem:
        body = _problem(info.problem) + body
    return body


def render_any_info(info: Any) -> str:
    return render_remote_info(info) if isinstance(info, RemoteInfo) else panel.render_info(info)


# ---- header -------------------------------------------------------------------------------------
def _shape(info: RemoteInfo) -> str:
    if info.num_moe_layers is None:
        return "shape unknown until an answer brings its routing"
    experts = (f"{info.num_experts} experts" if info.num_experts else
               f"experts: unknown (ids up to {info.experts_seen - 1} seen)" if info.experts_seen else "experts: unknown")
    return f"{info.num_moe_layers} expert layers × {experts}, top-{info.top_k} (from {info.shape_from})"


def render_remote_info(info: RemoteInfo) -> str:
    cache = ""
    if info.backend == "mixoff" and info.server:
        cache = (f"k = {panel.fmt_k(info.cache.sizes)} of {info.num_experts} per layer on the server's device · "
                 f"{info.cache.policy}")
    elif info.connected:
        cache = f"none of ours: answers are replayed with k = {info.cache.sizes[0]} per layer (Cache settings)"
    chips = [("backend", f"{info.engine_name} at {info.where}"), ("model", info.model_name or info.model),
             ("device", info.device if info.backend == "mixoff" else ""), ("shape", _shape(info) if info.connected
                                                                           else ""),
             ("context", f"{info.max_context:,}" if info.max_context else ""), ("cache", cache)]
    if len(info.models) > 1:      # the server's whole list; --backend-model picks another
        chips.insert(2, ("models", ", ".join(info.models)))
    if info.server:
        chips.insert(3, ("weights", f"{info.server.get('dtype', '')} · {info.server.get('quant', '')}"))
    items = "".join(f'<span class="mx-chip"><small>{escape(k)}</small> {escape(str(v))}</span>' for k, v in chips if v)
    if info.problem:
        items += f'<span class="mx-chip mx-chip-error">{escape(info.problem)}</span>'
    return f'<div class="mx-info">{items}<div class="mx-reason"><b>Where:</b> {escape(info.reason)}</div></div>'


# ---- panel --------------------------------------------------------------------------------------
def _problem(text: str) -> str:
    return (f'<div class="mx-card mx-error"><div class="mx-card-h"><span>The backend cannot be used right now'
            f'</span></div><pre>{escape(text)}</pre></div>')


def _speed(snap: RemoteSnapshot) -> str:
    state = '<span class="mx-live">● generating</span>' if snap.generating else '<span class="mx-idle">idle</span>'
    stats = (_stat("speed (answer)", fmt_tps(snap.tokens_per_s), "mx-big") + _stat("time to first text",
                                                                                   fmt_secs(snap.ttft_s))
             + _stat("tokens", f"{snap.answer_tokens:,}" if snap.answer_tokens else "—"))
    prompt = f"prompt {snap.prompt_tokens:,} tokens" if snap.prompt_tokens else "prompt size not reported"
    foot = (f"measured by this page, network included · {prompt}"
            + (f" · ended: {escape(snap.finish_reason)}" if snap.finish_reason else "")
            + f" · {snap.answers:,} answers since start")
    return (f'<div class="mx-card"><div class="mx-card-h"><span>Speed</span>{state}</div>'
            f'<div class="mx-stats">{stats}</div><div class="mx-foot">{foot}</div></div>')


def _absent(snap: RemoteSnapshot) -> str:
    engine = {"vllm": "vLLM", "sglang": "SGLang"}.get(snap.backend, "This server")
    return (f'<div class="mx-card"><div class="mx-card-h"><span>Not reported</span></div>'
            f'<div class="mx-nogpu">{escape(engine)} keeps every expert on its GPUs and reports no expert cache: '
            f'cache residency, hits and misses, transfers and memory are absent here, not zero.</div></div>')


def _routing(snap: RemoteSnapshot, info: Any) -> str:
    if not snap.routing:
        note = snap.routing_note or "The routing of the next answer appears here, if the backend returns it."
        return (f'<div class="mx-card mx-routing-card"><div class="mx-card-h"><span>Routing</span></div>'
                f'<div class="mx-placeholder">{escape(note)}</div></div>')
    layers, k = len(snap.routing[0]), len(snap.routing[0][0])
    experts = max(snap.num_experts or 0, 1 + max(e for tok in snap.routing for ex in tok for e in ex))
    view = SimpleNamespace(routing=snap.routing, num_moe_layers=layers, num_experts=experts, top_k=k)
    html = panel.render_routing(view, info=None)
    if snap.prompt_routing:     # returned too; the strip draws the answer's tokens, as for a local engine
        html = html.replace("</span></div>", f" · {len(snap.prompt_routing)} prompt tokens routed too</span></div>", 1)
    return html


def _replay(snap: RemoteSnapshot) -> str:
    if snap.replaying:
        return (f'<div class="mx-card"><div class="mx-card-h"><span>What an expert cache would have done</span></div>'
                f'<div class="mx-placeholder">replaying this answer\'s {len(snap.routing)} tokens through the cache '
                f'simulator…</div></div>')
    if not snap.replay:
        return ""
    head = "".join(f"<th>{name}</th>" for _, name in POLICY_COLUMNS)
    rows = []
    for r in snap.replay:
        cells = "".join(f"<td>{fmt_pct(r.hit_rates[key])}</td>" for key, _ in POLICY_COLUMNS)
        moved = fmt_bytes(r.bytes_per_token) if r.bytes_per_token is not None else "—"
        mark = ' class="mx-chosen"' if r.sizes == (snap.replay_k,) * len(r.sizes) else ""
        rows.append(f"<tr{mark}><td>{escape(r.label)}</td>{cells}<td>{fmt_pct(r.cold_bound)}</td>"
                    f"<td>{r.misses_per_token:.1f}</td><td>{moved}</td></tr>")
    return (f'<div class="mx-card"><div class="mx-card-h"><span>What an expert cache would have done</span>'
            f'<span class="mx-sub">this answer\'s {len(snap.routing)} decoded tokens, replayed from an empty cache'
            f'</span></div><table class="mx-replay"><tr><th>cache per layer</th>{head}<th>cold bound</th>'
            f'<th>misses / token</th><th>moved / token</th></tr>{"".join(rows)}</table>'
            f'<div class="mx-foot">hit rates of our eviction policies; Belady is the offline optimum, the cold bound '
            f'what only first uses cost; misses and bytes are LRU\'s (bytes where the model\'s expert size is '
            f'known)</div></div>')


def render_remote(snap: RemoteSnapshot, info: Any = None) -> str:
    """The panel for vLLM, SGLang or another OpenAI-compatible server (``remote.snapshot.RemoteSnapshot``)."""
    top = _problem(snap.problem) if snap.problem else ""
    return ('<div class="mx-panel">' + top
            + '<div class="mx-cols">' + _speed(snap) + (_absent(snap) if snap.backend != "mixoff" else "") + '</div>'
            + _routing(snap, info) + _replay(snap) + '</div>')
