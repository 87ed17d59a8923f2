"""Compact MoE forward: RMSNorm, RoPE, GQA attention over a static KV cache, sparse MoE over the cache.

One forward for every family in ``families.py``; what differs (attention biases, q/k norms, qkv clipping,
top-k renormalisation, a shared expert, dense layers) is a field of ``LayerWeights`` or ``ModelConfig`` read
at one place each. Dense layers' MLPs and shared experts are trunk: always on the device, never cached.
DeepSeek-V2's multi-head latent attention is the one other attention (``_mla_attention``), with its own cache
of one compressed latent per position; everything after the attention is shared.

A prompt is prefilled in chunks of at most ``PREFILL_CHUNK`` tokens of one sequence; a decode step takes one
token of each of B sequences (continuous batching), each with its own KV slot and position (``steps.py``).
Attention, norms, router, embeddings and lm_head stay on the device; the experts come from ``ExpertCache``
one layer at a time, each expert fetched once per step for every row routed to it. Expert outputs are summed
in a fixed order (by routing rank when decoding, by expert id in prefill), and every decode matmul gives a
row the bits it would get alone, so the result depends neither on which experts happened to be resident nor
on which other sequences share the step.

A decode layer is two halves, which the eager path and the CUDA graphs both call: ``layer_device`` (attention,
a dense MLP or the shared expert, the router and the prefetch guess: device work only) and ``layer_host``
(bring the packed routing to the host - the layer's one sync -, fetch, run and add the experts). The eager host
half is ``_experts_grouped``, whose per-expert Python is only what the cache needs (a fine-grained model runs
hundreds of experts a token); the CUDA graphs replay per-expert graphs through ``_experts_decode``, the loop it
replaced (tests/test_grouped_experts.py holds the two to the same bits on the CPU).

Indices: ``layer`` is a decoder layer (0..num_layers-1); ``moe`` is an expert layer, the position of a decoder
layer in ``cfg.moe_layers`` (what the cache, stores, stats and traces count); ``e`` is an expert.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from .config import PREFILL_CHUNK, ModelConfig
from .cpu_weights import BF16, Int4Weight, Int8Weight
from .expert_cache import ExpertCache
from .kernels import cpu as cpu_kernels
from .kernels import qlinear, swiglu
from .quant import QWeight
from .rope import frequencies, softmax_scale
from .stats import Stats
from .steps import Decode, KVCache, Prefill, RowByRow, Step
from .stores import ExpertWeights

Weight = torch.Tensor | QWeight
MLA_NORM_EPS = 1e-6      # DeepSeek-V2's q_a_layernorm and kv_a_layernorm: transformers' default, not the config's


@dataclass
class LayerWeights:
    attn_norm: torch.Tensor     # [H]
    ffn_norm: torch.Tensor      # [H]
    wq: Optional[Weight]        # [nh*hd, H]; None in MLA with a q LoRA (wq_a, wq_b)
    wk: Optional[Weight]        # [nkv*hd, H]; None in MLA
    wv: Optional[Weight]        # [nkv*hd, H]; None in MLA
    wo: Weight                  # [H, nh*hd] (MLA: [H, nh*v])
    gate: Optional[torch.Tensor]        # [E, H] router; None in a dense layer
    bq: Optional[torch.Tensor] = None   # attention biases (Qwen2-MoE: q/k/v; attention_bias: also o)
    bk: Optional[torch.Tensor] = None
    bv: Optional[torch.Tensor] = None
    bo: Optional[torch.Tensor] = None
    q_norm: Optional[torch.Tensor] = None   # [hd] per head (Qwen3-MoE) or [nh*hd] whole projection (OLMoE)
    k_norm: Optional[torch.Tensor] = None
    mlp: Optional[ExpertWeights] = None     # a dense layer's MLP (resident)
    shared: Optional[ExpertWeights] = None  # the shared expert (resident), scaled by sigmoid(shared_gate x)
    shared_gate: Optional[torch.Tensor] = None   # [1, H]; None: the shared expert(s) unscaled (DeepSeek-V2)
    # Multi-head latent attention (DeepSeek-V2): c = kv_lora_rank, rd = qk_rope_head_dim, nope = hd - rd
    wq_a: Optional[Weight] = None           # [q_lora, H] q_a_proj (when q_lora_rank is set)
    q_a_norm: Optional[torch.Tensor] = None  # [q_lora]
    wq_b: Optional[Weight] = None           # [nh*hd, q_lora] q_b_proj
    wkv_a: Optional[Weight] = None          # [c + rd, H] kv_a_proj_with_mqa: the latent and the shared rope key
    kv_a_norm: Optional[torch.Tensor] = None  # [c]
    wk_b: Optional[torch.Tensor] = None     # [nh, nope, c] kv_b_proj's key rows per head (absorbed into q)
    wv_b: Optional[torch.Tensor] = None     # [nh, c, v] kv_b_proj's value rows per head, transposed


@dataclass
class TrunkWeights:
    """Everything but the experts: always resident on the device."""
    embed: torch.Tensor         # [V, H]
    layers: list[LayerWeights]
    norm: torch.Tensor          # [H]
    lm_head: torch.Tensor       # [V, H]


def unit_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """RMS-normalised x without the weight, in float32 and back, as the reference computes it. On CUDA torch's
    fused kernel is one launch instead of five; on the CPU its composite is slower than the plain ops."""
    if x.is_cuda:
        return F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return w * unit_norm(x, eps)


def expert_forward(x: torch.Tensor, w: ExpertWeights, kernel: str = "torch", step=None) -> torch.Tensor:
    """An expert (or a dense MLP) on x [T, H]; ``step`` chooses how its rows are multiplied (``steps.py``)."""
    if step is None:
        return qlinear(swiglu(x, w.w1, w.w3, kernel), w.w2, kernel)
    return step.linear(step.swiglu(x, w.w1, w.w3, kernel), w.w2, kernel)


@dataclass
class Routed:
    """What ``layer_device`` leaves for ``layer_host``: the MoE input, routing weights in x's dtype [B, k], the
    packed transfer [B, experts | weights | guess] (float32), the prefetch target and the shared expert's output."""
    moe: int
    h: torch.Tensor
    wx: torch.Tensor
    packed: torch.Tensor
    target: Optional[int]
    shared: Optional[torch.Tensor]


