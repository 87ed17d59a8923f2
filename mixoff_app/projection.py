"""Projected CPU decode speed: the tokens/s a memory plan would decode at on a CPU, from measured kernel speeds.

A projection, not a measurement: it adds up the bytes a decoded token reads in each format (attention, the
routed experts, dense MLPs and shared experts, the router, lm_head), divides each by the speed the CPU kernels
read that format at (``CPU_SPEED``, measured by bench/cpu_speed.py on one machine), adds the per-layer and
per-expert-call cost of a decode step (measured the same way), and, under disk placement, the expected misses
times an expert's bytes over an assumed disk speed. Routing is taken as uniform (real routing repeats experts,
so a disk tier misses less). docs/BENCHMARKS.md holds the projection against a model we can measure.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .config import ModelConfig, QuantConfig, QuantSpec
from .plan import GiB, Plan, Sizes, _nbytes, plan_for
from .quant import weight_fields


@dataclass(frozen=True)
class CpuSpeed:
    """What bench/cpu_speed.py measures at one thread count: bytes of weight per second a one-token matmul
    reads through each CPU kernel (memory-resident weights, beyond any cache), and a decode step's cost per
    decoder layer and per routed expert call beyond reading weights."""
    threads: int
    int4_gbps: float
    int8_gbps: float
    fp32_gbps: float
    layer_us: float
    expert_us: float


# bench/cpu_speed.py, 2026-12-05, torch 2.13.0+cpu, this project's 2-vCPU AMD EPYC VM (AVX-512; shared with other
# jobs; measured in a quiet hour, medians of interleaved rounds). The step overhead is Python and dispatch on one thread, measured there.
# Re-measure on another machine with the same command.
CPU_SPEED = {
    1: CpuSpeed(threads=1, int4_gbps=19.07, int8_gbps=15.14, fp32_gbps=23.49, layer_us=87.8, expert_us=15.6),
    2: CpuSpeed(threads=2, int4_gbps=32.79, int8_gbps=28.13, fp32_gbps=34.29, layer_us=87.8, expert_us=15.6),
}
DISK_GBPS = 1.0          # assumed (not measured) read speed of the disk tier: an SSD's, well below an NVMe's


@dataclass(frozen=True)
class CpuMachine:
    name: str
    ram_gib: float
    threads: int


# The README's CPU machines: a free Hugging Face CPU Space (2 vCPU, 16 GB) and a laptop with 32 GB. ``ram_gib`` is
# what is left for the model: the total less the operating system's share (an allowance: 1 GiB on a Space's
# container, 4 GiB on a desktop) and the Python process with torch, transformers and gradio imported (0.33 GiB
# RSS, measured). The laptop is projected at 2 threads too (the measured speeds): its more cores read faster,
# up to its memory bandwidth.
CPU_MACHINES = {"cpu-space": CpuMachine("free CPU Space (2 vCPU, 16 GB)", 16.0 - 1.0 - 0.33, 2),
                "laptop-32gb": CpuMachine("32 GB laptop", 32.0 - 4.0 - 0.33, 2)}


@dataclass(frozen=True)
class Projection:
    tokens_per_s: Optional[float]      # None: some weights run on the reference path, which is not projected
    seconds: dict                      # per part of a token: weights by format, overhead, disk
    threads: int
    note: str

    def describe(self) -> str:
        if self.tokens_per_s is None:
            return f"no projection: {self.note}"
        return f"~{self.tokens_per_s:.1f} tokens/s projected at {self.threads} threads ({self.note})"


def _rate(spec: QuantSpec, speed: CpuSpeed) -> Optional[float]:
    """Bytes per second for weights held as ``spec`` on the CPU kernels (None: the reference path)."""
    if not spec.enabled:
        return speed.fp32_gbps * 1e9
    return {"int4": speed.int4_gbps * 1e9, "int8": speed.int8_gbps * 1e9}.get(spec.packing)


def _mlp_bytes(cfg: ModelConfig, spec: QuantSpec, size: int) -> int:
    h = cfg.hidden_size
    return sum(_nbytes(weight_fields("w", s, spec, torch.float32)) for s in ((size, h), (size, h), (h, size)))


def project(cfg: ModelConfig, quant: QuantConfig, plan: Plan, speed: CpuSpeed,
            disk_gbps: float = DISK_GBPS) -> Projection:
    """Tokens/s of one decoded token (batch of one) for a feasible CPU plan with ``quant`` as held."""
    s: Sizes = plan.bytes
    Lm, k = cfg.num_moe_layers, cfg.top_k
    parts = {  # (bytes per token, spec they are held as)
        "attention": (s.attention, quant.attn),
        "experts": (Lm * k * s.expert, quant.experts),
        "dense MLPs": (len(cfg.dense_layers) * _mlp_bytes(cfg, quant.attn, cfg.dense_intermediate_size)
                       if cfg.dense_layers else 0, quant.attn),
        "shared experts": (Lm * _mlp_bytes(cfg, quant.attn, cfg.shared_intermediate_size)
                           if cfg.shared_intermediate_size else 0, quant.attn),
        "router": (s.router, QuantSpec()),
        "lm_head": (s.lm_head or cfg.vocab_size * cfg.hidden_size * 4, quant.lm_head),
    }
    seconds = {}
    for name, (nbytes, spec) in parts.items():
        if not nbytes:
            continue
        rate = _rate(spec, speed)
        if rate is None:
            return Projection(None, {}, speed.threads, f"{name} stay {spec.describe()} on the reference path")
        seconds[name] = nbytes / rate
    calls = Lm * k + (Lm if cfg.shared_intermediate_size else 0) + len(cfg.dense_layers)
    seconds["step overhead"] = (cfg.num_layers * speed.layer_us + calls * speed.expert_us) * 1e-6
    note = "uniform routing" if plan.placement == "disk" else "every expert in RAM"
    if plan.placement == "disk":
        seconds["disk reads"] = plan.misses_per_token * s.expert / (disk_gbps * 1e9)
        note += f", disk at an assumed {disk_gbps:g} GB/s"
    return Projection(1 / sum(seconds.values()), {n: round(t * 1e3, 3) for n, t in seconds.items()},
                      speed.threads, note)


def speed_for(threads: int) -> CpuSpeed:
    """The measured speed at ``threads`` (the nearest measured count below it, else the smallest)."""
    known = sorted(CPU_SPEED)
    return CPU_SPEED[max([t for t in known if t <= threads], default=known[0])]


def cpu_machines_markdown(models: dict[str, tuple[ModelConfig, QuantConfig]], max_context: int = 4096,
                          disk_gbps: float = DISK_GBPS) -> str:
    """The README's table: each model (config and quantization as the CPU kernels hold it) on each CPU machine,
    where its experts go and the projected tokens/s."""
    out = ["| model | experts held as | machine | placement | experts in RAM | RAM use | disk reads/token | "
           "projected tokens/s |", "|---|---|---|---|---|---|---|---|"]
    for name, (cfg, quant) in models.items():
        for m in CPU_MACHINES.values():
            p = plan_for(cfg, quant, max_context, ram_bytes=int(m.ram_gib * GiB), device="cpu", model_name=name)
            if not p.feasible:
                out.append(f"| {name} | {quant.experts.describe()} | {m.name} | does not fit | | | | |")
                continue
            pr = project(cfg, quant, p, speed_for(m.threads), disk_gbps)
            reads = p.misses_per_token * p.bytes.expert / 2**20 if p.placement == "disk" else 0
            tps = "-" if pr.tokens_per_s is None else f"~{pr.tokens_per_s:.1f} (projected)"
            out.append(f"| {name} | {quant.experts.describe()}, {p.bytes.expert / 2**20:.2f} MiB each | {m.name} | "
                       f"{p.placement} | {sum(p.sizes)}/{cfg.num_moe_layers * cfg.num_experts} | "
                       f"{p.host_total / GiB:.1f} GiB | {reads:.0f} MiB | {tps} |")
    return "\n".join(out)
