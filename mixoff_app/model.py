"""Compact Mixtral forward: RMSNorm, RoPE, GQA attention over a static KV cache, sparse MoE over the cache.

Batch size is one (a chat). Attention, norms, router, embeddings and lm_head stay on the device; the
experts come from ``ExpertCache`` one layer at a time. Expert outputs are summed in a fixed order (by
routing rank when decoding, by expert id in prefill) so the result never depends on which experts
happened to be resident: logits are identical for any cache size, policy or prefetch setting.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from .config import ModelConfig
from .expert_cache import ExpertCache
from .stores import ExpertWeights
from .quant import QWeight, linear
from .stats import Stats

Weight = torch.Tensor | QWeight


@dataclass
class LayerWeights:
    attn_norm: torch.Tensor     # [H]
    ffn_norm: torch.Tensor      # [H]
    wq: Weight                  # [nh*hd, H]
    wk: Weight                  # [nkv*hd, H]
    wv: Weight                  # [nkv*hd, H]
    wo: Weight                  # [H, nh*hd]
    gate: torch.Tensor          # [E, H]


@dataclass
class TrunkWeights:
    """Everything but the experts: always resident on the device."""
    embed: torch.Tensor         # [V, H]
    layers: list[LayerWeights]
    norm: torch.Tensor          # [H]
    lm_head: torch.Tensor       # [V, H]


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return w * xf.to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


def expert_forward(x: torch.Tensor, w: ExpertWeights) -> torch.Tensor:
    return linear(F.silu(linear(x, w.w1)) * linear(x, w.w3), w.w2)


class Prefetcher:
    """Guess the experts of layer l+d from layer l's hidden state (the residual stream changes slowly, so
    the later router applied early is a good guess) and start their copies while layer l computes.

    Two steps, so the guess costs no sync of its own: ``propose`` queues the guess on the device before the
    router's ``tolist`` (which then brings both to the host), and ``issue`` starts the copies once the
    layer's own misses are queued."""

    def __init__(self, count: int, distance: int = 1) -> None:
        self.count, self.distance = count, distance

    def propose(self, model: "Mixtral", layer: int, h: torch.Tensor):
        """(target layer, guessed experts as a device tensor or a list), or None past the last layer."""
        target = layer + self.distance
        if target >= model.cfg.num_layers:
            return None
        lw = model.trunk.layers[target]
        logits = F.linear(rms_norm(h[-1:], lw.ffn_norm, model.cfg.rms_norm_eps), lw.gate)   # [1, E]
        return target, torch.topk(logits[0], self.count).indices

    def issue(self, model: "Mixtral", target: int, guess) -> None:
        guess = guess.tolist() if isinstance(guess, torch.Tensor) else list(guess)
        model.cache.hint(target, guess)
        model.cache.prefetch(target, guess)


