"""The live panel is a pure function of a StatsSnapshot: drive a real ``Stats`` and read the HTML."""
from __future__ import annotations

import base64
import re
import struct
import zlib
from dataclasses import replace

import pytest

from mixoff_app.config import CacheConfig
from mixoff_app.stats import ROLLING_TOKENS, MemoryReading, Stats
from mixoff_app.ui import panel

NO_GPU = MemoryReading(gpu_name=None, process_rss=512 << 20, system_ram_used=6 << 30,
                       system_ram_total=16 << 30, host_expert_bytes=300 << 20)
GPU = MemoryReading(gpu_name="NVIDIA H200", vram_used=20 << 30, vram_total=140 << 30,
                    torch_allocated=18 << 30, torch_reserved=19 << 30, process_rss=30 << 30,
                    system_ram_used=60 << 30, system_ram_total=128 << 30, pinned_bytes=24 << 30,
                    host_expert_bytes=24 << 30)


def run_token(stats: Stats, layer_events: dict) -> None:
    """layer -> (hits, misses, prefetched, evicted, resident slots, route)."""
    for layer, (hits, misses, pre, ev, resident, route) in layer_events.items():
        for e in hits:
            stats.on_hit(layer, e)
        for e in misses:
            stats.on_miss(layer, e, 1 << 20)
        for e in pre:
            stats.on_prefetch(layer, e, 1 << 20)
        for e in ev:
            stats.on_evict(layer, e)
        for slot, e in enumerate(resident):
            stats.on_slot(layer, slot, e)
        stats.on_route(layer, route)
    stats.end_token()


@pytest.fixture
def snap():
    s = Stats(num_moe_layers=4, num_experts=8, top_k=2, cache_sizes=(2, 2, 2, 2))
    s.begin_answer()
    s.end_prefill(5)
    run_token(s, {0: ((), (1, 3), (), (), (1, 3), (1, 3)), 1: ((), (0, 2), (), (), (0, 2), (0, 2))})
    run_token(s, {0: ((1,), (5,), (), (3,), (1, 5), (1, 5)), 1: ((0, 2), (), (6,), (), (0, 2), (0, 2))})
    return s.snapshot(NO_GPU)


def test_units():
    assert panel.fmt_bytes(0) == "0 B"
    assert panel.fmt_bytes(1536) == "1.50 KB"
    assert panel.fmt_bytes(24 << 30) == "24.0 GB"
    assert panel.fmt_bytes(512 << 20) == "512 MB"
    assert panel.fmt_rate(3 << 30) == "3.00 GB/s"
    assert panel.fmt_rate(0) == "—"
    assert panel.fmt_tps(12.345) == "12.3 tok/s"
    assert panel.fmt_secs(0.0851) == "85 ms"
    assert panel.fmt_secs(1.5) == "1.50 s"
    assert panel.fmt_pct(0.5) == "50.0%"


def test_cell_states_mark_this_tokens_events(snap):
    states = panel.cell_states(snap)
    assert len(states) == 4 and all(len(r) == 8 for r in states)
    assert states[0][1] == panel.HIT
    assert states[0][5] == panel.MISS
    assert states[0][3] == panel.EVICTED
    assert states[1][0] == states[1][2] == panel.HIT
    assert states[1][6] == panel.PREFETCHED
    assert states[2] == [panel.EMPTY] * 8          # nothing resident in layer 2
    assert states[0][7] == panel.EMPTY


def test_grid_html_has_every_cell_and_a_legend(snap):
    html = panel.render_grid(snap)
    assert html.count('title="layer ') == 4 * 8
    for state, text in panel.LEGEND:
        assert f"mx-c mx-{state}" in html and text in html
    assert "k = 2 of 8" in html and "lru" in html


@pytest.mark.parametrize("layers", [32, 56])
def test_grid_scales_to_mixtral(layers):
    s = Stats(layers, 8, 2, (3,) * layers)
    s.begin_answer()
    run_token(s, {l: ((), (l % 8, (l + 1) % 8), (), (), (l % 8, (l + 1) % 8), (l % 8, (l + 1) % 8))
                  for l in range(layers)})
    html = panel.render_grid(s.snapshot(NO_GPU))
    assert f"--mx-layers:{layers}" in html
    assert html.count('title="layer ') == layers * 8
    assert html.count(": miss\"") == layers * 2


