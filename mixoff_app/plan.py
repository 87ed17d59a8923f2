"""Memory planner: what goes where, how many experts per layer fit on the device, and which placement.

Every size comes from the code the runtime allocates with (``ExpertLayout`` for an expert, ``weight_fields``
for the attention projections, the model's KV cache and RoPE tables), so the planner's bytes are the bytes
the engine will hold. Allowances (not computable from the model) are stated where they are defined.

``plan_for(...)`` is what the app and the engine call; ``python -m mixoff_app plan`` prints the table.
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from .config import (
    PLACEMENTS,
    PREFILL_CHUNK,
    ConfigError,
    ModelConfig,
    QuantConfig,
    QuantSpec,
    format_k,
)
from .presets import PRESETS, from_name, preset_name
from .quant import weight_fields
from .stores import ExpertLayout

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30

# Allowances (stated, not derived):
CUDA_CONTEXT = 512 * MiB          # CUDA context + cuBLAS workspace; outside torch's allocator
DEVICE_MARGIN = 0.02              # caching-allocator rounding and fragmentation (fraction of the device cap)
DEVICE_MARGIN_MIN = 128 * MiB
HOST_OVERHEAD_CUDA = 1536 * MiB   # CUDA runtime's host memory, tokenizer, Python objects made while loading
HOST_OVERHEAD_CPU = 64 * MiB      # tokenizer, Python objects made while loading (measured: ~10-30 MiB)
DISK_STAGING = 2                  # pinned staging buffers of the disk tier

# Reference machines for the README table: (name, VRAM GiB, RAM GiB).
MACHINES = (("free Colab T4", 15.0, 12.7), ("12 GB card, 32 GB RAM", 12.0, 32.0),
            ("16 GB card, 32 GB RAM", 16.0, 32.0), ("24 GB card, 32 GB RAM", 24.0, 32.0))


def _nbytes(fields) -> int:
    return sum(f.nbytes for f in fields)


def _elt(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


@dataclass(frozen=True)
class Sizes:
    """Bytes of every part of the model for one configuration (dtype, quantization, context)."""
    expert: int                 # one expert in its stored layout (one copy = one device slot or host row)
    attention: int              # all layers' q/k/v/o projections
    embed: int
    lm_head: int                # 0 when tied to the embeddings
    norms: int                  # 2 per layer + the final one
    router: int                 # all layers' gates
    kv: int                     # static KV cache for max_context tokens
    rope: int                   # cos + sin tables for max_context positions
    scratch: int                # dequantizing the largest matrix: codes, minus zero, times scale (+ meta)
    activations: int            # a prefill of max_context tokens (upper estimate)
    num_moe_layers: int         # expert layers (dense layers have no experts)
    num_experts: int
    mlp: int = 0                # resident MLPs (dense layers', shared experts; quantized like attention), biases, q/k norms

    @property
    def trunk(self) -> int:
        return self.attention + self.embed + self.lm_head + self.norms + self.router + self.mlp

    @property
    def all_experts(self) -> int:
        return self.expert * self.num_moe_layers * self.num_experts


def dequant_scratch(shape: tuple[int, int], spec: QuantSpec, dtype: torch.dtype) -> int:
    """Peak bytes that ``quant.dequantize`` allocates for one matrix (measured on the tiny model's matrices in
    tests/test_plan.py): the unpacked codes in ``dtype`` (N values; 3-bit packs unpack their padded rows),
    which are then scaled in place, plus the larger of two transients: unpacking's integer codes (one byte
    each, four at 3 bits; none at 8 bits, which converts directly) or making the zero / scale row (two rows
    of M = N / group values alive at once, plus up to four scalars). Dense: none."""
    if not spec.enabled:
        return 0
    m = shape[0] * shape[1] // spec.group_size
    rows = 10 * math.ceil(spec.group_size / 10) if spec.bits == 3 else spec.group_size
    b = _elt(dtype)
    codes = 0 if spec.bits == 8 else rows * m * (4 if spec.bits == 3 else 1)
    return rows * m * b + max(codes, 2 * m * b + 4 * b)


def prefill_activations(cfg: ModelConfig, max_context: int, dtype: torch.dtype, chunk: int = PREFILL_CHUNK) -> int:
    """Peak live activations of one prefill chunk, T = min(chunk, max_context) tokens against up to
    S = max_context keys (an upper estimate, checked against a measured peak in tests/test_prefill.py).

    Per token: the residual stream and its normed copy, q/k/v with RoPE's temporaries and the attention
    output, the chunk's expert outputs (k rows of H) and their sum, one expert's gate/up/product rows (4 of F),
    the router's logits and weights. Per (token, key): the causal mask, as bool and as the attention kernel's
    bias. And the unfused attention a GPU may fall back to: float32 scores per head, K/V repeated per head."""
    b = _elt(dtype)
    T, S = min(chunk, max_context), max_context
    H, k = cfg.hidden_size, cfg.top_k
    F = max(cfg.intermediate_size, cfg.dense_intermediate_size, cfg.shared_intermediate_size)   # widest MLP
    qkv = (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim
    repeated = 2 * cfg.num_heads * S * cfg.head_dim           # K and V repeated per head
    if cfg.mla:
        # q, the latent row, the heads' latent queries (and their product before the concatenation), the
        # latent output and its per-head values; the key (latent + rope) and value (latent) repeated per head.
        lat = cfg.kv_width
        qkv = cfg.num_heads * (cfg.head_dim + 3 * lat + cfg.v_head_dim) + lat
        repeated = cfg.num_heads * S * (lat + cfg.kv_lora_rank)
    per_token = b * ((6 + 2 * k) * H + 4 * F + 4 * qkv) + 4 * (cfg.num_experts + 2 * k)
    unfused = 4 * cfg.num_heads * T * S + repeated * b
    return T * per_token + T * S * (1 + b) + unfused


def model_sizes(cfg: ModelConfig, quant: QuantConfig, max_context: int, dtype: torch.dtype) -> Sizes:
    h, hd, L, Lm = cfg.hidden_size, cfg.head_dim, cfg.num_layers, cfg.num_moe_layers
    b = _elt(dtype)
    attn_shapes = cfg.attention_shapes()
    attention = L * sum(_nbytes(weight_fields(n, s, quant.attn, dtype)) for n, s in attn_shapes.items())
    # Biases and q/k norms: small, but counted (they are on the device).
    q, kv = cfg.num_heads * hd, cfg.num_kv_heads * hd
    extra = L * b * ((q + 2 * kv + (h if cfg.traits.bias_o else 0)) if cfg.attn_bias else 0)
    extra += L * b * {"none": 0, "head": 2 * hd, "proj": q + kv}[cfg.traits.qk_norm]
    if cfg.mla:      # the latent's (and the q LoRA's) norm, and kv_b_proj in the model's dtype
        nope = hd - cfg.qk_rope_head_dim
        extra += L * b * (cfg.kv_lora_rank + cfg.q_lora_rank
                          + cfg.num_heads * (nope + cfg.v_head_dim) * cfg.kv_lora_rank)
    mlp_shapes = []
    for size, count in ((cfg.dense_intermediate_size, len(cfg.dense_layers)),
                        (cfg.shared_intermediate_size, Lm)):
        if size and count:
            shapes = ((size, h), (size, h), (h, size))
            mlp_shapes += shapes
            mlp = count * sum(_nbytes(weight_fields("w", s, quant.attn, dtype)) for s in shapes)
            extra += mlp
    gate = Lm * h * b if cfg.shared_intermediate_size and cfg.traits.shared_gate else 0
    layout = ExpertLayout.for_model(cfg, quant.experts, dtype)
    scratch = max([dequant_scratch(s, quant.experts, dtype) for s in layout.shapes]
                  + [dequant_scratch(s, quant.attn, dtype) for s in list(attn_shapes.values()) + mlp_shapes])
    return Sizes(
        expert=layout.nbytes, attention=attention,
        embed=cfg.vocab_size * h * b, lm_head=0 if cfg.tie_word_embeddings else cfg.vocab_size * h * b,
        norms=(2 * L + 1) * h * b, router=Lm * cfg.num_experts * h * b + gate,
        kv=L * max_context * cfg.kv_width * b, rope=2 * max_context * cfg.rope_dim * b,
        scratch=scratch, activations=prefill_activations(cfg, max_context, dtype),
        num_moe_layers=Lm, num_experts=cfg.num_experts, mlp=extra)


def host_experts(s: Sizes, placement: str, sizes: Sequence[int], staging: int = DISK_STAGING) -> int:
    """Host bytes of the expert tier for a placement and per-layer k."""
    if placement == "inclusive":
        return s.all_experts
    if placement == "exclusive":
        return (s.num_moe_layers * s.num_experts - sum(sizes) + 1) * s.expert     # + the swap's spare row
    return staging * s.expert                                               # disk: staging buffers only


def device_need(s: Sizes, placement: str, sizes: Sequence[int], cuda: bool) -> int:
    """Bytes mixoff allocates on the device (what torch's peak allocated should stay under on CUDA; on the
    CPU-as-device, the sum of trunk, slots, KV and RoPE tensors)."""
    base = s.trunk + s.kv + s.rope + sum(sizes) * s.expert
    if not cuda:
        return base
    swaps = placement == "exclusive" and sum(sizes) < s.num_moe_layers * s.num_experts
    stage = s.expert if swaps else 0
    return base + stage + s.scratch + s.activations


def host_need(s: Sizes, placement: str, sizes: Sequence[int], cuda: bool, overhead: int) -> int:
    """RAM the load and generation add to the process: the host tier, the overhead allowance, and on the
    CPU-as-device also the device tier and the compute scratch (they live in RAM there)."""
    h = host_experts(s, placement, sizes) + overhead
    if not cuda:
        h += device_need(s, placement, sizes, cuda) + s.scratch + s.activations
    return h


def spread(total_slots: int, num_moe_layers: int, num_experts: int) -> tuple[int, ...]:
    """``total_slots`` over the layers as evenly as possible (extra slots spaced out, not bunched)."""
    total_slots = min(total_slots, num_moe_layers * num_experts)
    k, extra = divmod(total_slots, num_moe_layers)
    sizes = [k] * num_moe_layers
    for j in range(extra):
        sizes[(j * num_moe_layers) // extra] += 1
    return tuple(sizes)


def expected_misses(sizes: Sequence[int], num_experts: int, top_k: int) -> float:
    """Misses per decoded token if routing were uniform and independent between tokens: each of the top_k
    experts of a layer is resident with probability k/E. Real routing repeats experts from token to token,
    so measured misses are lower (``python -m mixoff_app trace`` measures them on real prompts)."""
    return sum(top_k * (1 - min(k, num_experts) / num_experts) for k in sizes)


@dataclass
class Plan:
    feasible: bool
    placement: str
    sizes: tuple[int, ...]
    reason: str
    model: str
    device: str
    max_context: int
    quant: str
    bytes: Sizes
    device_cap: Optional[int]           # bytes mixoff may allocate on the device (after allowances)
    host_cap: Optional[int]             # bytes the load may add to the process's RAM (after allowances)
    device_total: int                   # device need of this plan (allocations)
    host_total: int                     # host need of this plan (including the overhead allowance)
    vram: Optional[int] = None          # the physical VRAM the plan was made for (None: a budget was given)
    ram: Optional[int] = None
    context_allowance: int = 0
    host_overhead: int = 0
    misses_per_token: float = 0.0
    rows: list = field(default_factory=list)     # (where, what, bytes)
    cuda: bool = True

    @property
    def k_range(self) -> str:
        """Experts per layer as people read them: "4", or "5-6" when the plan gives layers different k."""
        return format_k(self.sizes)

    def summary(self) -> str:
        if not self.feasible:
            return f"does not fit: {self.reason}"
        kdesc = f"k={self.k_range}"
        on = sum(self.sizes)
        tot = self.bytes.num_moe_layers * self.bytes.num_experts
        moved = self.misses_per_token * self.bytes.expert
        return (f"{self.placement}, {kdesc} per layer ({on}/{tot} experts on the "
                f"{'GPU' if self.cuda else 'device'}); expected misses/token ~{self.misses_per_token:.1f} "
                f"(uniform routing), {moved / GiB:.2f} GiB moved per token")

    def table(self, markdown: bool = False) -> str:
        lines = [f"plan for {self.model} on {self.device}, context {self.max_context} tokens, {self.quant}"]
        if not self.feasible:
            return "\n".join(lines + [self.summary()])
        hdr = ("where", "what", "GiB")
        body = [(w, what, f"{n / GiB:.2f}") for w, what, n in self.rows]
        dev = "GPU" if self.cuda else "device"
        if self.device_cap is not None:
            body.append((dev, "total / available", f"{(self.device_total + self.context_allowance) / GiB:.2f} / "
                         f"{(self.device_cap + self.context_allowance) / GiB:.2f}"))
        if self.host_cap is not None:
            body.append(("RAM", "total / available", f"{self.host_total / GiB:.2f} / "
                         f"{(self.host_cap + self.host_overhead) / GiB:.2f}"))
        if markdown:
            lines = [f"| {' | '.join(hdr)} |", "|---|---|---:|"] + [f"| {a} | {b} | {c} |" for a, b, c in body]
        else:
            w0 = max(len(r[0]) for r in body + [hdr])
            w1 = max(len(r[1]) for r in body + [hdr])
            lines.append(f"{hdr[0]:<{w0}}  {hdr[1]:<{w1}}  {hdr[2]:>12}")
            lines += [f"{a:<{w0}}  {b:<{w1}}  {c:>12}" for a, b, c in body]
        lines.append(("plan: " if self.feasible else "") + self.summary())
        return "\n".join(lines)


def _rows(p: Plan) -> list:
    s, dev, cuda = p.bytes, ("GPU" if p.cuda else "device"), p.cuda
    tot = s.num_moe_layers * s.num_experts
    kdesc = f"k={format_k(p.sizes)}"
    rows = []
    if cuda:
        rows.append((dev, "CUDA context (allowance)", p.context_allowance))
    rows += [(dev, f"attention ({p.quant.split(',')[0].replace('attention ', '')})", s.attention),
             (dev, "embeddings + lm_head", s.embed + s.lm_head),
             (dev, "norms + routers", s.norms + s.router),
             *([(dev, "dense MLPs / shared experts, biases, q/k norms", s.mlp)] if s.mlp else []),
             (dev, f"KV cache + RoPE ({p.max_context} tokens)", s.kv + s.rope),
             (dev, f"expert slots: {kdesc}, {sum(p.sizes)} x {s.expert / MiB:.1f} MiB", sum(p.sizes) * s.expert)]
    if cuda:
        if p.placement == "exclusive" and sum(p.sizes) < tot:
            rows.append((dev, "swap staging (1 expert)", s.expert))
        rows.append((dev, "dequant scratch + prefill activations", s.scratch + s.activations))
    off = tot - sum(p.sizes)
    if p.placement == "inclusive":
        rows.append(("RAM", f"experts, inclusive: all {tot}", s.all_experts))
    elif p.placement == "exclusive":
        rows.append(("RAM", f"experts, exclusive: {off} + 1 spare", host_experts(s, "exclusive", p.sizes)))
    else:
        rows.append(("RAM", f"disk staging ({DISK_STAGING} buffers)", host_experts(s, "disk", p.sizes)))
        rows.append(("disk", f"experts read on demand: {off} off the {dev}", off * s.expert))
    if not p.cuda:
        rows.append(("RAM", "device tier above (the CPU is the device)", p.device_total))
        rows.append(("RAM", "dequant scratch + prefill activations", s.scratch + s.activations))
    rows.append(("RAM", "runtime overhead (allowance)", p.host_overhead))
    return rows


def plan_for(model_cfg: ModelConfig, quant: QuantConfig, max_context: int, vram_bytes: Optional[int] = None,
             ram_bytes: Optional[int] = None, device: str | torch.device = "cuda",
             dtype: Optional[torch.dtype] = None, placement: Optional[str] = None,
             sizes: Optional[Sequence[int]] = None, vram_budget: Optional[int] = None,
             ram_budget: Optional[int] = None, disk_ok: bool = True, model_name: str = "model",
             host_overhead: Optional[int] = None) -> Plan:
    """Plan the expert placement and k per layer for a model on a machine.

    ``vram_bytes``/``ram_bytes``: physical free VRAM / available RAM (measured with pynvml/torch and psutil
    when None); the CUDA context and a runtime overhead are set aside from them. ``vram_budget``/
    ``ram_budget``: caps on what mixoff may allocate on the device / add to the process RSS (no allowance
    for the context is taken from a budget; the runtime overhead still is). ``placement``/``sizes``: fixed
    by the caller (then the plan only checks them), else chosen: the largest k that fits the device, then
    inclusive if the host can hold every expert, else exclusive, else disk (``disk_ok``: the checkpoint is in
    the mixoff format, or not known yet).
    """
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    dtype = dtype or (torch.float16 if cuda else torch.float32)
    quant = quant.for_family(model_cfg.family)
    max_context = min(max_context, model_cfg.max_position_embeddings)
    s = model_sizes(model_cfg, quant, max_context, dtype)
    L, E = model_cfg.num_moe_layers, model_cfg.num_experts
    overhead = host_overhead if host_overhead is not None else (HOST_OVERHEAD_CUDA if cuda else HOST_OVERHEAD_CPU)
    qdesc = f"attention {quant.attn.describe()}, experts {quant.experts.describe()}"

    if cuda and vram_bytes is None and vram_budget is None:
        from .memory import gpu_free_total, nvml_available
        got = gpu_free_total(dev.index or 0) if torch.cuda.is_available() or nvml_available(dev.index or 0) else None
        vram_bytes = got[0] if got else None
    if ram_bytes is None and ram_budget is None:
        from .memory import ram_available_total
        ram_bytes = ram_available_total()[0]

    context = CUDA_CONTEXT if cuda and vram_bytes is not None else 0
    device_cap = None
    if vram_bytes is not None:
        device_cap = vram_bytes - context
    if vram_budget is not None:
        device_cap = vram_budget if device_cap is None else min(device_cap, vram_budget)
    if cuda and device_cap is not None:
        device_cap -= max(DEVICE_MARGIN_MIN, int(DEVICE_MARGIN * device_cap))
    host_cap = None
    if ram_bytes is not None:
        host_cap = ram_bytes - overhead
    if ram_budget is not None:
        host_cap = ram_budget - overhead if host_cap is None else min(host_cap, ram_budget - overhead)

    def base_plan(ok: bool, pl: str, sz: tuple[int, ...], reason: str) -> Plan:
        p = Plan(feasible=ok, placement=pl, sizes=sz, reason=reason, model=model_name, device=str(dev),
                 max_context=max_context, quant=qdesc, bytes=s, device_cap=device_cap, host_cap=host_cap,
                 device_total=device_need(s, pl, sz, cuda) if sz else 0,
                 host_total=host_need(s, pl, sz, cuda, overhead) if sz else 0,
                 vram=vram_bytes, ram=ram_bytes, context_allowance=context, host_overhead=overhead,
                 misses_per_token=expected_misses(sz, E, model_cfg.top_k) if sz else 0.0, cuda=cuda)
        if sz:
            p.rows = _rows(p)
        if ok:
            p.reason = p.summary()
        return p

    if cuda and device_cap is None:
        return base_plan(False, placement or "inclusive", (), "no CUDA GPU is visible to measure free VRAM: "
                         "give --vram GB (the card's memory) or --vram-budget GB")

    def fits(pl: str, sz: Sequence[int]) -> bool:
        d = device_need(s, pl, sz, cuda)
        h = host_need(s, pl, sz, cuda, 0)
        return (device_cap is None or d <= device_cap) and (host_cap is None or h <= host_cap)

    def order(sz: Sequence[int]) -> list[str]:
        if placement:
            return [placement]
        if sum(sz) == L * E:       # everything on the device: the host needs no copies
            return ["exclusive", "inclusive"] if cuda else ["inclusive", "exclusive"]
        return ["inclusive", "exclusive"] + (["disk"] if disk_ok else [])

    if placement is not None and placement not in PLACEMENTS:
        raise ConfigError(f"unknown placement {placement!r}: choose one of {', '.join(PLACEMENTS)}")
    if placement == "disk" and not disk_ok:
        return base_plan(False, "disk", (), "--placement disk needs a mixoff-format checkpoint: convert it once "
                         "with `python -m mixoff_app quantize SRC OUT` and load OUT")

    # Each placement's most slots; a RAM tier beats the disk even at fewer slots (a disk read is far slower
    # than a bus copy); between the RAM tiers the most slots wins, inclusive on a tie (evictions move nothing).
    candidates = [tuple(sizes)] if sizes is not None else [spread(n, L, E) for n in range(L * E, L - 1, -1)]
    best: dict[str, tuple[int, ...]] = {}
    for sz in candidates:
        for pl in order(sz):
            if pl not in best and fits(pl, sz):
                best[pl] = sz
    for pl in ("exclusive", "inclusive") if best.get("exclusive") and sum(best["exclusive"]) == L * E else ():
        return base_plan(True, pl, best[pl], "fits")
    ram_tiers = [pl for pl in ("inclusive", "exclusive") if pl in best]
    if ram_tiers:
        pl = max(ram_tiers, key=lambda x: (sum(best[x]), x == "inclusive"))
        return base_plan(True, pl, best[pl], "fits")
    if "disk" in best:
        return base_plan(True, "disk", best["disk"], "fits")
    return base_plan(False, placement or "inclusive", tuple(sizes) if sizes is not None else (),
                     _refusal(s, model_cfg, cuda, device_cap, host_cap, context, overhead, placement, sizes,
                              disk_ok))


def _gib(n: int) -> str:
    return f"{n / GiB:.2f} GiB"


def _refusal(s: Sizes, cfg: ModelConfig, cuda: bool, device_cap, host_cap, context: int, overhead: int,
             placement: Optional[str], sizes, disk_ok: bool) -> str:
    """Why nothing fits, and what would."""
    L = cfg.num_moe_layers
    one = (1,) * L
    want = tuple(sizes) if sizes is not None else one
    parts = []
    dev = "VRAM" if cuda else "device memory"
    placements = [placement] if placement else ["exclusive"] + (["disk"] if disk_ok else [])
    need_dev = min(device_need(s, pl, want, cuda) for pl in placements)
    if device_cap is not None and need_dev > device_cap:
        margin = max(DEVICE_MARGIN_MIN, int(DEVICE_MARGIN * need_dev)) if cuda else 0
        total = need_dev + context + margin
        parts.append(f"needs at least {_gib(total)} of {dev} with k={want[0]}"
                     f"{' per layer' if sizes is None else ''} (trunk {_gib(s.trunk)}, KV cache {_gib(s.kv)}, "
                     f"{sum(want)} expert slots of {s.expert / MiB:.1f} MiB"
                     f"{', scratch and activations ' + _gib(s.scratch + s.activations) if cuda else ''}"
                     f"{', CUDA context ' + _gib(context) if context else ''}); "
                     f"{_gib(device_cap + context)} is available")
    if host_cap is not None:
        for pl in placements:
            h = host_need(s, pl, want, cuda, 0)
            if h > host_cap:
                parts.append(f"{pl} placement needs {_gib(h + overhead)} of RAM "
                             f"({_gib(host_cap + overhead)} available)")
            else:
                parts.append(f"{pl} placement would fit in RAM ({_gib(h + overhead)})")
        if not disk_ok and not placement:
            parts.append("--placement disk (experts read from the checkpoint file) needs "
                         f"{_gib(host_experts(s, 'disk', want) + overhead)} of RAM and a mixoff-format checkpoint "
                         "(python -m mixoff_app quantize SRC OUT)")
    if s.kv > s.expert * L and cuda:
        parts.append("a smaller --max-context frees KV cache")
    return "; ".join(parts) or "nothing fits"


def model_for_planning(name: str, quant: QuantConfig) -> tuple[ModelConfig, QuantConfig, bool, str]:
    """(config, quant, disk_ok, display name) from 'tiny', a preset name or a local checkpoint folder, offline."""
    key = name.lower()
    if key == "tiny":           # the model ``--model tiny`` runs, read from its checkpoint
        from .checkpoints import peek_checkpoint
        from .hub import tiny_path
        cfg, q, layout = peek_checkpoint(tiny_path(), quant)
        return cfg, q, False, "tiny"
    if preset_name(name) is not None:
        return from_name(name), quant, True, name
    if os.path.isdir(name):
        from .checkpoints import peek_checkpoint
        cfg, q, layout = peek_checkpoint(name, quant)
        return cfg, q, layout == "mixoff", name
    raise ConfigError(f"cannot plan for {name!r} offline: give a preset ({', '.join(PRESETS)}) or a local "
                      f"checkpoint folder")


def reference_plans(cfg: ModelConfig, quant: QuantConfig, max_context: int = 4096, name: str = "model") -> list:
    return [(m, plan_for(cfg, quant, max_context, vram_bytes=int(v * GiB), ram_bytes=int(r * GiB),
                         device="cuda", model_name=name))
            for m, v, r in MACHINES]


def reference_markdown(cfg: ModelConfig, quant: QuantConfig, max_context: int = 4096, name: str = "model") -> str:
    out = ["| machine | VRAM / RAM | placement | k per layer | experts on GPU | GPU use | RAM use | "
           "misses/token (uniform) |", "|---|---|---|---|---|---|---|---|"]
    for m, p in reference_plans(cfg, quant, max_context, name):
        out.append(f"| {m} | {p.vram / GiB:.1f} / {p.ram / GiB:.1f} GiB | " + _plan_cells(p, cfg))
    return "\n".join(out)


def _plan_cells(p: Plan, cfg: ModelConfig) -> str:
    """placement | k per layer | experts on GPU | GPU use | RAM use | misses/token |"""
    if not p.feasible:
        return "does not fit | | | | | |"
    return (f"{p.placement} | {format_k(p.sizes, counts=True)} | {sum(p.sizes)}/{cfg.num_moe_layers * cfg.num_experts} | "
            f"{(p.device_total + p.context_allowance) / GiB:.1f} GiB | {p.host_total / GiB:.1f} GiB | "
            f"{p.misses_per_token:.1f} |")


def presets_markdown(quant: QuantConfig, vram_gib: float, ram_gib: float, max_context: int = 4096,
                     names: Optional[Sequence[str]] = None) -> str:
    """One row per preset model for one machine (each with its family's quantization unless bits are given):
    the README's table of what runs where."""
    out = ["| model | family | experts | placement | k per layer | experts on GPU | GPU use | RAM use | "
           "misses/token (uniform) |", "|---|---|---|---|---|---|---|---|---|"]
    for name in names or [n for n, c in PRESETS.items() if not n.startswith(("tiny", "mid", "memory"))]:
        cfg = PRESETS[name]
        q = quant.for_family(cfg.family)
        p = plan_for(cfg, q, max_context, vram_bytes=int(vram_gib * GiB), ram_bytes=int(ram_gib * GiB),
                     device="cuda", model_name=name)
        short = re.search(r"needs at least [\d.]+ GiB of VRAM with k=1", p.reason or "")
        why = "" if p.feasible else f" ({short.group(0) if short else p.reason.split(';')[0]})"
        out.append(f"| {name}{why} | {cfg.family} | {q.experts.describe()}, {p.bytes.expert / MiB:.2f} MiB each | "
                   + _plan_cells(p, cfg))
    return "\n".join(out)
