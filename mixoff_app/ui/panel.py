"""The live panel: pure functions from a ``StatsSnapshot`` (and ``EngineInfo``) to HTML.

Nothing here touches the engine, gradio or torch; every figure on the panel is read from the snapshot,
so each function is unit-tested by building a real ``Stats`` and taking its snapshot.

Sizes use binary multiples labelled GB/MB/KB, as GPU tools and torch report them.
"""
from __future__ import annotations

import base64
import colorsys
import functools
import itertools
import struct
import zlib
from html import escape
from typing import Any, Optional, Sequence

from ..config import format_k
from ..stats import ROLLING_TOKENS

# Cell states of the cache grid, in the order the legend lists them.
EMPTY, RESIDENT, HIT, MISS, PREFETCHED, EVICTED = "empty", "resident", "hit", "miss", "prefetch", "evicted"
ON_CPU = "cpu"      # a miss run on the CPU from its host copy (--cpu-experts): not loaded, nothing evicted
LEGEND = (
    (RESIDENT, "in device cache"),
    (HIT, "hit (this token)"),
    (MISS, "miss: loaded"),
    (ON_CPU, "miss: ran on CPU"),
    (PREFETCHED, "prefetched"),
    (EVICTED, "evicted"),
    (EMPTY, "in host RAM"),
)

ROUTING_TOKENS = 160          # the routing strip shows the last answer's latest tokens
MANY_EXPERTS = 16             # above this many experts: the grid is one image, routing a heat map
GRID_DOM_MAX = 1024           # above this many cells (or MANY_EXPERTS) the grid is one image, not DOM cells
HEAT_LEVELS = 8               # shades of the routing heat map (0, then 1..8 by share of the busiest expert)
CELL = 4                      # image grid: pixels per cell (3 of colour, 1 of gap)
SPARK_POINTS = 120            # at most this many points on the hit-rate sparkline
SPARK_WINDOW = 8              # the sparkline smooths per-token hit rates over this many tokens

# Expert colours for the routing strip: tableau-10, then evenly spaced hues for bigger models.
_TAB10 = ("#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f",
          "#edc948", "#b07aa1", "#ff9da7", "#9c755f", "#bab0ac")


# ---- numbers ------------------------------------------------------------------------------------
def fmt_bytes(n: float) -> str:
    """1536 -> '1.5 KB'; binary multiples, three significant figures."""
    n = float(n)
    if n < 1024:
        return f"{int(n)} B"
    for unit in ("KB", "MB", "GB", "TB"):
        n /= 1024
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if n >= 100 else f"{n:.1f} {unit}" if n >= 10 else f"{n:.2f} {unit}"
    raise AssertionError("unreachable")


def fmt_rate(bytes_per_s: float) -> str:
    return "—" if bytes_per_s <= 0 else fmt_bytes(bytes_per_s) + "/s"


def fmt_pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def fmt_secs(s: float) -> str:
    if s <= 0:
        return "—"
    return f"{1000 * s:.0f} ms" if s < 1 else f"{s:.2f} s"


fmt_k = format_k        # experts per layer on the device: "4", or "5-6" when a plan gives layers different k


def fmt_tps(x: float) -> str:
    return "—" if x <= 0 else f"{x:.1f} tok/s" if x < 100 else f"{x:.0f} tok/s"


# ---- the cache grid -----------------------------------------------------------------------------
_STATES = (EMPTY, RESIDENT, HIT, MISS, PREFETCHED, EVICTED, ON_CPU)    # state codes: index in this tuple


def state_codes(snap):
    """[L, E] uint8 array of state codes (index into ``_STATES``) for the latest token: what ``cell_states``
    says, computed with one array write per event list rather than a Python step per cell.

    What the token did wins over what merely sits in the cache: a miss run on the CPU, then a miss (loaded on
    demand) over a prefetch over a hit; an evicted expert that is no longer resident shows as evicted."""
    import numpy as np

    L, E = snap.num_moe_layers, snap.num_experts
    out = np.zeros((L, E), dtype=np.uint8)
    code = {st: i for i, st in enumerate(_STATES)}

    def mark(layer, experts, state, keep=None):
        ex = [e for e in experts if 0 <= e < E and (keep is None or e not in keep)]
        if ex:
            out[layer, ex] = code[state]

    for layer in range(L):
        resident = set(e for e in snap.resident[layer] if e >= 0) if layer < len(snap.resident) else set()
        mark(layer, resident, RESIDENT)
        ev = snap.last_token[layer] if layer < len(snap.last_token) else None
        if ev is not None:       # lowest priority first: later writes win
            mark(layer, ev.evicted, EVICTED, keep=resident)
            mark(layer, ev.hits, HIT)
            mark(layer, ev.prefetched, PREFETCHED)
            mark(layer, ev.misses, MISS)
            mark(layer, getattr(ev, "cpu", ()), ON_CPU)
    return out


