"""Compact MoE forward: RMSNorm, RoPE, GQA attention over a static KV cache, sparse MoE over the cache.

One forward for every family in ``families.py``; what differs (attention biases, q/k norms, qkv clipping,
top-k renormalisation, a shared expert, dense layers) is a field of ``LayerWeights`` or ``ModelConfig`` read
at one place each. Dense layers' MLPs and shared experts are trunk: always on the device, never cached.
DeepSeek-V2's multi-head latent attention is the one other attention (``_mla_attention``), with its own cache
of one compressed latent per position; everything after the attention is shared.

Batch size is one (a chat). Attention, norms, router, embeddings and lm_head stay on the device; the
experts come from ``ExpertCache`` one layer at a time. Expert outputs are summed in a fixed order (by
routing rank when decoding, by expert id in prefill) so the result never depends on which experts
happened to be resident: logits are identical for any cache size, policy or prefetch setting.

A decode step brings exactly one small tensor per layer to the host: the router's experts and weights
and the prefetcher's guess for a later layer, packed together (the host must know what to fetch). Prompts
are prefilled in chunks of at most ``PREFILL_CHUNK`` tokens, so activations are bounded by the chunk, not
the prompt.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from .config import PREFILL_CHUNK, ModelConfig
from .expert_cache import ExpertCache
from .kernels import qlinear, swiglu
from .quant import QWeight
from .rope import frequencies, softmax_scale
from .stats import Stats
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


def expert_forward(x: torch.Tensor, w: ExpertWeights, kernel: str = "torch") -> torch.Tensor:
    return qlinear(swiglu(x, w.w1, w.w3, kernel), w.w2, kernel)


def _proj(x: torch.Tensor, w: Weight, b: Optional[torch.Tensor], kernel: str) -> torch.Tensor:
    y = qlinear(x, w, kernel)
    return y if b is None else y + b


class Prefetcher:
    """Guess the experts of layer l+d from layer l's hidden state (the residual stream changes slowly, so
    the later router applied early is a good guess) and start their copies while layer l computes.

    ``guess`` queues the guess on the device; the model brings it to the host in the same transfer as the
    layer's own routing, and ``issue`` starts the copies once the layer's own misses are queued."""

    def __init__(self, count: int, distance: int = 1) -> None:
        self.count, self.distance = count, distance
        self._gates: dict[int, torch.Tensor] = {}

    def target(self, model: "MoEModel", layer: int) -> Optional[int]:
        """The expert layer ``distance`` ahead (layers count expert layers: dense ones have nothing to fetch)."""
        t = layer + self.distance
        return t if t < model.cfg.num_moe_layers else None

    def guess(self, model: "MoEModel", target: int, n: torch.Tensor) -> torch.Tensor:
        """n: this layer's residual, RMS-normalised without weight [1, H] -> guessed experts [count]."""
        g = self._gates.get(target)
        if g is None:       # the target's norm weight folded into its gate: one matmul per guess
            lw = model.trunk.layers[model.cfg.moe_layers[target]]
            g = self._gates[target] = lw.gate * lw.ffn_norm
        return torch.topk(F.linear(n[-1], g), self.count).indices

    def issue(self, model: "MoEModel", target: int, experts: list[int]) -> None:
        model.cache.hint(target, experts)
        model.cache.prefetch(target, experts)


