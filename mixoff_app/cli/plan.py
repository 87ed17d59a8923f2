"""``plan``: where a model's parts go for a GPU and RAM size, or for a CPU machine's RAM (offline; the sizing itself
is ``plan.py``, the CPU tokens/s projection ``projection.py``)."""
from __future__ import annotations

import json
from dataclasses import asdict

import torch

from ..config import FAMILY, PLACEMENTS, ConfigError, QuantConfig
from ..plan import GiB, model_for_planning, plan_for, presets_markdown, reference_markdown
from ..presets import PRESETS, from_name
from ..projection import CPU_MACHINES, DISK_GBPS, cpu_machines_markdown, project, speed_for
from .args import bits, parse_gib, positive_int

# The real models the README plans on CPU machines.
CPU_MODELS = ("olmoe-1b-7b", "qwen1.5-moe-a2.7b", "deepseek-v2-lite", "qwen3-30b-a3b")


def cpu_held(cfg, quant: QuantConfig) -> QuantConfig:
    """The formats the CPU kernels hold a model in (their sizes are the same on every kind of CPU)."""
    from ..cpu_weights import cpu_quant
    from ..kernels.cpu import probe
    return cpu_quant(quant, cfg, probe().layout or "64h")[0]


def run(args) -> int:
    quant = QuantConfig.from_bits(args.attn_bits, args.expert_bits)
    if args.cpu_reference:
        models = {}
        for name in CPU_MODELS:
            cfg = from_name(name)
            models[name] = (cfg, cpu_held(cfg, quant.for_family(cfg.family)))
        print(cpu_machines_markdown(models, args.max_context, args.disk_gbps))
        return 0
    if args.machine:
        m = CPU_MACHINES[args.machine]
        args.device, args.ram, args.threads = "cpu", args.ram or int(m.ram_gib * GiB), args.threads or m.threads
    cfg, quant, disk_ok, name = model_for_planning(args.model, quant)
    quant = quant.for_family(cfg.family)
    cpu = torch.device(args.device).type == "cpu"
    if cpu and args.kernel != "torch":
        quant = cpu_held(cfg, quant)
    dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, None: None}[args.dtype]
    if args.presets:
        if args.vram is None or args.ram is None:
            raise ConfigError("--presets plans every preset for one machine: give --vram and --ram")
        print(presets_markdown(QuantConfig.from_bits(args.attn_bits, args.expert_bits), args.vram / 2**30,
                               args.ram / 2**30, args.max_context))
        return 0
    if args.reference:
        print(reference_markdown(cfg, quant, args.max_context, name))
        return 0
    p = plan_for(cfg, quant, args.max_context, vram_bytes=args.vram, ram_bytes=args.ram, device=args.device,
                 dtype=dtype, placement=None if args.placement == "auto" else args.placement,
                 vram_budget=args.vram_budget, ram_budget=args.ram_budget, disk_ok=disk_ok, model_name=name,
                 sequences=args.max_batch)
    if not p.feasible:
        raise ConfigError(f"{name} does not fit: {p.reason}")
    proj = project(cfg, quant, p, speed_for(args.threads or torch.get_num_threads()), args.disk_gbps) if cpu else None
    if args.json:
        print(json.dumps(plan_json(p, proj)))
        return 0
    print(p.table(markdown=args.markdown))
    if proj is not None:
        print(f"decode: {proj.describe()}")
    return 0


def plan_json(p, proj) -> dict:
    """The plan as one JSON object (the keys are a contract: extend, never rename)."""
    out = {"model": p.model, "device": p.device, "feasible": p.feasible, "placement": p.placement,
           "sizes": list(p.sizes), "k": min(p.sizes), "quant": p.quant, "max_context": p.max_context,
           "expert_bytes": p.bytes.expert, "device_total": p.device_total, "host_total": p.host_total,
           "device_cap": p.device_cap, "host_cap": p.host_cap, "misses_per_token": p.misses_per_token,
           "summary": p.summary(), "bytes": asdict(p.bytes),
           "rows": [{"where": w, "what": what, "bytes": n} for w, what, n in p.rows]}
    if proj is not None:
        out["projection"] = {"tokens_per_s": proj.tokens_per_s, "threads": proj.threads, "ms_per_token": proj.seconds,
                             "note": proj.note, "projected": True}
    return out


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("plan", help="plan where the model's parts go for a GPU and RAM size, or a CPU "
                                           "machine's RAM (offline)")
    p.add_argument("--model", default="mixtral-8x7b",
                   help=f"a preset ({', '.join(PRESETS)}), a local checkpoint folder, or 'tiny'")
    p.add_argument("--vram", type=parse_gib, default=None, help="the GPU's memory in GB (GiB); default: measured free VRAM")
    p.add_argument("--ram", type=parse_gib, default=None, help="RAM for mixoff in GB (GiB); default: measured available RAM")
    p.add_argument("--vram-budget", type=parse_gib, default=None, help="cap on mixoff's device allocations, GB")
    p.add_argument("--ram-budget", type=parse_gib, default=None, help="cap on the RAM mixoff's load may add, GB")
    p.add_argument("--device", default="cuda", help="plan for cuda (default) or cpu (RAM is the device, disk the store)")
    p.add_argument("--machine", choices=tuple(CPU_MACHINES), default=None,
                   help="a CPU machine: cpu-space (a free Hugging Face CPU Space: 2 vCPU, 16 GB) or laptop-32gb; "
                        "sets --device cpu and --ram")
    p.add_argument("--kernel", choices=("auto", "cpu", "torch"), default="auto",
                   help="on --device cpu: the CPU kernels' formats (auto, cpu) or the reference path's (torch)")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="CPU threads the tokens/s projection is for (default: the machine's, else torch's)")
    p.add_argument("--disk-gbps", type=float, default=DISK_GBPS,
                   help=f"disk read speed the projection assumes for disk placement, GB/s (default {DISK_GBPS:g})")
    p.add_argument("--placement", choices=("auto",) + PLACEMENTS, default="auto")
    p.add_argument("--max-context", type=positive_int, default=4096)
    p.add_argument("--max-batch", type=positive_int, default=1,
                   help="answers decoded together: one KV cache each (default 1; the table says how many fit)")
    p.add_argument("--attn-bits", type=bits, default=4)
    p.add_argument("--expert-bits", type=bits, default=FAMILY, help="default: the model family's (see README)")
    p.add_argument("--dtype", default=None, choices=("float16", "bfloat16", "float32"))
    p.add_argument("--markdown", action="store_true", help="print the table as markdown")
    p.add_argument("--json", action="store_true", help="print the plan (and, on a CPU, the projection) as one JSON object")
    p.add_argument("--presets", action="store_true",
                   help="one markdown row per preset model for the machine given by --vram and --ram")
    p.add_argument("--reference", action="store_true",
                   help="print the plans for the README's four reference machines as one markdown table")
    p.add_argument("--cpu-reference", action="store_true",
                   help="print the README's CPU table: OLMoE, Qwen1.5-MoE, DeepSeek-V2-Lite and Qwen3-30B-A3B on a "
                        "free CPU Space and a 32 GB laptop, with projected tokens/s")
    p.set_defaults(func=run)