def test_hit_rates_and_sparkline(snap):
    html = panel.render_hit_rate(snap)
    # token 1: 0 hits / 4 misses; token 2: 3 hits / 1 miss -> 3/8 overall
    assert snap.answer_hit_rate == pytest.approx(3 / 8)
    assert "37.5%" in html and "this answer" in html and "since start" in html
    assert f"last {ROLLING_TOKENS} tokens" in html      # the label names the window the rate is taken over
    assert "<polyline" in html
    assert "no tokens yet" in panel.sparkline([])
    assert len(panel.smooth([1.0] * 1000)) == panel.SPARK_POINTS
    assert panel.smooth([0, 1, 1], window=2) == [0, 0.5, 1]


def test_speed_shows_the_snapshots_figures(snap):
    live = replace(snap, tokens_per_s=12.34, avg_tokens_per_s=9.5, ttft_s=0.0851, generating=True,
                   answer_tokens=7, prefill_tokens=40, prefill_s=1.5, tokens_total=1234)
    speed = panel.render_speed(live)
    for label, value in (("current", "12.3 tok/s"), ("average (answer)", "9.5 tok/s"),
                         ("time to first token", "85 ms")):
        assert re.search(rf'mx-stat-v">{re.escape(value)}</div><div class="mx-stat-l">{re.escape(label)}<', speed), \
            (label, value)
    assert "● generating" in speed and "idle" not in speed
    assert "7 tokens this answer · prompt 40 tokens in 1.50 s · 1,234 tokens since start" in speed
    # before any token: dashes, not zeros, and idle
    idle = panel.render_speed(Stats(2, 8, 2, (2, 2)).snapshot(NO_GPU))
    assert idle.count('mx-stat-v">—<') == 3 and "idle" in idle and "generating" not in idle


def test_transfers(snap):
    tr = panel.render_transfers(snap)
    assert "host → device" in tr and "6.00 MB" in tr       # 5 misses + 1 prefetch of 1 MB


def test_memory_without_gpu_says_so(snap):
    html = panel.render_memory(snap)
    assert "No GPU" in html and "VRAM" not in html.replace("no VRAM", "")
    assert "6.00 GB / 16.0 GB" in html and "512 MB" in html


def test_memory_with_gpu_shows_vram():
    s = Stats(2, 8, 2, (2, 2))
    html = panel.render_memory(s.snapshot(GPU))
    assert "No GPU" not in html
    assert "NVIDIA H200" in html and "20.0 GB / 140 GB" in html and "18.0 GB / 19.0 GB" in html
    assert "24.0 GB · 24.0 GB" in html


def _decode_png(data: bytes):
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, {}
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos:pos + 4])
        tag = data[pos + 4:pos + 8]
        chunks[tag] = chunks.get(tag, b"") + data[pos + 8:pos + 8 + n]
        crc = struct.unpack(">I", data[pos + 8 + n:pos + 12 + n])[0]
        assert crc == zlib.crc32(tag + data[pos + 8:pos + 8 + n]) & 0xFFFFFFFF
        pos += 12 + n
    w, h = struct.unpack(">II", chunks[b"IHDR"][:8])
    raw = zlib.decompress(chunks[b"IDAT"])
    rows = [raw[i * (w + 1) + 1:(i + 1) * (w + 1)] for i in range(h)]
    return w, h, rows


def test_routing_strip_encodes_tokens_by_layers(snap):
    png = panel.routing_png(snap.routing, snap.num_moe_layers, snap.num_experts, snap.top_k)
    w, h, rows = _decode_png(png)
    assert (w, h) == (2, 4 * 3)                  # 2 tokens; 4 layers x (top-2 rows + separator)
    assert rows[0] == bytes([1, 1]) and rows[1] == bytes([3, 5])   # layer 0: token0 (1,3), token1 (1,5)
    assert rows[3] == bytes([0, 0]) and rows[4] == bytes([2, 2])   # layer 1: (0,2) both tokens
    assert rows[6] == bytes([9, 9])              # layer 2 routed nothing: the "none" colour
    trns = png.index(b"tRNS")
    assert png[trns + 4 + 8] == 0                # the gap between layers is transparent (light and dark themes)
    html = panel.render_routing(snap)
    assert "data:image/png;base64," in html and "E7" in html
    src = re.search(r'src="data:image/png;base64,([^"]+)"', html).group(1)
    assert base64.b64decode(src) == png