def cell_states(snap) -> list[list[str]]:
    """Per layer, per expert: the state the grid shows for the latest token (see ``state_codes``)."""
    return [[_STATES[c] for c in row] for row in state_codes(snap).tolist()]


def _layer_label_every(num_layers: int) -> int:
    return 1 if num_layers <= 8 else 4 if num_layers <= 32 else 8


# Image grid colours (light theme's; "empty" and the gaps are translucent so the card shows through in
# both themes).
_GRID_RGBA = {EMPTY: (148, 163, 184, 70), RESIDENT: (147, 180, 220, 255), HIT: (34, 163, 90, 255),
              MISS: (224, 72, 62, 255), PREFETCHED: (139, 92, 246, 255), EVICTED: (245, 158, 11, 255),
              ON_CPU: (14, 165, 233, 255)}

def _cells(codes, cell: int, gap: int):
    """[L, E] palette indices -> [L, cell, E, cell] pixels: ``cell - 1`` pixels of colour, then a one-pixel gap."""
    import numpy as np

    L, E = codes.shape
    img = np.full((L, cell, E, cell), gap, dtype=np.uint8)
    img[:, :cell - 1, :, :cell - 1] = codes[:, None, :, None]
    return img


def grid_png(codes, cell: int = CELL) -> bytes:
    """``codes`` ([L, E] state codes) as a PNG: layers down, experts across, ``cell`` pixels per cell with a
    one-pixel gap; an evicted expert is a ring (its centre shows as empty)."""
    import numpy as np

    L, E = codes.shape
    img = _cells(codes, cell, gap=len(_STATES))
    if cell > 3:
        inner = img[:, 1:cell - 2, :, 1:cell - 2]
        inner[np.broadcast_to((codes == _STATES.index(EVICTED))[:, None, :, None], inner.shape)] = 0
    img = img.reshape(L * cell, E * cell)
    palette = [_GRID_RGBA[st][:3] for st in _STATES] + [(255, 255, 255)]
    alpha = [_GRID_RGBA[st][3] for st in _STATES] + [0]
    return _png(E * cell, L * cell, palette, [r.tobytes() for r in img], alpha)


def _ticks(n: int, want: int = 8) -> list[int]:
    """About ``want`` round tick positions in 0..n-1."""
    step = next((s for s in (1, 2, 4, 8, 16, 32, 64, 128, 256) if n / s <= want), 512)
    return list(range(0, n, step))


def _layer_names(snap, info: Any = None) -> list[str]:
    labels = tuple(getattr(info, "expert_layers", ()) or ())
    return [str(labels[i]) if i < len(labels) else str(i) for i in range(snap.num_moe_layers)]


def _axes(img: str, L: int, E: int, layer_names: Sequence[str]) -> str:
    """A layers x experts image with expert ticks above and layer ticks on the left."""
    xt = "".join(f'<span style="left:{100 * (e + 0.5) / E:.2f}%">E{e}</span>' for e in _ticks(E))
    yt = "".join(f'<span style="top:{100 * (i + 0.5) / L:.2f}%">{escape(layer_names[i])}</span>'
                 for i in _ticks(L, 12))
    return (f'<div class="mx-gridwrap"><div class="mx-yt">{yt}</div><div class="mx-gridbox">'
            f'<div class="mx-xt">{xt}</div>{img}</div></div>')


def render_grid_image(snap, codes, head: str, legend: str, layer_names: Sequence[str]) -> str:
    """The many-expert grid (e.g. 128 experts x 48 layers): one PNG, axis ticks, and a hover (the page's
    script reads ``data-*``: layer names and one letter of state per cell) naming layer, expert and state."""
    L, E = snap.num_moe_layers, snap.num_experts
    uri = "data:image/png;base64," + base64.b64encode(grid_png(codes)).decode()
    data = (codes + ord("0")).tobytes().decode("ascii")          # one digit per cell, row-major
    states_attr = ",".join(f"{i}:{st}" for i, st in enumerate(_STATES))
    img = (f'<img class="mx-gridimg" src="{uri}" data-mx="grid" data-cols="{E}" data-rows="{L}" '
           f'data-layers="{",".join(layer_names)}" data-names="{states_attr}" data-s="{data}" '
           f'alt="expert cache: {E} experts by {L} layers, this token\'s hits, misses and evictions">')
    return (f'<div class="mx-card mx-grid-card">{head}{_axes(img, L, E, layer_names)}'
            f'<div class="mx-legend">{legend}</div></div>')


