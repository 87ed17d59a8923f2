"""Budgets hold when measured: under a scaled-down RAM/device budget the planner picks a placement and k,
and the process's real RSS growth and the engine's device tensors stay within it; an impossible budget is
refused with the planner's message before anything is allocated.

The model is a random Mixtral-shaped checkpoint (2 layers, H=1024, F=4096, 2-bit experts of 4.5 MiB) written
straight into the mixoff format, big enough that its experts, not the libraries, dominate the RSS. Each
measurement runs in a fresh process (bench/memory.py), after all imports, so freed memory from other tests
cannot hide growth. The engines run the reference path (``kernel="torch"``), which holds the 2-bit experts as
stored (the CPU kernels hold them as 4-bit, converted at load, and cannot read them from disk)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mixoff_app.checkpoints import peek_checkpoint
from mixoff_app.config import CacheConfig, ConfigError, EngineConfig, QuantConfig
from mixoff_app.engine import Engine
from mixoff_app.plan import MiB, plan_for

ROOT = Path(__file__).resolve().parents[1]
CONTEXT = 256


@pytest.fixture(scope="module")
def synthetic(tiny_dir, tmp_path_factory):
    from mixoff_app.tiny import write_synthetic
    return write_synthetic(tmp_path_factory.mktemp("syn") / "syn", "memory-bench", tokenizer_from=tiny_dir, packed=True)


def run_bench(model, **kw) -> dict:
    args = [sys.executable, str(ROOT / "bench" / "memory.py"), "--model", str(model), "--max-context", str(CONTEXT),
            "--kernel", "torch"]
    for k, v in kw.items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="2")
    res = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def cpu_plan(model, **kw):
    cfg, quant, layout = peek_checkpoint(model, QuantConfig())
    return plan_for(cfg, quant, CONTEXT, device="cpu", disk_ok=layout == "mixoff", **kw)


def test_ram_budget_too_small_for_a_host_copy_picks_the_disk_tier_and_holds(synthetic):
    disk = cpu_plan(synthetic, placement="disk", sizes=(2, 2), ram_budget=1 << 40)
    excl = cpu_plan(synthetic, placement="exclusive", sizes=(1, 1), ram_budget=1 << 40)
    assert disk.host_total < excl.host_total
    budget = disk.host_total + 2 * MiB                     # room for disk at k=2, for no host tier at any k
    p = cpu_plan(synthetic, ram_budget=budget)
    assert p.feasible and p.placement == "disk", p.table()
    got = run_bench(synthetic, ram_budget=budget / (1 << 30), tokens=2)
    assert got["placement"] == "disk" and got["sizes"] == list(p.sizes)
    assert got["host_expert_bytes"] == 2 * got["expert_bytes"]
    assert got["bytes_disk"] > 0
    # The budget left room for KV caches of several answers at the same k: the engine took them.
    assert got["kv_slots"] > 1
    p = cpu_plan(synthetic, ram_budget=budget, sequences=got["kv_slots"])
    assert p.feasible and got["sizes"] == list(p.sizes)
    assert got["device_bytes"] == p.device_total            # the device tier, tensor by tensor
    assert got["rss_peak_growth"] <= budget, got            # load + generation, measured


def test_ram_budget_that_fits_exclusive_but_not_inclusive(synthetic):
    incl = cpu_plan(synthetic, placement="inclusive", sizes=(4, 4), ram_budget=1 << 40)
    excl = cpu_plan(synthetic, placement="exclusive", sizes=(4, 4), ram_budget=1 << 40)
    budget = (incl.host_total + excl.host_total) // 2
    p = cpu_plan(synthetic, ram_budget=budget, vram_budget=excl.device_total)
    assert p.feasible and p.placement == "exclusive" and p.sizes == (4, 4), p.table()
    got = run_bench(synthetic, ram_budget=budget / (1 << 30), vram_budget=excl.device_total / (1 << 30), tokens=2)
    assert got["placement"] == "exclusive" and got["sizes"] == [4, 4]
    assert got["host_expert_bytes"] == (16 - 8 + 1) * got["expert_bytes"]
    assert got["device_bytes"] <= excl.device_total
    assert got["rss_peak_growth"] <= budget, got
    assert got["bytes_d2h"] > 0


def test_impossible_budget_is_a_clear_refusal(synthetic):
    with pytest.raises(ConfigError, match="does not fit.*needs"):
        Engine.load(EngineConfig(model=str(synthetic), device="cpu", max_context=CONTEXT, kernel="torch",
                                 ram_budget=40 * MiB))
    with pytest.raises(ConfigError, match="needs at least .* device memory with k=1"):
        Engine.load(EngineConfig(model=str(synthetic), device="cpu", max_context=CONTEXT, kernel="torch",
                                 vram_budget=4 * MiB))


def test_vram_budget_sets_k(synthetic):
    p2 = cpu_plan(synthetic, placement="inclusive", sizes=(2, 2), ram_budget=1 << 40)
    eng = Engine.load(EngineConfig(model=str(synthetic), device="cpu", max_context=CONTEXT, kernel="torch",
                                   cache=CacheConfig(placement="inclusive"), vram_budget=p2.device_total))
    assert eng.model.cache.sizes == (2, 2)
    # At this budget more answers' KV caches would cost expert slots: one answer at a time keeps k = 2.
    assert eng.model.kv_slots == 1
    assert eng.memory_measured["device_bytes"] == p2.device_total


def test_a_re_plan_that_breaks_the_budget_is_refused_before_anything_moves(tiny_dir):
    """Changing k later (the app's cache settings) is held to the same budget as the load."""
    quant = QuantConfig.from_bits(4, 2)
    cfg, q, _ = peek_checkpoint(tiny_dir, quant)
    need = {k: plan_for(cfg, q, 256, device="cpu", dtype=torch.float32, placement="inclusive",
                        sizes=[k] * cfg.num_layers, ram_bytes=1 << 34).device_total for k in (2, 8)}
    assert need[2] < need[8]
    budget = (need[2] + need[8]) // 2
    eng = Engine.load(EngineConfig(model=str(tiny_dir), device="cpu", quant=quant, max_context=256, kernel="torch",
                                   cache=CacheConfig(sizes=(2,), placement="inclusive"), vram_budget=budget))
    with pytest.raises(ConfigError, match="does not fit"):
        eng.reconfigure_cache(CacheConfig(sizes=(8,), placement="inclusive"))
    assert eng.model.cache.sizes == (2,) * cfg.num_layers          # nothing moved
    eng.reconfigure_cache(CacheConfig(sizes=(1,), placement="inclusive"))
    assert eng.model.cache.sizes == (1,) * cfg.num_layers


def test_the_memory_bench_measures_a_family_loaded_from_its_hub_layout(tiny_dir, tmp_path):
    """`bench/memory.py --make-hub` writes a bf16 hub-layout checkpoint of a family, and the measurement loads it
    (quantizing while loading) and reports what it keeps (docs/BENCHMARKS.md's side-by-side table)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    out = tmp_path / "q3"
    subprocess.run([sys.executable, str(ROOT / "bench" / "memory.py"), "--make-hub", str(out), "--family",
                    "qwen3_moe", "--tokenizer-from", str(tiny_dir), "--layers", "1", "--hidden", "64", "--inter",
                    "32", "--experts", "8"], check=True, capture_output=True, env=env, timeout=300, cwd=ROOT)
    assert json.loads((out / "config.json").read_text())["model_type"] == "qwen3_moe"
    r = run_bench(out)
    assert r["placement"] in ("inclusive", "exclusive") and r["sizes"] == [8] and r["tokens"]
    assert r["host_expert_bytes"] > 0 and r["rss_growth_load"] > 0
