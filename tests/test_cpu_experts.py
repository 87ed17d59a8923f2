"""Missed experts computed on the CPU (``--cpu-experts``): the cost model's decision, and parity with the CPU as
both sides - with ``all``, a decode miss runs straight from the store's host copy instead of being copied into a
cache slot, so the cache's contents and counts differ, and the logits must not."""
from __future__ import annotations

import json

import pytest
import torch

from mixoff_app import cpu_experts as cx
from mixoff_app.config import FAMILY_QUANT, NO_QUANT, CacheConfig, ConfigError, EngineConfig, QuantConfig
from mixoff_app.engine import Engine
from mixoff_app.kernels import cpu
from mixoff_app.stats import LayerEvents, MemoryReading, Stats
from mixoff_app.tiny import make_family_checkpoint
from mixoff_app.ui import panel

from helpers import chat_ids, cli_here, greedy_ids

MiB = 1 << 20
QUANTS = {"float": NO_QUANT, "default": FAMILY_QUANT}


# ---- the cost model ---------------------------------------------------------------------------------
def test_a_slow_link_runs_the_miss_on_the_cpu_and_a_fast_one_copies_it():
    # 6 MiB expert, 0.5 ms of CPU a row: over 2 GB/s the copy takes ~3 ms, over 50 GB/s ~0.13 ms.
    assert cx.decide(6 * MiB, 2e9, 5e-4) is True
    assert cx.decide(6 * MiB, 50e9, 5e-4) is False


def test_backlog_rows_and_cpu_queue_move_the_decision():
    one = dict(expert_bytes=6 * MiB, copy_bytes_per_s=25e9, cpu_s_per_row=5e-4)    # copy ~0.25 ms alone
    assert cx.decide(**one) is False
    assert cx.decide(**one, copy_backlog_bytes=24 * MiB) is True        # the link is busy for ~1 ms first
    assert cx.decide(**one, copy_backlog_bytes=24 * MiB, cpu_busy_s=2e-3) is False   # and the CPU for longer
    assert cx.decide(**dict(one, copy_bytes_per_s=5e9)) is True         # ~1.3 ms to copy, 0.5 ms on the CPU
    assert cx.decide(**dict(one, copy_bytes_per_s=5e9), rows=4) is False   # but 4 rows cost the CPU 2 ms


class _Cache:
    def __init__(self, held):
        self.held = held

    def holds(self, moe, e):
        return e in self.held


def _costs(bw):
    return cx.Costs(expert_bytes=6 * MiB, copy_bytes_per_s=bw, cpu_s_per_row=5e-4, threads=2, cpu_kernel="cpu")


def test_choose_splits_a_layers_misses_between_the_link_and_the_cpu():
    users = {0: [(0, 0)], 3: [(0, 1)], 5: [(1, 0)], 6: [(1, 1)]}         # expert -> (row, rank)
    cache = _Cache({0})                                                  # 3, 5, 6 missed
    slow = cx.CpuExperts("cost", None, Stats(1, 8, 2, (2,)), _costs(1e9))
    fast = cx.CpuExperts("cost", None, Stats(1, 8, 2, (2,)), _costs(1e12))
    assert slow.choose(0, users, cache) == [3, 5, 6]
    assert fast.choose(0, users, cache) == []
    # 8 GB/s: a copy ~0.8 ms: the first miss goes to the CPU (0.5 ms), the second would wait there 1 ms, so it is
    # copied, and the third finds the CPU (1 ms) quicker than the link behind one copy (1.6 ms).
    assert cx.CpuExperts("cost", None, Stats(1, 8, 2, (2,)), _costs(8e9)).choose(0, users, cache) == [3, 6]
    assert cx.CpuExperts("all", None, Stats(1, 8, 2, (2,))).choose(0, users, cache) == [3, 5, 6]


def test_auto_is_off_until_a_gpu_measured_it(monkeypatch):
    assert cx.resolve_mode("auto", torch.device("cpu"), "inclusive")[0] == "off"
    assert cx.resolve_mode("auto", torch.device("cuda"), "inclusive")[0] == "off"
    assert cx.resolve_mode("all", torch.device("cpu"), "exclusive")[0] == "all"
    assert cx.resolve_mode("off", torch.device("cuda"), "inclusive")[0] == "off"
    assert cx.resolve_mode("auto", torch.device("cuda"), "disk")[0] == "off"
    monkeypatch.setattr(cx, "AUTO_ON_CUDA", True)
    assert cx.resolve_mode("auto", torch.device("cuda"), "inclusive")[0] == "cost"
    with pytest.raises(ValueError, match="keeps none there"):
        cx.resolve_mode("all", torch.device("cpu"), "disk")