def render_grid(snap, info: Any = None) -> str:
    """Experts as rows, layers as columns: 8 x 32 for Mixtral-8x7B, 8 x 56 for 8x22B, all in one card. Many
    experts (Qwen3-30B-A3B's 128 x 48 = 6,144 cells) are one image instead, experts across, layers down."""
    import numpy as np

    codes = state_codes(snap)
    L, E = snap.num_moe_layers, snap.num_experts
    n = np.bincount(codes.ravel(), minlength=len(_STATES))
    counts = {st: int(n[i]) for i, st in enumerate(_STATES)}
    legend = "".join(f'<span class="mx-key"><i class="mx-c mx-{s}"></i>{escape(text)}'
                     f'{"" if s in (EMPTY, RESIDENT) else f" <b>{counts[s]}</b>"}</span>'
                     for s, text in LEGEND)
    k = fmt_k(snap.cache_sizes)
    image = E > MANY_EXPERTS or E * L > GRID_DOM_MAX
    head = (f'<div class="mx-card-h"><span>Expert cache</span>'
            f'<span class="mx-sub">k = {k} of {E} per layer · {escape(snap.policy)} · {escape(snap.placement)}'
            f' · {"experts →, layers ↓ · hover a cell" if image else "layers →"}</span></div>')
    if image:
        return render_grid_image(snap, codes, head, legend, _layer_names(snap, info))
    states = [[_STATES[c] for c in row] for row in codes.tolist()]
    names = _layer_names(snap, info)
    every = _layer_label_every(L)
    parts = [f'<div class="mx-grid" style="--mx-layers:{L}" role="img" '
             f'aria-label="expert cache: {E} experts by {L} layers">']
    parts.append('<span class="mx-ax"></span>')
    for layer in range(L):
        label = names[layer] if layer % every == 0 else ""
        parts.append(f'<span class="mx-ax mx-ax-l">{label}</span>')
    for e in range(E):
        parts.append(f'<span class="mx-ax mx-ax-e">E{e}</span>')
        for layer in range(L):
            s = states[layer][e]
            parts.append(f'<i class="mx-c mx-{s}" title="layer {names[layer]}, expert {e}: {s}"></i>')
    parts.append("</div>")
    return f'<div class="mx-card mx-grid-card">{head}{"".join(parts)}<div class="mx-legend">{legend}</div></div>'


# ---- hit rate -----------------------------------------------------------------------------------
def smooth(values: Sequence[float], window: int = SPARK_WINDOW, points: int = SPARK_POINTS) -> list[float]:
    """Trailing mean over ``window`` tokens, then thinned to at most ``points`` values."""
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    if len(out) > points:
        step = len(out) / points
        out = [out[min(len(out) - 1, int((j + 1) * step) - 1)] for j in range(points)]
    return out


def sparkline(values: Sequence[float], width: int = 240, height: int = 44) -> str:
    """A small SVG line of values in [0, 1] (hit rate per token, smoothed)."""
    ys = smooth(values)
    frame = (f'<svg class="mx-spark" viewBox="0 0 {width} {height}" preserveAspectRatio="none" '
             f'width="100%" height="{height}" role="img" aria-label="hit rate over time">'
             f'<line x1="0" y1="{height / 2}" x2="{width}" y2="{height / 2}" class="mx-spark-mid"/>')
    if len(ys) < 2:
        return frame + f'<text x="4" y="{height / 2 - 4}" class="mx-spark-empty">no tokens yet</text></svg>'
    dx = width / (len(ys) - 1)
    pts = " ".join(f"{i * dx:.1f},{(1 - y) * (height - 4) + 2:.1f}" for i, y in enumerate(ys))
    area = f"0,{height} {pts} {width},{height}"
    return (frame + f'<polygon points="{area}" class="mx-spark-area"/>'
            f'<polyline points="{pts}" class="mx-spark-line"/></svg>')