class Prefetcher:
    """Guess the experts of layer l+d from layer l's hidden state (the residual stream changes slowly, so
    the later router applied early is a good guess) and start their copies while layer l computes.

    ``guess`` queues the guess on the device; the model brings it to the host in the same transfer as the
    layer's own routing, and ``issue`` starts the copies once the layer's own misses are queued."""

    def __init__(self, count: int, distance: int = 1) -> None:
        self.count, self.distance = count, distance
        self._gates: dict[int, torch.Tensor] = {}

    def target(self, model: "MoEModel", moe: int) -> Optional[int]:
        """The expert layer ``distance`` ahead (dense layers have nothing to fetch)."""
        t = moe + self.distance
        return t if t < model.cfg.num_moe_layers else None

    def guess(self, model: "MoEModel", target: int, n: torch.Tensor) -> torch.Tensor:
        """n: this layer's residual, RMS-normalised without weight [B, H] -> guessed experts [B, count]."""
        g = self._gates.get(target)
        if g is None:       # the target's norm weight folded into its gate: one matmul per guess
            lw = model.trunk.layers[model.cfg.moe_layers[target]]
            g = self._gates[target] = lw.gate * lw.ffn_norm
        return torch.topk(F.linear(n, g), self.count).indices

    def issue(self, model: "MoEModel", target: int, experts: list[int]) -> None:
        model.cache.hint(target, experts)
        model.cache.prefetch(target, experts)


