"""``ui/remote_panel.py``: the panel and header in front of a remote backend, pure functions of what it sent."""
from __future__ import annotations

from dataclasses import replace

from mixoff_app.config import CacheConfig
from mixoff_app.remote.cache_replay import candidate_ks, replay_answer
from mixoff_app.remote.info import RemoteInfo
from mixoff_app.remote.snapshot import RemoteSnapshot
from mixoff_app.stats import MemoryReading, Stats
from mixoff_app.trace import synthetic_trace
from mixoff_app.ui import panel
from mixoff_app.ui.remote_panel import render_any_info, render_any_panel

WHERE = "http://gpu-box:8000/v1"


def vllm_view(**kw) -> RemoteSnapshot:
    rows = tuple(tuple(tok) for tok in synthetic_trace(20).routing)
    base = RemoteSnapshot(seq=1, where=WHERE, backend="vllm", model="m", connected=True, problem="", generating=False,
                          answers=1, num_moe_layers=32, num_experts=8, top_k=2, answer_tokens=20, prompt_tokens=9,
                          ttft_s=0.05, decode_s=0.5, tokens_per_s=38.0, finish_reason="length", routing=rows,
                          replay=replay_answer(rows, 8, candidate_ks(8, 2, 3)), replay_k=3)
    return replace(base, **kw)


def test_a_local_or_our_servers_snapshot_is_the_live_panel():
    snap = Stats(2, 8, 2, (2, 2)).snapshot(MemoryReading(gpu_name=None))
    assert render_any_panel(snap, None) == panel.render_panel(snap, None)
    ours = RemoteInfo(where=WHERE, backend="mixoff", connected=False, problem="could not reach the backend")
    html = render_any_panel(snap, ours)
    assert html.startswith('<div class="mx-card mx-error">') and "could not reach" in html
    assert html.endswith(panel.render_panel(snap, ours)), "the last snapshot stays beneath the problem"


def test_a_vllm_answer_shows_routing_replay_speed_and_what_is_absent():
    html = render_any_panel(vllm_view(), None)
    assert "38.0 tok/s" in html and "50 ms" in html and "prompt 9 tokens" in html
    assert html.count("<tr") == 1 + 4 and '<tr class="mx-chosen"><td>k = 3</td>' in html
    assert "absent here, not zero" in html and 'class="mx-routing"' in html
    assert "replaying this answer" in render_any_panel(vllm_view(replay=(), replaying=True), None)
    hidden = vllm_view().without_answer()
    assert hidden.routing == () and hidden.replay == () and hidden.tokens_per_s == 0
    assert "What an expert cache" not in render_any_panel(hidden, None)
    none = render_any_panel(vllm_view(routing=(), replay=(), routing_note="vLLM sent no routing: start it with "
                                                                          "--enable-return-routed-experts"), None)
    assert "--enable-return-routed-experts" in none and "<table" not in none


def test_the_header_says_what_is_known_and_what_is_not():
    unknown = RemoteInfo(where=WHERE, backend="sglang", model="x/y", model_name="x/y", connected=True,
                         num_moe_layers=24, top_k=4, shape_from="its routing", experts_seen=37,
                         cache=CacheConfig(sizes=(4,)))
    html = render_any_info(unknown)
    assert "SGLang at http://gpu-box:8000/v1" in html and "experts: unknown (ids up to 36 seen)" in html
    assert "replayed with k = 4" in html and unknown.experts_bound == 37
    down = render_any_info(RemoteInfo(where=WHERE, problem="could not reach the backend at " + WHERE))
    assert "mx-chip-error" in down and "shape" not in down
