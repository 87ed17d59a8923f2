"""CUDA graphs for the fixed parts of a decode step (``--cuda-graphs``; GPU only, off by default).

A decode token launches a few hundred small kernels; replaying a captured graph launches them for the cost of
one. Two kinds of graph, both over static buffers:

- per layer, attention + residual + router + prefetch guess, reading the position from a device scalar: the
  new K/V go in with ``index_copy_`` and attention runs over the whole static KV cache with a bias that
  hides the positions not yet written (at most ``max_context`` keys: cheap next to the experts' weights);
- per (layer, slot), the expert FFN over that slot's fixed buffer: whichever expert the cache put in the
  slot, the graph reads it.

What stays eager is what the host decides: the one transfer of the routing per layer, the cache's fetch
and prefetch (copies and events), and the weighted sum in routing-rank order. So the results are those of
the eager path, and the host round trips are the same (tests/test_gpu.py compares them).

Graphs are captured lazily (after one eager step has made every lazily built tensor) and dropped when the
cache is re-planned or the prefetcher changes.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .model import MoEModel, expert_forward, rms_norm


class DecodeGraphs:
    def __init__(self, model: MoEModel) -> None:
        if model.device.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA device")
        m, cfg = model, model.cfg
        self.m = m
        dev, dt = m.device, m.dtype
        H, S = cfg.hidden_size, m.max_seq
        self.x = torch.zeros((1, H), dtype=dt, device=dev)          # the residual stream
        self.h = torch.zeros((1, H), dtype=dt, device=dev)          # the MoE input
        self.wx = torch.zeros(cfg.top_k, dtype=dt, device=dev)      # routing weights
        self.pack = torch.zeros((cfg.num_layers, 2 * cfg.top_k + cfg.num_experts), dtype=torch.float32,
                                device=dev)
        self.pos = torch.zeros(1, dtype=torch.long, device=dev)
        self.cos = torch.zeros((1, 1, cfg.head_dim), dtype=dt, device=dev)
        self.sin = torch.zeros((1, 1, cfg.head_dim), dtype=dt, device=dev)
        self.bias = torch.zeros((1, 1, 1, S), dtype=dt, device=dev)   # 0 where a key exists, -inf beyond
        self._keys = torch.arange(S, device=dev)
        self._ninf = torch.tensor(float("-inf"), dtype=dt, device=dev)
        self._zero = torch.zeros((), dtype=dt, device=dev)
        self.rank_out = torch.zeros((cfg.top_k, 1, H), dtype=dt, device=dev)
        self.pool = torch.cuda.graph_pool_handle()
        self.layer_graphs: list[Optional[tuple]] = [None] * cfg.num_layers   # (graph, packed width, target)
        self.expert_graphs: dict[tuple[int, int], tuple] = {}           # (layer, slot) -> (graph, out, cache layer)
        self._prefetch_key = None
        self._warm = False

    # ---- one decode step ------------------------------------------------------------------------
    def step(self, ids: torch.Tensor, pos: int) -> torch.Tensor:
        """ids [1] at ``pos`` -> the last hidden state [1, H] (a view of the static residual buffer)."""
        m = self.m
        key = None if m.prefetcher is None else (m.prefetcher.count, m.prefetcher.distance)
        if key != self._prefetch_key:
            self.layer_graphs = [None] * m.cfg.num_layers
            self._prefetch_key = key
        if not self._warm:             # one eager step first: lazily built tensors exist before any capture
            self._warm = True
            return m._layers(ids, pos)
        m.cache.next_token()
        self.x.copy_(F.embedding(ids, m.trunk.embed))
        self.pos.fill_(pos)
        self.cos.copy_(m.cos[pos:pos + 1, None])
        self.sin.copy_(m.sin[pos:pos + 1, None])
        torch.where(self._keys > pos, self._ninf, self._zero, out=self.bias[0, 0, 0])
        for i in range(m.cfg.num_layers):
            g = self.layer_graphs[i]
            if g is None:
                g = self.layer_graphs[i] = self._capture_layer(i)
            graph, width, target = g
            graph.replay()
            m._experts_decode(i, self.x, self.h, self.wx, self.pack[i, :width].tolist(), target, self._expert)
        return self.x

    # ---- graphs -----------------------------------------------------------------------------------
    def _layer_body(self, i: int) -> tuple[int, Optional[int]]:
        m, cfg = self.m, self.m.cfg
        nh, nkv, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        lw = m.trunk.layers[i]
        q, k, v = m._qkv(lw, rms_norm(self.x, lw.attn_norm, cfg.rms_norm_eps), self.cos, self.sin)
        m.kv[i, 0].index_copy_(1, self.pos, k.transpose(0, 1))
        m.kv[i, 1].index_copy_(1, self.pos, v.transpose(0, 1))
        o = F.scaled_dot_product_attention(q.view(1, nkv, nh // nkv, hd), m.kv[i, 0][None], m.kv[i, 1][None],
                                           attn_mask=self.bias)
        self.x.add_(m._attention_out(lw, o))
        h, wx, packed, target = m._router_decode(i, lw, self.x)
        self.h.copy_(h)
        self.wx.copy_(wx)
        self.pack[i, :packed.numel()].copy_(packed)
        return packed.numel(), target

    def _capture_layer(self, i: int) -> tuple:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            width, target = self._layer_body(i)
        return graph, width, target

    def _expert(self, i: int, slot: int, r: int, h: torch.Tensor, ew) -> torch.Tensor:
        layer = self.m.cache.layers[i]
        g = self.expert_graphs.get((i, slot))
        if g is None or g[2] is not layer:     # first use, or the cache was re-planned (new slot buffers)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
                out = expert_forward(self.h, layer.weights[slot], self.m.kernel)
            g = self.expert_graphs[(i, slot)] = (graph, out, layer)
        g[0].replay()
        # A slot can serve two ranks of one token (k smaller than top-k): keep each rank's output apart.
        return self.rank_out[r].copy_(g[1])