def test_bad_values_are_refused_in_one_sentence(tiny_dir, capsys):
    with pytest.raises(ConfigError) as e:
        EngineConfig(cpu_experts="sometimes")
    assert str(e.value) == "cpu_experts must be one of auto, off, all, not 'sometimes'"
    rc, err = cli_here(capsys, "generate", "--model", tiny_dir, "--prompt", "Hi", "--cpu-experts", "gpu")
    assert rc == 2 and "--cpu-experts: invalid choice: 'gpu'" in err


# ---- parity: the CPU as both sides ------------------------------------------------------------------
def _engine(folder, mode, quant, k, **kw) -> Engine:
    return Engine.load(EngineConfig(model=str(folder), device="cpu", quant=quant, max_context=256,
                                    cache=CacheConfig(sizes=(k,)), cpu_experts=mode, **kw))


def _greedy_logits(engine: Engine, ids, n: int):
    m = engine.model
    logits = [m.forward(torch.tensor(ids), 0)]
    tokens = []
    for i in range(n):
        t = int(logits[-1][-1].argmax())
        tokens.append(t)
        logits.append(m.decode(torch.tensor([t]), [len(ids) + i], [0]))
    return tokens, torch.cat(logits)


def _same_answer(folder, ids, quant, k, n=12):
    off, on = _engine(folder, "off", quant, k), _engine(folder, "all", quant, k)
    assert on.info.cpu_experts == "all" and off.info.cpu_experts == "off"
    t_off, l_off = _greedy_logits(off, ids, n)
    t_on, l_on = _greedy_logits(on, ids, n)
    assert t_on == t_off
    torch.testing.assert_close(l_on, l_off, rtol=1e-4, atol=1e-4)
    assert off.stats().cpu_experts == 0 and on.stats().cpu_experts > 0


@pytest.mark.parametrize("quant", list(QUANTS))
def test_mixtral_logits_do_not_depend_on_where_an_expert_ran(tiny_dir, tokenizer, quant):
    ids = chat_ids(tokenizer)
    _same_answer(tiny_dir, ids, QUANTS[quant], 2)
    # Through the engine: the answer's decode misses ran on the CPU - counted as misses, nothing copied, nothing
    # evicted, the grid's last token shows them as run on the CPU, never as loaded.
    on = _engine(tiny_dir, "all", QUANTS[quant], 2)
    assert greedy_ids(on, ids, 8)
    dec = on.answer_counters()["decode"]
    assert dec["cpu_experts"] > 0 and dec["misses"] >= dec["cpu_experts"]
    assert dec["bytes_h2d"] == 0 and dec["evictions"] == 0
    last = on.stats().last_token
    assert all(ev.misses == () and ev.evicted == () for ev in last) and any(ev.cpu for ev in last)


QWEN2 = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
             rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, num_hidden_layers=3, num_experts=10,
             num_experts_per_tok=3, moe_intermediate_size=64, shared_expert_intermediate_size=128,
             intermediate_size=128, mlp_only_layers=[1], norm_topk_prob=False, qkv_bias=True)


@pytest.mark.parametrize("quant", list(QUANTS))
def test_shared_expert_family_logits_do_not_depend_on_where_an_expert_ran(tmp_path, tiny_dir, tokenizer, quant):
    folder = make_family_checkpoint(tmp_path / "qwen2", "qwen2_moe", tiny_dir, seed=3, **QWEN2)
    _same_answer(folder, chat_ids(tokenizer), QUANTS[quant], 3)


def test_a_batched_step_runs_a_missed_expert_once_for_its_rows_each_as_alone(tiny_dir, tokenizer):
    """Two sequences in one decode step: ``all`` against ``off``, each row's logits alike."""
    ids_a, ids_b = chat_ids(tokenizer), chat_ids(tokenizer, "What is a list?")
    out = {}
    for mode in ("off", "all"):
        e = _engine(tiny_dir, mode, FAMILY_QUANT, 2, max_batch=2)
        m, calls = e.model, []
        if m.cpu_experts is not None:            # record how many rows each CPU run took
            run = m.cpu_experts.side.run
            m.cpu_experts.side.run = lambda moe, x, h: calls.append(h.shape[0]) or run(moe, x, h)
        la, lb = m.forward(torch.tensor(ids_a), 0, seq=0), m.forward(torch.tensor(ids_b), 0, seq=1)
        ta, tb = int(la[-1].argmax()), int(lb[-1].argmax())
        rows = []
        for i in range(6):
            lg = m.decode(torch.tensor([ta, tb]), [len(ids_a) + i, len(ids_b) + i], [0, 1])
            rows.append(lg)
            ta, tb = int(lg[0].argmax()), int(lg[1].argmax())
        out[mode] = (torch.cat(rows), e.stats(), calls)
    torch.testing.assert_close(out["all"][0], out["off"][0], rtol=1e-4, atol=1e-4)
    calls = out["all"][2]
    assert out["all"][1].cpu_experts == len(calls) > 0
    assert 2 in calls and set(calls) <= {1, 2}        # an expert both rows missed ran once, for both


