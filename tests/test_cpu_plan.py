"""CPU-only machines planned like GPU ones: RAM is the device, the disk is the store, and the weights are sized in
the CPU kernels' formats; ``plan`` has the README's two CPU machines and a projected tokens/s (projection.py),
marked as projected everywhere it is printed."""
from __future__ import annotations

import json

import pytest
import torch

from mixoff_app.config import FAMILY_QUANT
from mixoff_app.cpu_weights import cpu_quant
from mixoff_app.plan import GiB, plan_for
from mixoff_app.presets import from_name
from mixoff_app.projection import CPU_MACHINES, CPU_SPEED, project, speed_for
from mixoff_app.stores import ExpertLayout


def plan_json(capsys, *args) -> dict:
    from mixoff_app.cli import main
    capsys.readouterr()
    assert main(["plan", *map(str, args), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_a_qwen3_30b_on_a_free_cpu_space_reads_experts_from_disk(capsys):
    out = plan_json(capsys, "--model", "qwen3-30b-a3b", "--machine", "cpu-space")
    cfg = from_name("qwen3-30b-a3b")
    held = cpu_quant(FAMILY_QUANT.for_family(cfg.family), cfg, "64h")[0]
    assert out["device"] == "cpu" and out["placement"] == "disk" and out["feasible"]
    assert out["expert_bytes"] == ExpertLayout.for_model(cfg, held.experts, torch.float32).nbytes
    assert "(cpu int4)" in out["quant"] and out["host_total"] <= 16 * GiB
    assert 0 < sum(out["sizes"]) < cfg.num_moe_layers * cfg.num_experts
    pr = out["projection"]
    assert pr["projected"] is True and pr["threads"] == 2 and pr["tokens_per_s"] > 0
    assert "disk reads" in pr["ms_per_token"] and "assumed" in pr["note"]
    # the existing keys stay: a --json reader of the GPU plan reads this one too
    assert {"k", "sizes", "misses_per_token", "rows", "summary", "bytes"} <= set(out)


def test_models_that_fit_keep_every_expert_in_ram_once(capsys):
    out = plan_json(capsys, "--model", "olmoe-1b-7b", "--machine", "laptop-32gb")
    cfg = from_name("olmoe-1b-7b")
    assert out["placement"] == "exclusive" and sum(out["sizes"]) == cfg.num_moe_layers * cfg.num_experts
    assert "disk reads" not in out["projection"]["ms_per_token"]
    ref = plan_json(capsys, "--model", "olmoe-1b-7b", "--machine", "laptop-32gb", "--kernel", "torch")
    assert "(cpu int4)" not in ref["quant"] and "projection" in ref and ref["projection"]["tokens_per_s"] is None


def test_the_projection_adds_up_the_bytes_each_kernel_reads():
    cfg = from_name("deepseek-v2-lite")
    quant = cpu_quant(FAMILY_QUANT.for_family(cfg.family), cfg, "64h")[0]
    p = plan_for(cfg, quant, 4096, ram_bytes=32 * GiB, device="cpu", model_name="x")
    speed = speed_for(2)
    pr = project(cfg, quant, p, speed)
    assert pr.tokens_per_s == pytest.approx(1e3 / sum(pr.seconds.values()), rel=1e-3)
    experts = cfg.num_moe_layers * cfg.top_k * p.bytes.expert / (speed.int4_gbps * 1e9)
    assert pr.seconds["experts"] == pytest.approx(experts * 1e3, rel=1e-3)
    assert {"dense MLPs", "shared experts", "lm_head", "step overhead"} <= set(pr.seconds)
    assert speed_for(64) == CPU_SPEED[max(CPU_SPEED)] and speed_for(1).threads == 1


def test_the_readme_cpu_table_is_what_plan_prints(capsys):
    """Every model on both machines, marked projected; the README holds exactly these rows: the three smaller
    models entirely in a free Space's RAM, Qwen3-30B-A3B from disk there and in RAM on the laptop."""
    from pathlib import Path

    from mixoff_app.cli import main
    capsys.readouterr()
    assert main(["plan", "--cpu-reference"]) == 0
    rows = [r for r in capsys.readouterr().out.splitlines() if r.startswith("| ") and "---" not in r][1:]
    assert len(rows) == 4 * len(CPU_MACHINES)
    assert all("(projected)" in r for r in rows)
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    assert all(r in readme for r in rows)
    place = {(r.split(" | ")[0][2:], "Space" in r): r.split(" | ")[3] for r in rows}
    assert place[("qwen3-30b-a3b", True)] == "disk" and place[("qwen3-30b-a3b", False)] == "exclusive"
    assert all(place[(m, True)] == "exclusive" for m in ("olmoe-1b-7b", "qwen1.5-moe-a2.7b", "deepseek-v2-lite"))


def test_a_plan_on_the_cpu_prints_its_projection_as_projected(capsys):
    from mixoff_app.cli import main
    capsys.readouterr()
    assert main(["plan", "--model", "qwen1.5-moe-a2.7b", "--device", "cpu", "--ram", "16", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "tokens/s projected at 1 threads" in out and "RAM" in out