class MoEModel:
    def __init__(self, cfg: ModelConfig, trunk: TrunkWeights, cache: ExpertCache, stats: Stats,
                 max_seq: int, device: torch.device, dtype: torch.dtype,
                 prefill_chunk: int = PREFILL_CHUNK, kernel: str = "torch") -> None:
        self.cfg, self.trunk, self.cache, self.stats = cfg, trunk, cache, stats
        self.kernel = kernel              # "torch" | "triton", as kernels.resolve_kernel decided
        self.device, self.dtype = torch.device(device), dtype
        self.max_seq = max_seq
        self.prefill_chunk = prefill_chunk
        self.prefetcher: Optional[Prefetcher] = None
        self.graphs = None       # cuda_graphs.DecodeGraphs when --cuda-graphs is on: decode steps replay graphs
        L, nkv, hd = cfg.num_layers, cfg.num_kv_heads, cfg.head_dim
        self.expert_layer = [-1] * L      # decoder layer -> expert layer (-1: dense)
        for j, i in enumerate(cfg.moe_layers):
            self.expert_layer[i] = j
        self.mla = cfg.mla
        if self.mla:
            self._init_mla(cfg, max_seq)
            return
        # Static KV cache, allocated once: [layer, k|v, kv_head, position, head_dim]; a head's keys are
        # contiguous, which is what attention reads.
        self.kv = torch.zeros((L, 2, nkv, max_seq, hd), dtype=dtype, device=self.device)
        inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.int64).float() / hd))
        freqs = torch.outer(torch.arange(max_seq, dtype=torch.float32), inv)          # [S, hd/2]
        self.cos = torch.cat((freqs, freqs), dim=-1).cos().to(dtype=dtype, device=self.device)   # [S, hd]
        # rotate_half(x) * sin == swap_halves(x) * (-sin | sin): the sign lives in the table, and the
        # rotation is one flip instead of a negation and a concatenation.
        self.sin = torch.cat((-freqs, freqs), dim=-1).sin().to(dtype=dtype, device=self.device)

    def _init_mla(self, cfg: ModelConfig, max_seq: int) -> None:
        # The cache holds, per layer and position, the normed latent [c] and the rotated shared key [rd] side by
        # side: [layer, position, c + rd] (576 values a position for DeepSeek-V2-Lite, against 16 * (192 + 128)
        # for per-head K and V). Attention runs in the latent space: kv_b_proj's key half is absorbed into the
        # query and its value half applied after the softmax, so no per-head K or V is ever expanded.
        self.kv = torch.zeros((cfg.num_layers, max_seq, cfg.kv_width), dtype=self.dtype, device=self.device)
        inv, factor = frequencies(cfg)
        freqs = torch.outer(torch.arange(max_seq, dtype=torch.float32), inv)           # [S, rd/2]
        # DeepSeek's rope pairs neighbours (x[2i], x[2i+1]), as transformers' complex rotation does: the
        # rotation is the pairs swapped times (-sin, sin) plus x times cos, each value repeated per pair.
        self.cos = (freqs.cos() * factor).repeat_interleave(2, dim=-1).to(dtype=self.dtype, device=self.device)
        s = freqs.sin() * factor
        self.sin = torch.stack((-s, s), dim=-1).flatten(-2).to(dtype=self.dtype, device=self.device)
        self.mla_scale = softmax_scale(cfg)

    def free_scratch(self) -> None:
        """After a failed step (out of memory): hand the allocator's cached blocks back to the device."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()

    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, pos: int, last_only: bool = True) -> torch.Tensor:
        """ids: [T] token ids at positions pos..pos+T-1 -> logits [1 or T, V] (float32)."""
        T = ids.shape[0]
        if pos + T > self.max_seq:
            raise ValueError(f"context of {pos + T} tokens exceeds the allocated {self.max_seq}")
        if T == 1 and self.graphs is not None:
            x = self.graphs.step(ids, pos)
        else:
            c, kept = self.prefill_chunk, []
            for s in range(0, T, c):
                x = self._layers(ids[s:s + c], pos + s)
                if not last_only:
                    kept.append(x)
            x = torch.cat(kept) if not last_only else x[-1:]
        return F.linear(rms_norm(x, self.trunk.norm, self.cfg.rms_norm_eps), self.trunk.lm_head).float()

    def _layers(self, ids: torch.Tensor, pos: int) -> torch.Tensor:
        """ids: [T] (one chunk) -> the last hidden states [T, H]; fills the KV cache at pos..pos+T-1."""
        cfg, T = self.cfg, ids.shape[0]
        x = F.embedding(ids, self.trunk.embed)                                      # [T, H]
        cos, sin = self.cos[pos:pos + T, None, :], self.sin[pos:pos + T, None, :]   # [T, 1, hd]
        mask = None
        if T > 1 and pos > 0:
            # Query i sees keys 0..pos+i; built once per chunk and shared by every head and layer.
            mask = torch.ones((T, pos + T), dtype=torch.bool, device=self.device).tril(diagonal=pos)
        decode = T == 1
        if decode:
            self.cache.next_token()
        attention = self._mla_attention if self.mla else self._attention
        for i, lw in enumerate(self.trunk.layers):
            x = x + attention(i, lw, rms_norm(x, lw.attn_norm, cfg.rms_norm_eps), pos, cos, sin, mask)
            j = self.expert_layer[i]
            if j < 0:                      # a dense layer: its MLP is trunk
                x = x + expert_forward(rms_norm(x, lw.ffn_norm, cfg.rms_norm_eps), lw.mlp, self.kernel)
                continue
            shared = self._shared(lw, x) if lw.shared is not None else None     # before x is added to
            if decode:
                x = self._moe_decode(j, lw, x)
            else:
                x = x + self._moe_prefill(j, lw, rms_norm(x, lw.ffn_norm, cfg.rms_norm_eps))
            if shared is not None:
                x = x + shared
        return x

    def _shared(self, lw: LayerWeights, x: torch.Tensor) -> torch.Tensor:
        """The shared expert: every token, scaled by sigmoid(shared_gate h) (Qwen2-MoE) or not (DeepSeek-V2,
        whose shared experts are one MLP of their summed width)."""
        h = rms_norm(x, lw.ffn_norm, self.cfg.rms_norm_eps)
        y = expert_forward(h, lw.shared, self.kernel)
        return y if lw.shared_gate is None else torch.sigmoid(F.linear(h, lw.shared_gate)) * y

    def _qkv(self, lw: LayerWeights, x: torch.Tensor, cos, sin):
        """x [T, H] (normed) -> q [T, nh, hd], k and v [T, nkv, hd], q and k rotated."""
        cfg, T = self.cfg, x.shape[0]
        nh, nkv, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        kn = self.kernel
        q, k, v = _proj(x, lw.wq, lw.bq, kn), _proj(x, lw.wk, lw.bk, kn), _proj(x, lw.wv, lw.bv, kn)
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
        qk = torch.addcmul(qk * cos, qk.view(T, nh + nkv, 2, hd // 2).flip(2).view(T, nh + nkv, hd), sin)
        return qk[:, :nh], qk[:, nh:], v.view(T, nkv, hd)

    def _attention(self, i: int, lw: LayerWeights, x: torch.Tensor, pos: int, cos, sin, mask) -> torch.Tensor:
        cfg, T = self.cfg, x.shape[0]
        nh, nkv, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        q, k, v = self._qkv(lw, x, cos, sin)
        self.kv[i, 0, :, pos:pos + T] = k.transpose(0, 1)
        self.kv[i, 1, :, pos:pos + T] = v.transpose(0, 1)
        K = self.kv[i, 0, :, :pos + T]                                              # [nkv, S, hd]
        V = self.kv[i, 1, :, :pos + T]
        if T == 1:
            # Grouped-query attention without repeating K/V: the g query heads that share a KV head are
            # the g query rows against that head (query head h uses KV head h // g).
            o = F.scaled_dot_product_attention(q.view(1, nkv, nh // nkv, hd), K[None], V[None])
            return self._attention_out(lw, o)
        o = F.scaled_dot_product_attention(q.transpose(0, 1)[None], K[None], V[None], attn_mask=mask,
                                           is_causal=mask is None, enable_gqa=True)[0]   # [nh, T, hd]
        return _proj(o.transpose(0, 1).reshape(T, nh * hd), lw.wo, lw.bo, self.kernel)

    def _mla_attention(self, i: int, lw: LayerWeights, x: torch.Tensor, pos: int, cos, sin, mask) -> torch.Tensor:
        """Multi-head latent attention over the latent cache, x [T, H] (normed) -> [T, H]."""
        cfg, T, kn = self.cfg, x.shape[0], self.kernel
        nh, hd, rd, c = cfg.num_heads, cfg.head_dim, cfg.qk_rope_head_dim, cfg.kv_lora_rank
        nope = hd - rd
        if lw.wq is not None:
            q = qlinear(x, lw.wq, kn)
        else:      # q_a_layernorm and kv_a_layernorm keep transformers' default eps, not rms_norm_eps
            q = qlinear(rms_norm(qlinear(x, lw.wq_a, kn), lw.q_a_norm, MLA_NORM_EPS), lw.wq_b, kn)
        q = q.view(T, nh, hd)
        ckv = qlinear(x, lw.wkv_a, kn)                                               # [T, c + rd]
        # The heads' rope parts and the one shared rope key, rotated in one pass: [T, nh + 1, rd].
        pe = torch.cat((q[..., nope:], ckv[:, None, c:]), dim=1)
        pe = torch.addcmul(pe * cos, pe.view(T, nh + 1, rd // 2, 2).flip(-1).view(T, nh + 1, rd), sin)
        self.kv[i, pos:pos + T, :c] = rms_norm(ckv[:, :c], lw.kv_a_norm, MLA_NORM_EPS)
        self.kv[i, pos:pos + T, c:] = pe[:, nh]
        KV = self.kv[i, :pos + T][None, None]                                        # [1, 1, S, c + rd]
        # The query in the latent space: q_nope times kv_b's key half per head, beside q's rotated part.
        ql = torch.cat((torch.matmul(q[..., :nope].transpose(0, 1), lw.wk_b), pe[:, :nh].transpose(0, 1)),
                       dim=-1)                                                       # [nh, T, c + rd]
        if T == 1:      # the heads are the query rows of the one latent "head"
            o = F.scaled_dot_product_attention(ql.view(1, 1, nh, c + rd), KV, KV[..., :c], scale=self.mla_scale)
            o = o.view(nh, 1, c)
        else:
            o = F.scaled_dot_product_attention(ql[None], KV, KV[..., :c], attn_mask=mask, is_causal=mask is None,
                                               enable_gqa=True, scale=self.mla_scale)[0]   # [nh, T, c]
        o = torch.matmul(o, lw.wv_b)                                                 # [nh, T, v]
        return qlinear(o.transpose(0, 1).reshape(T, nh * cfg.v_head_dim), lw.wo, kn)

    def _attention_out(self, lw: LayerWeights, o: torch.Tensor) -> torch.Tensor:
        """One decode token's attention output [1, nkv, g, hd] -> [1, H]."""
        return _proj(o.reshape(1, self.cfg.num_heads * self.cfg.head_dim), lw.wo, lw.bo, self.kernel)

    def _route(self, lw: LayerWeights, h: torch.Tensor):
        """Top-k experts and their weights: idx [T, k], w [T, k] float32. Renormalised over the k (a softmax
        over the top-k logits is the full softmax renormalised) unless the family says not (``norm_topk_prob``
        false: the full softmax's top-k probabilities)."""
        logits = F.linear(h, lw.gate)
        if self.cfg.norm_topk_prob:
            top, idx = torch.topk(logits, self.cfg.top_k, dim=-1)
            return torch.softmax(top, dim=-1, dtype=torch.float32), idx
        w, idx = torch.topk(torch.softmax(logits, dim=-1, dtype=torch.float32), self.cfg.top_k, dim=-1)
        if self.cfg.routed_scaling != 1.0:      # DeepSeek-V2's routed_scaling_factor
            w = w * self.cfg.routed_scaling
        return w, idx

    def _moe_decode(self, i: int, lw: LayerWeights, x: torch.Tensor) -> torch.Tensor:
        """x [1, H] (residual after attention) -> x plus the layer's experts' weighted outputs."""
        h, wx, packed, target = self._router_decode(i, lw, x)
        # The one deliberate sync per layer: the host must know what to fetch (and what to prefetch).
        return self._experts_decode(i, x, h, wx, packed.tolist(), target, self._expert)

    def _router_decode(self, i: int, lw: LayerWeights, x: torch.Tensor):
        """The device side of a decode MoE step: (h [1, H], weights [k] in x's dtype, the packed transfer
        [experts | weights | guess] float32, the prefetch target layer or None)."""
        n = unit_norm(x, self.cfg.rms_norm_eps)
        h = lw.ffn_norm * n
        w, idx = self._route(lw, h)
        parts = [idx[0].float(), w[0]]
        pf = self.prefetcher
        target = pf.target(self, i) if pf is not None else None
        if target is not None:
            parts.append(pf.guess(self, target, n).float())
        return h, w[0].to(x.dtype), torch.cat(parts), target

    def _experts_decode(self, i: int, x: torch.Tensor, h: torch.Tensor, wx: torch.Tensor, got: list,
                        target: Optional[int], run) -> torch.Tensor:
        """The host side: record the routing, fetch (and prefetch), run each expert, add them to x in place
        by routing rank (the sum does not depend on cache state)."""
        K = self.cfg.top_k
        experts = [int(e) for e in got[:K]]
        self.stats.on_route(i, tuple(experts), tuple(got[K:2 * K]))
        guess = [int(e) for e in got[2 * K:]] if target is not None else None
        outs: list[Optional[torch.Tensor]] = [None] * K
        for e, ew, slot in self.cache.fetch(i, experts):
            if guess is not None:
                # fetch has queued this layer's own misses; the guesses go behind them on the copy stream,
                # so a demand copy never waits for a speculative one.
                self.prefetcher.issue(self, target, guess)
                guess = None
            r = experts.index(e)
            outs[r] = run(i, slot, r, h, ew)
            self.cache.release(i, slot)
        for r in range(K):
            x.addcmul_(outs[r], wx[r])
        return x

    def _expert(self, i: int, slot: int, r: int, h: torch.Tensor, ew: ExpertWeights) -> torch.Tensor:
        return expert_forward(h, ew, self.kernel)

    def _moe_prefill(self, i: int, lw: LayerWeights, h: torch.Tensor) -> torch.Tensor:
        K, E = self.cfg.top_k, self.cfg.num_experts
        w, idx = self._route(lw, h)
        self.stats.on_prefill_route(i, idx)
        flat = idx.flatten()                                                        # [T*k] token-major
        order = torch.argsort(flat, stable=True)          # (token, rank) slots grouped by expert, in token order
        counts = torch.bincount(flat, minlength=E).tolist()      # the one sync per layer and chunk
        starts = [sum(counts[:e]) for e in range(E)]
        experts = [e for e in range(E) if counts[e]]
        wf = w.to(h.dtype).flatten()
        parts: dict[int, tuple] = {}
        for e, ew, slot in self.cache.fetch(i, experts):
            rows = order[starts[e]:starts[e] + counts[e]]
            tok = rows // K
            parts[e] = (tok, expert_forward(h[tok], ew, self.kernel) * wf[rows, None])
            self.cache.release(i, slot)
        y = torch.zeros_like(h)
        for e in experts:                      # fixed order: the sum does not depend on cache state
            y.index_add_(0, *parts[e])
        return y