def test_routing_empty_and_long():
    s = Stats(2, 8, 2, (2, 2))
    assert "appears here" in panel.render_routing(s.snapshot(NO_GPU))
    s.begin_answer()
    for _ in range(panel.ROUTING_TOKENS + 20):
        run_token(s, {0: ((), (), (), (), (), (0, 1)), 1: ((), (), (), (), (), (2, 3))})
    html = panel.render_routing(s.snapshot(NO_GPU))
    assert f"latest {panel.ROUTING_TOKENS} shown" in html


def test_expert_colours_are_distinct():
    for n in (4, 8, 16, 64):
        assert len(set(panel.expert_colors(n))) == n


def test_whole_panel_and_escaping(snap):
    html = panel.render_panel(snap)
    for part in ("Expert cache", "Hit rate", "Speed", "Memory", "Transfers", "Routing"):
        assert part in html

    class Info:
        model_name, reason, device, dtype = "<b>x</b>", "no CUDA GPU found: tiny", "cpu", "float32"
        quant, num_moe_layers, num_experts, top_k, max_context = "experts 2-bit g16", 4, 8, 2, 2048
        cache, gpu_name = CacheConfig(sizes=(2,)), None
    info = panel.render_info(Info())
    assert "&lt;b&gt;x&lt;/b&gt;" in info and "<b>x</b>" not in info
    assert "no CUDA GPU found" in info and "k = 2 of 8" in info
    # a plan that mixes k across layers shows its range, not its first layer's k
    Info.cache = CacheConfig(sizes=(5, 6, 6, 5), policy="lrfu")
    assert "k = 5-6 of 8 experts per layer on the device · lrfu" in panel.render_info(Info())
    Info.cache = CacheConfig()                  # no sizes: every expert on the device
    assert "k = 8 of 8" in panel.render_info(Info())
    assert panel.fmt_k((4, 4)) == "4" and panel.fmt_k((6, 5, 7)) == "5-7"
    assert "could not be loaded" in panel.render_loading(["a"], error="boom")
    assert "downloading" in panel.render_loading(["downloading 1.2 GB"])


def _png_pixels(png: bytes) -> tuple[int, int, list[bytes]]:
    """(width, height, rows of palette indices) of an 8-bit palette PNG written by panel._png."""
    w, h = struct.unpack(">II", png[16:24])
    pos, idat = 8, b""
    while pos < len(png):
        n = struct.unpack(">I", png[pos:pos + 4])[0]
        if png[pos + 4:pos + 8] == b"IDAT":
            idat += png[pos + 8:pos + 8 + n]
        pos += 12 + n
    raw = zlib.decompress(idat)
    return w, h, [raw[r * (w + 1) + 1:(r + 1) * (w + 1)] for r in range(h)]


@pytest.fixture
def qwen3_snap():
    """Qwen3-30B-A3B's shape: 48 layers x 128 experts, top-8, 16 slots per layer."""
    L, E, k = 48, 128, 8
    s = Stats(L, E, k, (16,) * L)
    s.begin_answer()
    for t in range(3):
        ev = {}
        for layer in range(L):
            route = tuple((layer * 7 + t * 3 + j * 11) % E for j in range(k))
            hits, misses = route[:5], route[5:]
            ev[layer] = (hits, misses, (), ((layer + 100) % E,) if t == 2 else (), route + route[:8], route)
        run_token(s, ev)
    return s.snapshot(NO_GPU)