def _stat(label: str, value: str, cls: str = "") -> str:
    return (f'<div class="mx-stat {cls}"><div class="mx-stat-v">{value}</div>'
            f'<div class="mx-stat-l">{escape(label)}</div></div>')


def render_hit_rate(snap) -> str:
    stats = (_stat("this answer", fmt_pct(snap.answer_hit_rate), "mx-big")
             + _stat(f"last {ROLLING_TOKENS} tokens", fmt_pct(snap.rolling_hit_rate))
             + _stat("since start", fmt_pct(snap.hit_rate)))
    foot = (f'{snap.hits:,} hits · {snap.misses:,} misses · {snap.evictions:,} evictions'
            + (f' · prefetch {snap.prefetch_used:,}/{snap.prefetch_issued:,} used' if snap.prefetch_issued else "")
            + (f' · {snap.cpu_experts:,} misses ran on the CPU' if getattr(snap, "cpu_experts", 0) else ""))
    return (f'<div class="mx-card"><div class="mx-card-h"><span>Hit rate</span>'
            f'<span class="mx-sub">per token, smoothed over {SPARK_WINDOW}</span></div>'
            f'<div class="mx-stats">{stats}</div>{sparkline(snap.hit_rate_history)}'
            f'<div class="mx-foot">{foot}</div></div>')


# ---- speed --------------------------------------------------------------------------------------
def fmt_answers(snap) -> str:
    """How many answers run (and wait) now, and how many rows the latest decode step carried."""
    running, waiting = getattr(snap, "running_answers", 0), getattr(snap, "waiting_answers", 0)
    if not running and not waiting:
        return "no answer running"
    text = f"{running} of {getattr(snap, 'max_batch', 1)} answers running"
    if getattr(snap, "batch_rows", 0) > 1:
        text += f" · {snap.batch_rows} in the latest step"
    return text + (f" · {waiting} waiting" if waiting else "")


def render_speed(snap) -> str:
    state = '<span class="mx-live">● generating</span>' if snap.generating else '<span class="mx-idle">idle</span>'
    stats = (_stat("current (all answers)", fmt_tps(snap.tokens_per_s), "mx-big")
             + _stat("average (answer)", fmt_tps(snap.avg_tokens_per_s))
             + _stat("time to first token", fmt_secs(snap.ttft_s)))
    foot = (f'{fmt_answers(snap)} · {snap.answer_tokens:,} tokens this answer · prompt {snap.prefill_tokens:,} '
            f'tokens in {fmt_secs(snap.prefill_s)} · {snap.tokens_total:,} tokens since start')
    return (f'<div class="mx-card"><div class="mx-card-h"><span>Speed</span>{state}</div>'
            f'<div class="mx-stats">{stats}</div><div class="mx-foot">{foot}</div></div>')


# ---- memory -------------------------------------------------------------------------------------
def _bar(used: int, total: int) -> str:
    frac = min(1.0, used / total) if total > 0 else 0.0
    return f'<div class="mx-bar"><i style="width:{100 * frac:.1f}%"></i></div>'


def render_memory(snap) -> str:
    m = snap.memory
    rows = []
    if m.gpu_name is None:
        rows.append('<div class="mx-nogpu"><b>No GPU</b> — this machine has no CUDA GPU in use; the '
                    '"device" cache lives in host RAM, so there is no VRAM to show.</div>')
    else:
        rows.append(f'<div class="mx-row"><span>VRAM <small>{escape(m.gpu_name)}</small></span>'
                    f'<span>{fmt_bytes(m.vram_used)} / {fmt_bytes(m.vram_total)}</span></div>'
                    + _bar(m.vram_used, m.vram_total))
        rows.append(f'<div class="mx-row"><span>torch allocated / reserved</span>'
                    f'<span>{fmt_bytes(m.torch_allocated)} / {fmt_bytes(m.torch_reserved)}</span></div>')
    rows.append(f'<div class="mx-row"><span>System RAM</span>'
                f'<span>{fmt_bytes(m.system_ram_used)} / {fmt_bytes(m.system_ram_total)}</span></div>'
                + _bar(m.system_ram_used, m.system_ram_total))
    rows.append(f'<div class="mx-row"><span>Process RAM (RSS)</span><span>{fmt_bytes(m.process_rss)}</span></div>')
    rows.append(f'<div class="mx-row"><span>Host expert buffers · pinned</span>'
                f'<span>{fmt_bytes(m.host_expert_bytes)} · {fmt_bytes(m.pinned_bytes)}</span></div>')
    return f'<div class="mx-card"><div class="mx-card-h"><span>Memory</span></div>{"".join(rows)}</div>'