@pytest.mark.skipif(not cpu.probe().ok, reason=f"no CPU kernel here: {cpu.probe().reason}")
def test_load_measures_what_the_cost_model_needs(tiny_dir):
    e = _engine(tiny_dir, "all", QuantConfig.from_bits(4, 4), 2, kernel="cpu")
    c = e.model.cpu_experts.costs
    assert c.expert_bytes == e.info.expert_bytes and c.copy_bytes_per_s > 0 and c.cpu_s_per_row > 0
    assert c.cpu_kernel == "cpu" and c.threads == torch.get_num_threads()
    assert _engine(tiny_dir, "auto", FAMILY_QUANT, 2).model.cpu_experts is None    # CPU-only: auto is off


# ---- what the counters, the panel and --json say ----------------------------------------------------
def test_stats_count_cpu_run_experts_as_misses_without_bytes():
    s = Stats(2, 8, 2, (2, 2))
    a = s.begin_answer()
    s.end_prefill(3)
    s.begin_step(1)
    s.on_hit(0, 1)
    s.on_cpu_expert(0, 4)
    s.on_cpu_expert(1, 6)
    s.on_miss(1, 2, MiB)
    s.end_token(a)
    snap = s.snapshot(MemoryReading(gpu_name=None))
    assert (snap.hits, snap.misses, snap.cpu_experts, snap.bytes_h2d) == (1, 3, 2, MiB)
    assert snap.last_token[0] == LayerEvents(hits=(1,), cpu=(4,)) and snap.last_token[1].cpu == (6,)
    assert snap.last_token[1].misses == (2,)
    assert a.decode["cpu_experts"] == 2 and a.decode["misses"] == 3
    assert snap.to_dict()["cpu_experts"] == 2


def test_panel_marks_and_counts_experts_that_ran_on_the_cpu():
    s = Stats(2, 8, 2, (2, 2))
    s.begin_answer()
    s.on_slot(0, 0, 1)
    s.on_hit(0, 1)
    s.on_cpu_expert(0, 5)
    s.on_miss(1, 3, MiB)
    s.on_route(0, (1, 5))
    s.end_token()
    snap = s.snapshot(MemoryReading(gpu_name=None))
    states = panel.cell_states(snap)
    assert states[0][5] == panel.ON_CPU and states[0][1] == panel.HIT and states[1][3] == panel.MISS
    html = panel.render_grid(snap)
    assert 'class="mx-c mx-cpu"' in html and "miss: ran on CPU" in html
    assert "1 misses ran on the CPU" in panel.render_hit_rate(snap)
    assert "ran on the CPU" not in panel.render_hit_rate(Stats(1, 8, 2, (2,)).snapshot(MemoryReading(gpu_name=None)))
    png = panel.grid_png(panel.state_codes(snap))
    assert png.startswith(b"\x89PNG")
    css = open(panel.__file__.replace("mixoff_app/ui/panel.py", "assets/style.css")).read()
    assert ".mx-c.mx-cpu" in css


def test_generate_json_says_how_many_experts_ran_on_the_cpu(tiny_dir, capsys):
    from mixoff_app.cli import main
    args = ["generate", "--model", str(tiny_dir), "--prompt", "Hello", "--max-new-tokens", "8", "--greedy",
            "--device", "cpu", "--cache-size", "2", "--json", "--quiet"]
    outs = {}
    for mode in ("off", "all"):
        capsys.readouterr()
        assert main(args + ["--cpu-experts", mode]) == 0
        outs[mode] = json.loads(capsys.readouterr().out)
    on, off = outs["all"], outs["off"]
    assert on["cpu_experts"] == "all" and off["cpu_experts"] == "off"
    assert on["stats"]["cpu_experts"] > 0 and off["stats"]["cpu_experts"] == 0
    assert on["token_ids"] == off["token_ids"]
    assert set(off) == set(on) and set(off["stats"]) == set(on["stats"])
    for key in ("hits", "misses", "evictions", "hit_rate", "bytes_h2d", "tokens_per_s", "prefill", "expert_bytes"):
        assert key in on["stats"]
    assert on["stats"]["prefill"]["cpu_experts"] == 0          # prefill stays with the cache