def test_many_experts_grid_is_one_image_with_every_cell(qwen3_snap):
    html = panel.render_grid(qwen3_snap)
    assert 'data-mx="grid"' in html and "mx-c mx-" not in html.split('class="mx-legend"')[0]
    assert html.count("<i ") < 20                       # the legend's keys, not 6,144 cells
    codes = panel.state_codes(qwen3_snap)
    states = panel.cell_states(qwen3_snap)
    s = re.search(r'data-s="(\d+)"', html).group(1)
    assert len(s) == 48 * 128 and s == "".join(str(panel._STATES.index(st)) for row in states for st in row)
    png = base64.b64decode(re.search(r'src="data:image/png;base64,([^"]+)"', html).group(1))
    w, h, rows = _png_pixels(png)
    assert (w, h) == (128 * panel.CELL, 48 * panel.CELL)
    for layer, e in ((0, 0), (5, 40), (47, 127), (2, 102)):
        assert rows[layer * panel.CELL][e * panel.CELL] == codes[layer, e]        # a cell's top-left pixel
        assert rows[layer * panel.CELL][e * panel.CELL + panel.CELL - 1] == len(panel._STATES)   # the gap
    # this token's events are counted in the legend, and an evicted expert is a ring
    assert int(re.search(r"hit \(this token\) <b>(\d+)</b>", html).group(1)) == 48 * 5
    assert states[2][102] == panel.EVICTED
    c = panel.CELL
    assert rows[2 * c + 1][102 * c + 1] == panel._STATES.index(panel.EMPTY)


def test_many_experts_grid_names_decoder_layers_and_states(qwen3_snap):
    class Info:
        expert_layers = tuple(range(1, 97, 2))             # e.g. every other decoder layer has experts
    html = panel.render_grid(qwen3_snap, Info())
    layers = re.search(r'data-layers="([^"]+)"', html).group(1).split(",")
    assert layers[0] == "1" and layers[-1] == "95" and len(layers) == 48
    assert "0:empty" in html and "3:miss" in html and "hover a cell" in html


def test_many_experts_routing_is_a_heat_map_of_the_answer(qwen3_snap):
    """128 experts: one colour per expert id cannot be read, so routing is how often each expert was chosen per
    layer over the answer, on the grid's axes; the hover reads each cell's count from data-n."""
    html = panel.render_routing(qwen3_snap)
    assert 'data-mx="heat"' in html and 'class="mx-routing"' not in html and "mx-huebar" not in html
    L, E, T = 48, 128, len(qwen3_snap.routing)
    counts = [int(x) for x in re.search(r'data-n="([\d,]+)"', html).group(1).split(",")]
    expected = [[0] * E for _ in range(L)]
    for tok in qwen3_snap.routing:
        for layer, ex in enumerate(tok):
            for e in ex:
                expected[layer][e] += 1
    assert counts == [c for row in expected for c in row] and sum(counts) == T * L * 8
    png = base64.b64decode(re.search(r'src="data:image/png;base64,([^"]+)"', html).group(1))
    w, h, rows = _png_pixels(png)
    assert (w, h) == (E * panel.CELL, L * panel.CELL)
    top = max(counts)
    for layer, e in ((0, 0), (5, qwen3_snap.routing[1][5][2]), (47, 127), (2, 102)):
        level = 0 if not expected[layer][e] else -(-expected[layer][e] * panel.HEAT_LEVELS // top)
        assert rows[layer * panel.CELL][e * panel.CELL] == level                  # a cell's shade
        assert rows[layer * panel.CELL][e * panel.CELL + panel.CELL - 1] == panel.HEAT_LEVELS + 1   # the gap
    assert f"{top} of {T} tokens" in html and "hover a cell" in html


def test_heat_map_shades_by_how_often_and_names_decoder_layers():
    s = Stats(num_moe_layers=2, num_experts=64, top_k=2, cache_sizes=(8, 8))
    s.begin_answer()
    for t in range(8):                 # layer 0: expert 5 every token, expert 9 twice, others once
        run_token(s, {0: ((), (), (), (), (), (5, 9 if t < 2 else 10 + t)), 1: ((), (), (), (), (), (1, 2))})
    snap = s.snapshot(NO_GPU)
    levels = panel.heat_levels(panel.routing_counts(snap.routing, 2, 64))
    assert levels[0, 5] == panel.HEAT_LEVELS and levels[0, 9] == 2 and levels[0, 12] == 1 and levels[0, 0] == 0

    class Info:
        expert_layers = (1, 3)
    html = panel.render_routing(snap, info=Info())
    assert 'data-layers="1,3"' in html and 'data-tokens="8"' in html and "8 of 8 tokens (100%)" in html
    s.begin_answer()
    assert "appears here" in panel.render_routing(s.snapshot(NO_GPU))      # a new answer: nothing yet


def test_few_experts_keep_the_strip(snap):
    html = panel.render_routing(snap)
    assert 'class="mx-routing"' in html and 'data-mx' not in html
    assert html.count('class="mx-key"') == 8                                  # one chip per expert