class MoEModel:
    def __init__(self, cfg: ModelConfig, trunk: TrunkWeights, cache: ExpertCache, stats: Stats,
                 max_seq: int, device: torch.device, dtype: torch.dtype,
                 prefill_chunk: int = PREFILL_CHUNK, kernel: str = "torch", kv_slots: int = 1) -> None:
        self.cfg, self.trunk, self.cache, self.stats = cfg, trunk, cache, stats
        self.kernel = kernel              # what kernels.resolve_kernel decided
        self.device, self.dtype = torch.device(device), dtype
        self.max_seq = max_seq
        self.prefill_chunk = prefill_chunk
        self.prefetcher: Optional[Prefetcher] = None
        self.graphs = None       # cuda_graphs.DecodeGraphs when --cuda-graphs is on: one-row decode replays graphs
        # Decode experts through ``_experts_grouped`` (False: the per-expert loop it replaced, which
        # bench/fine_grained.py and the tests hold it to).
        self.grouped_experts = True
        self.cpu_experts = None  # cpu_experts.CpuExperts when --cpu-experts runs decode misses on the CPU
        self.moe_of = [-1] * cfg.num_layers      # decoder layer -> expert layer (-1: dense)
        for moe, layer in enumerate(cfg.moe_layers):
            self.moe_of[layer] = moe
        self.mla = cfg.mla
        # One KV cache per sequence slot (a chat, or each sequence of a batch), allocated once.
        L = cfg.num_layers
        shape = (max_seq, cfg.kv_width) if self.mla else (2, cfg.num_kv_heads, max_seq, cfg.head_dim)
        self.kv = KVCache(kv_slots, L, max_seq, shape, dtype, self.device, self.mla)
        if self.mla:
            self._mla_rope(cfg, max_seq)
            return
        hd = cfg.head_dim
        inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.int64).float() / hd))
        freqs = torch.outer(torch.arange(max_seq, dtype=torch.float32), inv)          # [S, hd/2]
        self.cos = torch.cat((freqs, freqs), dim=-1).cos().to(dtype=dtype, device=self.device)   # [S, hd]
        # rotate_half(x) * sin == swap_halves(x) * (-sin | sin): the sign lives in the table, and the
        # rotation is one flip instead of a negation and a concatenation.
        self.sin = torch.cat((-freqs, freqs), dim=-1).sin().to(dtype=dtype, device=self.device)

    def _mla_rope(self, cfg: ModelConfig, max_seq: int) -> None:
        # The cache holds, per position, the normed latent [c] and the rotated shared key [rd] side by side (576
        # values a position for DeepSeek-V2-Lite, against 16 * (192 + 128) for per-head K and V). Attention runs
        # in the latent space: kv_b_proj's key half is absorbed into the query and its value half applied after
        # the softmax, so no per-head K or V is ever expanded.
        inv, factor = frequencies(cfg)
        freqs = torch.outer(torch.arange(max_seq, dtype=torch.float32), inv)           # [S, rd/2]
        # DeepSeek's rope pairs neighbours (x[2i], x[2i+1]), as transformers' complex rotation does: the
        # rotation is the pairs swapped times (-sin, sin) plus x times cos, each value repeated per pair.
        self.cos = (freqs.cos() * factor).repeat_interleave(2, dim=-1).to(dtype=self.dtype, device=self.device)
        s = freqs.sin() * factor
        self.sin = torch.stack((-s, s), dim=-1).flatten(-2).to(dtype=self.dtype, device=self.device)
        self.mla_scale = softmax_scale(cfg)

    @property
    def kv_slots(self) -> int:
        return self.kv.slots

    def free_scratch(self) -> None:
        """After a failed step (out of memory): hand the allocator's cached blocks back to the device."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()

    # ---- entry points ---------------------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, pos: int, last_only: bool = True, seq: int = 0) -> torch.Tensor:
        """ids: [T] token ids of the sequence in KV slot ``seq`` at positions pos..pos+T-1 -> logits [1 or T, V]
        (float32). One token is a one-row decode step; more are a prefill, in chunks."""
        T = ids.shape[0]
        if pos + T > self.max_seq:
            raise ValueError(f"context of {pos + T} tokens exceeds the allocated {self.max_seq}")
        if T == 1:
            return self.decode(ids, [pos], [seq])
        c, kept = self.prefill_chunk, []
        for s in range(0, T, c):
            x = self.prefill_chunk_hidden(ids[s:s + c], Prefill(self, seq, pos + s, min(c, T - s)))
            if not last_only:
                kept.append(x)
        x = torch.cat(kept) if not last_only else x[-1:]
        return qlinear(rms_norm(x, self.trunk.norm, self.cfg.rms_norm_eps), self.trunk.lm_head, self.kernel).float()

    @torch.inference_mode()
    def decode(self, ids: torch.Tensor, pos: list[int], seqs: list[int]) -> torch.Tensor:
        """One token of each of B sequences: ids [B], row b at position pos[b] of KV slot seqs[b] -> logits
        [B, V] float32, each row bit for bit what that sequence would get decoding alone."""
        if max(pos) >= self.max_seq:
            raise ValueError(f"context of {max(pos) + 1} tokens exceeds the allocated {self.max_seq}")
        if len(seqs) == 1 and self.graphs is not None:
            x = self.graphs.step(ids, pos[0], seqs[0])
            step = None
        else:
            step = Decode(self, seqs, pos)
            x = self.decode_hidden(ids, step)
        h = rms_norm(x, self.trunk.norm, self.cfg.rms_norm_eps)
        lm = self.trunk.lm_head          # dense, or int8 on the CPU kernels
        return (qlinear(h, lm, self.kernel) if step is None else step.linear(h, lm, self.kernel)).float()

    def decode_hidden(self, ids: torch.Tensor, step: Step) -> torch.Tensor:
        """ids [B] -> the last hidden states [B, H]; fills each row's KV slot at its position."""
        self.cache.next_token()
        x = F.embedding(ids, self.trunk.embed)                                      # [B, H]
        for layer in range(self.cfg.num_layers):
            routed = self.layer_device(layer, x, step)
            if routed is not None:
                self.layer_host(routed, x)
        return x

    def prefill_chunk_hidden(self, ids: torch.Tensor, step: Prefill) -> torch.Tensor:
        """ids [T] (one chunk of one sequence) -> the hidden states [T, H]; fills its KV at step's positions."""
        cfg = self.cfg
        x = F.embedding(ids, self.trunk.embed)                                      # [T, H]
        for layer, lw in enumerate(self.trunk.layers):
            x.add_(self._attention(layer, lw, rms_norm(x, lw.attn_norm, cfg.rms_norm_eps), step))
            h = rms_norm(x, lw.ffn_norm, cfg.rms_norm_eps)
            moe = self.moe_of[layer]
            if moe < 0:                    # a dense layer: its MLP is trunk
                x.add_(expert_forward(h, lw.mlp, self.kernel, step))
                continue
            shared = self._shared(lw, h, step) if lw.shared is not None else None
            x.add_(self._moe_prefill(moe, lw, h))
            if shared is not None:
                x.add_(shared)
        return x

    # ---- a decode layer: the device half and the host half --------------------------------------
    def layer_device(self, layer: int, x: torch.Tensor, step: Step) -> Optional[Routed]:
        """Device work of decoder layer ``layer`` on x [B, H], in place: attention, then a dense MLP (the whole
        layer: returns None) or the shared expert, router and prefetch guess (returns what the host needs)."""
        cfg, lw = self.cfg, self.trunk.layers[layer]
        x.add_(self._attention(layer, lw, rms_norm(x, lw.attn_norm, cfg.rms_norm_eps), step))
        moe = self.moe_of[layer]
        if moe < 0:
            x.add_(expert_forward(rms_norm(x, lw.ffn_norm, cfg.rms_norm_eps), lw.mlp, self.kernel, step))
            return None
        n = unit_norm(x, cfg.rms_norm_eps)
        h = lw.ffn_norm * n
        shared = self._shared(lw, h, step) if lw.shared is not None else None
        w, idx = self._route(lw, h, step)
        parts = [idx.float(), w]
        pf = self.prefetcher
        target = pf.target(self, moe) if pf is not None else None
        if target is not None:
            parts.append(pf.guess(self, target, n).float())
        return Routed(moe, h, w.to(x.dtype), torch.cat(parts, dim=-1), target, shared)

    def layer_host(self, r: Routed, x: torch.Tensor, run=None) -> None:
        """The host half: the layer's one deliberate sync (the host must know what to fetch and prefetch), then
        the experts, added to x in place by routing rank, then the shared expert."""
        got = r.packed.tolist()
        # --cpu-experts (off by default) decides per miss in the per-expert loop, where its hook lives.
        if run is None and self.grouped_experts and self.cpu_experts is None:
            self._experts_grouped(r.moe, x, r.h, r.wx, got, r.target)
        else:
            self._experts_decode(r.moe, x, r.h, r.wx, got, r.target, run or self._run_expert)
        if r.shared is not None:
            x.add_(r.shared)

    def _route_rows(self, moe: int, got: list, target: Optional[int]):
        """The host's bookkeeping of a decode layer's routing, the same for both expert loops: each row's
        experts recorded (with its hits when several rows share the fetch), each expert's users -> (users,
        the prefetch guess or None)."""
        K, B = self.cfg.top_k, len(got)
        chosen = [[int(e) for e in g[:K]] for g in got]
        users: dict[int, list[tuple[int, int]]] = {}          # expert -> (row, rank) in row order
        for b, experts in enumerate(chosen):
            for r, e in enumerate(experts):
                users.setdefault(e, []).append((b, r))
        # One row: the cache's own hit/miss counts are the row's. Several: each row's look-ups are counted
        # against what was resident before the step's one fetch of their union.
        held = {e for e in users if self.cache.holds(moe, e)} if B > 1 else None
        for b, (g, experts) in enumerate(zip(got, chosen)):
            self.stats.on_route(moe, tuple(experts), tuple(g[K:2 * K]), b,
                                None if held is None else sum(e in held for e in experts))
        guess = None
        if target is not None:
            guess = list(dict.fromkeys(int(e) for g in got for e in g[2 * K:]))
        return users, guess

    def _experts_grouped(self, moe: int, x: torch.Tensor, h: torch.Tensor, wx: torch.Tensor, got: list,
                         target: Optional[int]) -> None:
        """``_experts_decode`` with the per-expert work hoisted out of the loop, bit for bit the same sums: h
        converted to the kernels' bfloat16 once per layer, each expert one direct call into the CPU kernels
        (``cpu.expert``) where its format and rows allow, and the outputs added rank by rank over all rows at
        once (K adds a layer, not B x K). Every add is the same elementwise x + o * w per row in the same rank
        order as before, so neither the batch nor this loop changes a bit. Formats or kernels without a direct
        call (hqq, Triton, the reference path, dense rows of several sequences) go through ``_run_expert``."""
        K, B = self.cfg.top_k, len(got)
        users, guess = self._route_rows(moe, got, target)
        cache = self.cache
        release = cache.release if cache.cuda else None
        rows_alone = self.kernel == "cpu" and cpu_kernels.probe().rows_alone
        kind, hk, expert = None, h, cpu_kernels.expert
        outs: list[Optional[torch.Tensor]] = [None] * (B * K)      # [b * K + r]: row b's rank-r output
        for n, (e, ew, slot) in enumerate(cache.fetch(moe, list(users))):
            if guess is not None:
                # fetch has queued this layer's own misses; the guesses go behind them on the copy stream,
                # so a demand copy never waits for a speculative one.
                self.prefetcher.issue(self, target, guess)
                guess = None
            if kind is None:           # every slot of the cache holds one format: decided at the first expert
                kind = self._direct_kind(ew)
                if kind == "int":
                    hk = h.to(BF16)
            u = users[e]
            if B == 1:                 # the fine-grained model's every step: the direct call without a frame more
                outs[u[0][1]] = (expert(hk, *ew) if kind == "int"
                                 else self._one_expert(kind, moe, slot, n, h, hk, ew, True, rows_alone))
            elif len(u) == 1:
                b, r = u[0]
                outs[b * K + r] = self._one_expert(kind, moe, slot, n, h[b:b + 1], hk[b:b + 1], ew, True, rows_alone)
            else:
                rows = sorted({b for b, _ in u})
                hr = h[rows]
                y = self._one_expert(kind, moe, slot, n, hr, hr if hk is h else hk[rows], ew, len(rows) == 1,
                                     rows_alone)
                for b, r in u:
                    i = rows.index(b)
                    outs[b * K + r] = y[i:i + 1]
            if release is not None:
                release(moe, slot)
        if B == 1:
            for r in range(K):
                x.addcmul_(outs[r], wx[:, r:r + 1])
            return
        o = torch.cat(outs).view(B, K, -1)                                          # [B, K, H]
        for r in range(K):
            x.addcmul_(o[:, r], wx[:, r:r + 1])

    def _direct_kind(self, ew: ExpertWeights) -> Optional[str]:
        """Which direct call runs this expert format: "int" (the CPU kernels' int4/int8), "dense" (float weights
        under the CPU kernels), None (``_run_expert``)."""
        if self.kernel != "cpu":
            return None
        if all(isinstance(w, (Int4Weight, Int8Weight)) for w in ew):
            return "int"
        if all(isinstance(w, torch.Tensor) for w in ew):
            return "dense"
        return None

    def _one_expert(self, kind: Optional[str], moe: int, slot: int, n: int, h: torch.Tensor, hk: torch.Tensor,
                    ew: ExpertWeights, one_row: bool, rows_alone: bool) -> torch.Tensor:
        """An expert on its rows: h in the model's dtype, hk the same rows as the direct call reads them."""
        if kind == "int" and (one_row or rows_alone):
            return cpu_kernels.expert(hk, ew.w1, ew.w3, ew.w2)
        if kind == "dense" and one_row:
            return cpu_kernels.dense_expert(h, ew.w1, ew.w3, ew.w2)
        return self._run_expert(moe, slot, n, h, ew)

    def _experts_decode(self, moe: int, x: torch.Tensor, h: torch.Tensor, wx: torch.Tensor, got: list,
                        target: Optional[int], run) -> None:
        """Record each row's routing, fetch the union of the rows' experts once (prefetch behind the layer's own
        misses), run each expert once on the rows routed to it, add to each row in routing-rank order. The
        CUDA graphs' loop (``run`` replays an expert's graph), and the per-expert reference of
        ``_experts_grouped``."""
        K, B = self.cfg.top_k, len(got)
        users, guess = self._route_rows(moe, got, target)
        outs: list[list[Optional[torch.Tensor]]] = [[None] * K for _ in range(B)]
        # Misses the cost model sends to the CPU (cpu_experts.py) skip the cache: no slot, no copy, no eviction.
        on_cpu = self.cpu_experts.choose(moe, users, self.cache) if self.cpu_experts is not None else []
        for n, (e, ew, slot) in enumerate(self.cache.fetch_each(moe, [e for e in users if e not in on_cpu])):
            if guess is not None:
                # fetch has queued this layer's own misses; the guesses go behind them on the copy stream,
                # so a demand copy never waits for a speculative one.
                self.prefetcher.issue(self, target, guess)
                guess = None
            rows = sorted({b for b, _ in users[e]})
            y = run(moe, slot, n, h if len(rows) == B else h[rows], ew)
            for b, r in users[e]:
                i = rows.index(b)
                outs[b][r] = y[i:i + 1]
            self.cache.release(moe, slot)
        if guess is not None:              # every expert ran on the CPU: nothing was queued ahead of the guesses
            self.prefetcher.issue(self, target, guess)
        for e in on_cpu:                   # after the device's work is queued, so the two overlap
            rows = sorted({b for b, _ in users[e]})
            y = self.cpu_experts.run(moe, e, h if len(rows) == B else h[rows])
            for b, r in users[e]:
                i = rows.index(b)
                outs[b][r] = y[i:i + 1]
        for b in range(B):
            xb = x[b:b + 1]
            for r in range(K):
                xb.addcmul_(outs[b][r], wx[b, r])

    def _run_expert(self, moe: int, slot: int, n: int, h: torch.Tensor, ew: ExpertWeights) -> torch.Tensor:
        """An expert on the decode rows routed to it, h [R, H], each row as it would be alone."""
        return expert_forward(h, ew, self.kernel, RowByRow)

    # ---- pieces -----------------------------------------------------------------------------------
    def _proj(self, x: torch.Tensor, w: Weight, b: Optional[torch.Tensor], step: Step) -> torch.Tensor:
        y = step.linear(x, w, self.kernel)
        return y if b is None else y + b

    def _shared(self, lw: LayerWeights, h: torch.Tensor, step: Step) -> torch.Tensor:
        """The shared expert on the normed h: every token, scaled by sigmoid(shared_gate h) (Qwen2-MoE) or not
        (DeepSeek-V2, whose shared experts are one MLP of their summed width)."""
        y = expert_forward(h, lw.shared, self.kernel, step)
        return y if lw.shared_gate is None else torch.sigmoid(step.linear(h, lw.shared_gate, self.kernel)) * y

    def _attention(self, layer: int, lw: LayerWeights, x: torch.Tensor, step: Step) -> torch.Tensor:
        """x [T, H] (normed) -> the attention's output [T, H], the step's K/V written to the cache."""
        if self.mla:
            return self._mla_attention(layer, lw, x, step)
        cfg, T = self.cfg, x.shape[0]
        q, k, v = self._qkv(lw, x, step)
        o = step.gqa(self.kv, layer, q, k, v)                                     # [T, nh, hd]
        return self._proj(o.reshape(T, cfg.num_heads * cfg.head_dim), lw.wo, lw.bo, step)

    def _qkv(self, lw: LayerWeights, x: torch.Tensor, step: Step):
        """x [T, H] (normed) -> q [T, nh, hd], k and v [T, nkv, hd], q and k rotated."""
        cfg, T = self.cfg, x.shape[0]
        nh, nkv, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        q, k, v = self._proj(x, lw.wq, lw.bq, step), self._proj(x, lw.wk, lw.bk, step), self._proj(x, lw.wv, lw.bv, step)
        qk_norm, eps = cfg.traits.qk_norm, cfg.rms_norm_eps
        if qk_norm == "proj":          # OLMoE: over the whole projection, before the heads are split
            q, k = rms_norm(q, lw.q_norm, eps), rms_norm(k, lw.k_norm, eps)
        if cfg.clip_qkv is not None:
            c = cfg.clip_qkv
            q, k, v = q.clamp(-c, c), k.clamp(-c, c), v.clamp(-c, c)
        if qk_norm == "head":          # Qwen3-MoE: per head, over head_dim
            q = rms_norm(q.view(T, nh, hd), lw.q_norm, eps).view(T, nh * hd)
            k = rms_norm(k.view(T, nkv, hd), lw.k_norm, eps).view(T, nkv * hd)
        # q and k side by side, so RoPE is one pass over both.
        qk = torch.cat((q, k), dim=-1).view(T, nh + nkv, hd)
        qk = torch.addcmul(qk * step.cos, qk.view(T, nh + nkv, 2, hd // 2).flip(2).view(T, nh + nkv, hd), step.sin)
        return qk[:, :nh], qk[:, nh:], v.view(T, nkv, hd)

    def _mla_attention(self, layer: int, lw: LayerWeights, x: torch.Tensor, step: Step) -> torch.Tensor:
        """Multi-head latent attention over the latent cache, x [T, H] (normed) -> [T, H]."""
        cfg, T, kn = self.cfg, x.shape[0], self.kernel
        nh, hd, rd, c = cfg.num_heads, cfg.head_dim, cfg.qk_rope_head_dim, cfg.kv_lora_rank
        nope = hd - rd
        if lw.wq is not None:
            q = step.linear(x, lw.wq, kn)
        else:      # q_a_layernorm and kv_a_layernorm keep transformers' default eps, not rms_norm_eps
            q = step.linear(rms_norm(step.linear(x, lw.wq_a, kn), lw.q_a_norm, MLA_NORM_EPS), lw.wq_b, kn)
        q = q.view(T, nh, hd)
        ckv = step.linear(x, lw.wkv_a, kn)                                           # [T, c + rd]
        # The heads' rope parts and the one shared rope key, rotated in one pass: [T, nh + 1, rd].
        pe = torch.cat((q[..., nope:], ckv[:, None, c:]), dim=1)
        pe = torch.addcmul(pe * step.cos, pe.view(T, nh + 1, rd // 2, 2).flip(-1).view(T, nh + 1, rd), step.sin)
        entry = torch.cat((rms_norm(ckv[:, :c], lw.kv_a_norm, MLA_NORM_EPS), pe[:, nh]), dim=-1)   # [T, c + rd]
        # The query in the latent space: q_nope times kv_b's key half per head, beside q's rotated part.
        ql = torch.cat((step.matmul(q[..., :nope].transpose(0, 1), lw.wk_b), pe[:, :nh].transpose(0, 1)),
                       dim=-1)                                                       # [nh, T, c + rd]
        o = step.mla(self.kv, layer, ql, entry, self.mla_scale, c)                   # [nh, T, c]
        o = step.matmul(o, lw.wv_b)                                                  # [nh, T, v]
        return step.linear(o.transpose(0, 1).reshape(T, nh * cfg.v_head_dim), lw.wo, kn)

    def _route(self, lw: LayerWeights, h: torch.Tensor, step: Optional[Step] = None):
        """Top-k experts and their weights: w [T, k] float32, idx [T, k]. Renormalised over the k (a softmax
        over the top-k logits is the full softmax renormalised) unless the family says not (``norm_topk_prob``
        false: the full softmax's top-k probabilities)."""
        logits = F.linear(h, lw.gate) if step is None else step.linear(h, lw.gate, self.kernel)
        if self.cfg.norm_topk_prob:
            top, idx = torch.topk(logits, self.cfg.top_k, dim=-1)
            return torch.softmax(top, dim=-1, dtype=torch.float32), idx
        w, idx = torch.topk(torch.softmax(logits, dim=-1, dtype=torch.float32), self.cfg.top_k, dim=-1)
        if self.cfg.routed_scaling != 1.0:      # DeepSeek-V2's routed_scaling_factor
            w = w * self.cfg.routed_scaling
        return w, idx

    def _moe_prefill(self, moe: int, lw: LayerWeights, h: torch.Tensor) -> torch.Tensor:
        K, E = self.cfg.top_k, self.cfg.num_experts
        w, idx = self._route(lw, h)
        self.stats.on_prefill_route(moe, idx)
        flat = idx.flatten()                                                        # [T*k] token-major
        order = torch.argsort(flat, stable=True)          # (token, rank) slots grouped by expert, in token order
        counts = torch.bincount(flat, minlength=E).tolist()      # the one sync per layer and chunk
        starts = [sum(counts[:e]) for e in range(E)]
        experts = [e for e in range(E) if counts[e]]
        wf = w.to(h.dtype).flatten()
        parts: dict[int, tuple] = {}
        for e, ew, slot in self.cache.fetch(moe, experts):
            rows = order[starts[e]:starts[e] + counts[e]]
            tok = rows // K
            parts[e] = (tok, expert_forward(h[tok], ew, self.kernel) * wf[rows, None])
            self.cache.release(moe, slot)
        y = torch.zeros_like(h)
        for e in experts:                      # fixed order: the sum does not depend on cache state
            y.index_add_(0, *parts[e])
        return y