# ---- transfers ----------------------------------------------------------------------------------
def render_transfers(snap) -> str:
    stats = (_stat("host → device", fmt_bytes(snap.bytes_h2d), "mx-big")
             + _stat("bandwidth (answer)", fmt_rate(snap.copy_bandwidth))
             + _stat("device → host", fmt_bytes(snap.bytes_d2h)))
    foot = f"read from disk {fmt_bytes(snap.bytes_disk)}" if snap.bytes_disk else "bytes moved since start"
    return (f'<div class="mx-card"><div class="mx-card-h"><span>Transfers</span></div>'
            f'<div class="mx-stats">{stats}</div><div class="mx-foot">{foot}</div></div>')


# ---- routing strip ------------------------------------------------------------------------------
@functools.lru_cache(maxsize=8)
def _expert_colors(num_experts: int) -> tuple[str, ...]:
    if num_experts <= len(_TAB10):
        return _TAB10[:num_experts]
    return tuple(_hls(i / num_experts) for i in range(num_experts))


def _hls(h: float) -> str:
    r, g, b = colorsys.hls_to_rgb(h, 0.55, 0.6)
    return f"#{int(r * 255):02x}{int(g * 255):02x}{int(b * 255):02x}"


def expert_colors(num_experts: int) -> list[str]:
    """Tableau-10 up to 10 experts, else expert e at hue e/E (the strip is drawn up to MANY_EXPERTS)."""
    return list(_expert_colors(num_experts))