class Mixtral:
    def __init__(self, cfg: ModelConfig, trunk: TrunkWeights, cache: ExpertCache, stats: Stats,
                 max_seq: int, device: torch.device, dtype: torch.dtype) -> None:
        self.cfg, self.trunk, self.cache, self.stats = cfg, trunk, cache, stats
        self.device, self.dtype = torch.device(device), dtype
        self.max_seq = max_seq
        self.prefetcher: Optional[Prefetcher] = None
        self.record_weights = False
        L, nkv, hd = cfg.num_layers, cfg.num_kv_heads, cfg.head_dim
        # Static KV cache, allocated once: [layer, k|v, kv_head, position, head_dim]; a head's keys are
        # contiguous, which is what attention reads.
        self.kv = torch.zeros((L, 2, nkv, max_seq, hd), dtype=dtype, device=self.device)
        inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.int64).float() / hd))
        t = torch.arange(max_seq, dtype=torch.float32)
        freqs = torch.outer(t, inv)
        emb = torch.cat((freqs, freqs), dim=-1)                                     # [S, hd]
        self.cos = emb.cos().to(dtype=dtype, device=self.device)
        self.sin = emb.sin().to(dtype=dtype, device=self.device)
        self.routing_weights: list = []   # per decoded token, per layer (filled only when record_weights)

    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, pos: int, last_only: bool = True) -> torch.Tensor:
        """ids: [T] token ids at positions pos..pos+T-1 -> logits [1 or T, V] (float32)."""
        cfg = self.cfg
        T = ids.shape[0]
        if pos + T > self.max_seq:
            raise ValueError(f"context of {pos + T} tokens exceeds the allocated {self.max_seq}")
        x = F.embedding(ids, self.trunk.embed)                                      # [T, H]
        cos, sin = self.cos[pos:pos + T, None, :], self.sin[pos:pos + T, None, :]   # [T, 1, hd]
        mask = None
        if T > 1:
            # Causal with an offset (query i sees keys 0..pos+i), once per query head of a KV group.
            g = cfg.num_heads // cfg.num_kv_heads
            mask = torch.ones((T, pos + T), dtype=torch.bool, device=self.device).tril(diagonal=pos).repeat(g, 1)
        decode = T == 1
        if decode:
            self.cache.next_token()
            tok_weights = [None] * cfg.num_layers if self.record_weights else None
        for i, lw in enumerate(self.trunk.layers):
            x = x + self._attention(i, lw, rms_norm(x, lw.attn_norm, cfg.rms_norm_eps), pos, cos, sin, mask)
            h = rms_norm(x, lw.ffn_norm, cfg.rms_norm_eps)
            if decode:
                x = x + self._moe_decode(i, lw, h, x, tok_weights)
            else:
                x = x + self._moe_prefill(i, lw, h)
        if decode and tok_weights is not None:
            self.routing_weights.append(tok_weights)
        if last_only:
            x = x[-1:]
        return F.linear(rms_norm(x, self.trunk.norm, cfg.rms_norm_eps), self.trunk.lm_head).float()

    def _attention(self, i: int, lw: LayerWeights, x: torch.Tensor, pos: int, cos, sin, mask) -> torch.Tensor:
        cfg, T = self.cfg, x.shape[0]
        nh, nkv, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        g = nh // nkv
        q = linear(x, lw.wq).view(T, nh, hd)
        k = linear(x, lw.wk).view(T, nkv, hd)
        v = linear(x, lw.wv).view(T, nkv, hd)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        self.kv[i, 0, :, pos:pos + T] = k.transpose(0, 1)
        self.kv[i, 1, :, pos:pos + T] = v.transpose(0, 1)
        K = self.kv[i, 0, :, :pos + T]                                              # [nkv, S, hd]
        V = self.kv[i, 1, :, :pos + T]
        # Grouped-query attention without repeating K/V: the g query heads that share a KV head are
        # stacked as g*T query rows against that head (query head h uses KV head h // g).
        qg = q.transpose(0, 1).reshape(nkv, g * T, hd)                              # [nkv, g*T, hd]
        o = F.scaled_dot_product_attention(qg[None], K[None], V[None], attn_mask=mask)[0]
        return linear(o.view(nh, T, hd).transpose(0, 1).reshape(T, nh * hd), lw.wo)

    def _route(self, lw: LayerWeights, h: torch.Tensor):
        probs = torch.softmax(F.linear(h, lw.gate).float(), dim=-1)                 # [T, E]
        w, idx = torch.topk(probs, self.cfg.top_k, dim=-1)
        return w / w.sum(dim=-1, keepdim=True), idx                                  # [T, k] each

    def _moe_decode(self, i: int, lw: LayerWeights, h: torch.Tensor, resid: torch.Tensor,
                    tok_weights: Optional[list]) -> torch.Tensor:
        w, idx = self._route(lw, h)
        proposal = self.prefetcher.propose(self, i, resid) if self.prefetcher is not None else None
        experts = idx[0].tolist()          # the one deliberate sync per layer: the host must know what to fetch
        self.stats.on_route(i, tuple(experts))
        if tok_weights is not None:
            tok_weights[i] = tuple(w[0].tolist())
        outs: list[Optional[torch.Tensor]] = [None] * len(experts)
        for e, ew, slot in self.cache.fetch(i, experts):
            if proposal is not None:
                # fetch has queued this layer's own misses; the next layer's guesses go behind them on the
                # copy stream, so a demand copy never waits for a speculative one.
                self.prefetcher.issue(self, *proposal)
                proposal = None
            outs[experts.index(e)] = expert_forward(h, ew)
            self.cache.release(i, slot)
        y = outs[0] * w[0, 0]
        for r in range(1, len(outs)):
            y = y + outs[r] * w[0, r]
        return y.to(h.dtype)

    def _moe_prefill(self, i: int, lw: LayerWeights, h: torch.Tensor) -> torch.Tensor:
        w, idx = self._route(lw, h)
        experts = sorted(set(idx.flatten().tolist()))
        parts: dict[int, tuple] = {}
        for e, ew, slot in self.cache.fetch(i, experts):
            tok, rank = torch.where(idx == e)
            parts[e] = (tok, expert_forward(h[tok], ew) * w[tok, rank, None])
            self.cache.release(i, slot)
        y = torch.zeros(h.shape, dtype=torch.float32, device=h.device)
        for e in experts:                      # fixed order: the sum does not depend on cache state
            tok, out = parts[e]
            y.index_add_(0, tok, out.float())
        return y.to(h.dtype)
