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
    s = Stats(num_layers=4, num_experts=8, top_k=2, cache_sizes=(2, 2, 2, 2))
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
    png = panel.routing_png(snap.routing, snap.num_layers, snap.num_experts, snap.top_k)
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
        quant, num_layers, num_experts, top_k, max_context = "experts 2-bit g16", 4, 8, 2, 2048
        cache, gpu_name = CacheConfig(sizes=(2,)), None
    info = panel.render_info(Info())
    assert "&lt;b&gt;x&lt;/b&gt;" in info and "<b>x</b>" not in info
    assert "no CUDA GPU found" in info and "k = 2 of 8" in info
    assert "could not be loaded" in panel.render_loading(["a"], error="boom")
    assert "downloading" in panel.render_loading(["downloading 1.2 GB"])