def _png(width: int, height: int, palette: Sequence[tuple[int, int, int]], rows: Sequence[bytes],
         alpha: Sequence[int] = ()) -> bytes:
    """An 8-bit palette PNG (``alpha``: opacity of the first palette entries), standard library only."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)
    raw = b"".join(b"\x00" + r for r in rows)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 3, 0, 0, 0))
            + chunk(b"PLTE", b"".join(bytes(c) for c in palette))
            + (chunk(b"tRNS", bytes(alpha)) if alpha else b"")
            + chunk(b"IDAT", zlib.compress(raw, 1)) + chunk(b"IEND", b""))


def _rgb(hex_color: str) -> tuple[int, int, int]:
    h = hex_color.lstrip("#")
    return int(h[0:2], 16), int(h[2:4], 16), int(h[4:6], 16)


@functools.lru_cache(maxsize=8)
def _expert_rgb(num_experts: int) -> list[tuple[int, int, int]]:
    return [_rgb(c) for c in expert_colors(num_experts)]


def routing_png(routing: Sequence[Sequence[Sequence[int]]], num_layers: int, num_experts: int,
                top_k: int) -> bytes:
    """Tokens along x, layers down y; each layer is ``top_k`` pixel rows, one per chosen expert (in the
    router's order), coloured by expert id, then one background row to separate layers."""
    import numpy as np

    colors = _expert_rgb(num_experts)
    bg, none = len(colors), len(colors) + 1
    palette = list(colors) + [(255, 255, 255), (148, 163, 184)]
    alpha = [255] * len(colors) + [0, 70]      # layer gaps show the card; "no routing" is a faint grey
    T = len(routing)
    ids = None
    try:                                       # the usual case, a full [T, L, k] block: no Python per pixel
        flat = itertools.chain.from_iterable(itertools.chain.from_iterable(routing))
        ids = np.fromiter(flat, dtype=np.int32, count=T * num_layers * top_k).reshape(T, num_layers, top_k)
        if any(len(tok) != num_layers for tok in routing):
            ids = None
    except ValueError:                         # fewer values: some layer chose fewer experts
        pass
    if ids is None:
        ids = np.full((T, num_layers, top_k), -1, dtype=np.int32)
        for t, tok in enumerate(routing):
            for layer, ex in enumerate(tok[:num_layers]):
                ids[t, layer, :len(ex[:top_k])] = ex[:top_k]
    ids = np.where((ids >= 0) & (ids < num_experts), ids, none).astype(np.uint8)
    img = np.full((num_layers, top_k + 1, T), bg, dtype=np.uint8)
    img[:, :top_k] = ids.transpose(1, 2, 0)                                  # [L, k, T]
    img = img.reshape(-1, T)
    return _png(T, img.shape[0], palette, [r.tobytes() for r in img], alpha)


def routing_counts(routing: Sequence[Sequence[Sequence[int]]], num_layers: int, num_experts: int):
    """[L, E] how many of the answer's tokens chose each expert in each layer."""
    import numpy as np

    counts = np.zeros((num_layers, num_experts), dtype=np.int32)
    for tok in routing:
        for layer, ex in enumerate(tok[:num_layers]):
            ex = [e for e in ex if 0 <= e < num_experts]
            if ex:
                np.add.at(counts[layer], ex, 1)
    return counts


# Heat map shades: "never chosen" is the grid's translucent empty; then light to dark indigo.
_HEAT_RGBA = [(148, 163, 184, 70)] + [
    (round(186 + (49 - 186) * t), round(196 + (46 - 196) * t), round(250 + (129 - 250) * t), 255)
    for t in (i / (HEAT_LEVELS - 1) for i in range(HEAT_LEVELS))]


def heat_levels(counts):
    """[L, E] shade levels: 0 for never chosen, else 1..HEAT_LEVELS by the share of the busiest cell's count."""
    import numpy as np

    top = max(1, int(counts.max()))
    return np.where(counts > 0, np.ceil(counts * HEAT_LEVELS / top), 0).astype(np.uint8)


def heat_png(counts, cell: int = CELL) -> bytes:
    """The routing heat map: layers down, experts across, each cell shaded by how often it was chosen."""
    L, E = counts.shape
    img = _cells(heat_levels(counts), cell, gap=len(_HEAT_RGBA)).reshape(L * cell, E * cell)
    palette = [c[:3] for c in _HEAT_RGBA] + [(255, 255, 255)]
    alpha = [c[3] for c in _HEAT_RGBA] + [0]
    return _png(E * cell, L * cell, palette, [r.tobytes() for r in img], alpha)


def render_routing_heat(snap, info: Any = None) -> str:
    """Many experts (Qwen3-30B-A3B: 128 x 48 layers, top-8): one colour per expert id cannot be told apart, so the
    routing is shown as how often each expert was chosen in each layer over the whole answer, a heat map on the
    grid's axes; the hover names layer, expert and its count."""
    L, E, T = snap.num_moe_layers, snap.num_experts, len(snap.routing)
    head = (f'<div class="mx-card-h"><span>Routing</span><span class="mx-sub">last answer, {T} tokens · how '
            f'often each expert was chosen · experts →, layers ↓ · hover a cell</span></div>')
    if not T:
        body = ('<div class="mx-placeholder">The routing of the next answer appears here: how often each expert '
                'is chosen, per layer.</div>')
        return f'<div class="mx-card mx-routing-card">{head}{body}</div>'
    counts = routing_counts(snap.routing, L, E)
    names = _layer_names(snap, info)
    uri = "data:image/png;base64," + base64.b64encode(heat_png(counts)).decode()
    img = (f'<img class="mx-gridimg mx-heat" src="{uri}" data-mx="heat" data-cols="{E}" data-rows="{L}" '
           f'data-tokens="{T}" data-layers="{",".join(names)}" data-n="{",".join(map(str, counts.ravel().tolist()))}" '
           f'alt="routing of the last answer: how often each of {E} experts was chosen in each of {L} layers">')
    top = int(counts.max())
    stops = ", ".join(f"rgb{c[:3]}" for c in _HEAT_RGBA[1:])
    legend = (f'<span class="mx-key"><i class="mx-c mx-empty"></i>never chosen</span>'
              f'<span class="mx-key mx-heatkey">1 token<i class="mx-heatbar" '
              f'style="background:linear-gradient(to right, {stops})"></i>{top} of {T} tokens '
              f'({100 * top / T:.0f}%)</span>')
    return (f'<div class="mx-card mx-routing-card">{head}{_axes(img, L, E, names)}'
            f'<div class="mx-legend">{legend}</div></div>')


def render_routing(snap, max_tokens: int = ROUTING_TOKENS, info: Any = None) -> str:
    """The last answer's routing: for few experts a strip (tokens across, each layer's choices coloured by
    expert id); for many, a heat map of how often each was chosen (``render_routing_heat``)."""
    if snap.num_experts > MANY_EXPERTS:
        return render_routing_heat(snap, info)
    routing = snap.routing[-max_tokens:]
    colors = expert_colors(snap.num_experts)
    legend = "".join(f'<span class="mx-key"><i class="mx-c" style="background:{c}"></i>E{e}</span>'
                     for e, c in enumerate(colors))
    skipped = len(snap.routing) - len(routing)
    sub = (f"last answer, {len(snap.routing)} tokens" + (f" (latest {len(routing)} shown)" if skipped else "")
           + " · tokens → · layers ↓")
    head = f'<div class="mx-card-h"><span>Routing</span><span class="mx-sub">{sub}</span></div>'
    if not routing:
        body = '<div class="mx-placeholder">The routing of the next answer appears here: one column per token.</div>'
    else:
        png = routing_png(routing, snap.num_moe_layers, snap.num_experts, snap.top_k)
        rows = snap.num_moe_layers * (snap.top_k + 1)
        # Never fewer pixels than rows: scaling down would merge layers.
        height = max(48, min(220, rows * 4)) if rows <= 220 else rows
        width = min(100, 100 * len(routing) / 48)    # a short answer keeps square-ish cells
        uri = "data:image/png;base64," + base64.b64encode(png).decode()
        body = (f'<img class="mx-routing" src="{uri}" alt="routing of the last answer: {len(routing)} tokens by '
                f'{snap.num_moe_layers} layers" style="width:{width:.0f}%;height:{height}px">')
    return (f'<div class="mx-card mx-routing-card">{head}{body}'
            f'<div class="mx-legend">{legend}</div></div>')


# ---- header and whole panel ---------------------------------------------------------------------
def render_info(info: Any) -> str:
    """Which model runs, why, and how it is laid out (from ``EngineInfo``)."""
    if info is None:
        return ""
    cache = getattr(info, "cache", None)
    cache_txt = ""
    if cache is not None:
        k = fmt_k(cache.sizes) if cache.sizes else str(info.num_experts)
        cache_txt = (f"k = {k} of {info.num_experts} experts per layer on the device · {cache.policy}"
                     + (f" · prefetch {cache.prefetch}" if cache.prefetch else ""))
    device = info.device + (f" ({info.gpu_name})" if info.gpu_name else "")
    chips = [("model", info.model_name), ("device", device), ("weights", f"{info.dtype} · {info.quant}"),
             ("shape", f"{info.num_moe_layers} layers × {info.num_experts} experts, top-{info.top_k}"
                       + (" + a shared expert" if getattr(info, "shared_expert", False) else "")
                       + (f" ({getattr(info, 'decoder_layers', 0) - info.num_moe_layers} dense layers)"
                          if getattr(info, "decoder_layers", 0) > info.num_moe_layers else "")
                       + f", context {info.max_context:,}"),
             ("family", getattr(info, "family", "")),
             ("cache", cache_txt),
             ("misses on the CPU", {"all": "all", "cost": "by the cost model"}.get(getattr(info, "cpu_experts", "off"), ""))]
    items = "".join(f'<span class="mx-chip"><small>{escape(k)}</small> {escape(str(v))}</span>'
                    for k, v in chips if v)
    reason = (f'<div class="mx-reason"><b>Why this model:</b> {escape(info.reason)}</div>'
              if getattr(info, "reason", "") else "")
    return f'<div class="mx-info">{items}{reason}</div>'


def render_panel(snap, info: Any = None) -> str:
    """The whole live panel for one snapshot (``info``: the engine's, for decoder-layer labels)."""
    return ('<div class="mx-panel">'
            + render_grid(snap, info)
            + '<div class="mx-cols">' + render_hit_rate(snap) + render_speed(snap) + '</div>'
            + '<div class="mx-cols">' + render_memory(snap) + render_transfers(snap) + '</div>'
            + render_routing(snap, info=info)
            + '</div>')


def render_loading(lines: Sequence[str], error: Optional[str] = None) -> str:
    """What the panel shows while the model loads (or why it could not)."""
    tail = list(lines)[-14:]
    log = escape("\n".join(tail)) if tail else "starting…"
    if error:
        return (f'<div class="mx-card mx-error"><div class="mx-card-h"><span>The model could not be loaded'
                f'</span></div><pre>{escape(error)}</pre><pre class="mx-log">{log}</pre></div>')
    return (f'<div class="mx-card mx-loading"><div class="mx-card-h"><span>Loading the model…</span>'
            f'<span class="mx-live">●</span></div><pre class="mx-log">{log}</pre></div>')
