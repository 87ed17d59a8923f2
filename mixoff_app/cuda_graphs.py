"""CUDA graphs for the fixed parts of a one-row decode step (``--cuda-graphs``; GPU only, off by default).

A decode token launches a few hundred small kernels; replaying a captured graph launches them for the cost of
one. Two kinds of graph, both over static buffers:

- per decoder layer (and KV slot), the model's own ``layer_device`` - attention, a dense MLP or the shared
  expert, router and prefetch guess - over a ``steps.StaticDecode``, which reads the position from a device
  scalar: one graph serves every position, for every family (GQA or latent attention alike);
- per (expert layer, slot), the expert FFN over that slot's fixed buffer: whichever expert the cache put in
  the slot, the graph reads it.

What stays eager is the model's own ``layer_host``: the one transfer of the routing per layer, the cache's
fetch and prefetch (copies and events), and the weighted sum in routing-rank order. So the results are those
of the eager path, and the host round trips are the same (tests/test_cuda_graphs.py compares them on a GPU).

With ``capture=False`` the same static bodies run eagerly at every "replay": that is how the CPU tests hold
the graph path to the eager one for every family without a GPU.

Graphs are captured lazily (after one eager step has made every lazily built tensor) and dropped when the
cache is re-planned or the prefetcher changes.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F

from .model import MoEModel, Routed, expert_forward
from .steps import Decode, StaticDecode


class DecodeGraphs:
    def __init__(self, model: MoEModel, capture: bool = True) -> None:
        if capture and model.device.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA device")
        m, cfg = model, model.cfg
        self.m, self.capture = m, capture
        dev, dt = m.device, m.dtype
        H, K = cfg.hidden_size, cfg.top_k
        self.x = torch.zeros((1, H), dtype=dt, device=dev)          # the residual stream
        self.h = torch.zeros((1, H), dtype=dt, device=dev)          # the MoE input
        self.wx = torch.zeros((1, K), dtype=dt, device=dev)         # routing weights
        self.shared = torch.zeros((1, H), dtype=dt, device=dev)     # the shared expert's output
        self.pack = torch.zeros((cfg.num_layers, 2 * K + cfg.num_experts), dtype=torch.float32, device=dev)
        self.outs = torch.zeros((K, 1, H), dtype=dt, device=dev)    # each fetched expert's output, in fetch order
        self.pool = torch.cuda.graph_pool_handle() if capture else None
        self.statics: dict[int, StaticDecode] = {}                  # KV slot -> its static step
        self.layer_graphs: dict[tuple[int, int], tuple] = {}        # (layer, slot) -> (replay or None, meta)
        self.expert_graphs: dict[tuple[int, int], tuple] = {}       # (moe, cache slot) -> (replay, out, cache layer)
        self._prefetch_key = None
        self._warm = False

    # ---- one decode step ------------------------------------------------------------------------
    def step(self, ids: torch.Tensor, pos: int, seq: int = 0) -> torch.Tensor:
        """ids [1] at ``pos`` of KV slot ``seq`` -> the last hidden state [1, H] (the static residual buffer)."""
        m = self.m
        key = None if m.prefetcher is None else (m.prefetcher.count, m.prefetcher.distance)
        if key != self._prefetch_key:
            self.layer_graphs = {}
            self._prefetch_key = key
        if not self._warm:             # one eager step first: lazily built tensors exist before any capture
            self._warm = True
            return m.decode_hidden(ids, Decode(m, [seq], [pos]))
        st = self.statics.get(seq)
        if st is None:
            st = self.statics[seq] = StaticDecode(m, seq)
        st.set(pos)
        m.cache.next_token()
        self.x.copy_(F.embedding(ids, m.trunk.embed))
        for layer in range(m.cfg.num_layers):
            meta = self._layer(layer, st)
            if meta is not None:
                moe, width, target, shared = meta
                routed = Routed(moe, self.h, self.wx, self.pack[layer:layer + 1, :width], target,
                                self.shared if shared else None)
                m.layer_host(routed, self.x, self._expert)
        return self.x

    # ---- graphs -----------------------------------------------------------------------------------
    def _layer_body(self, layer: int, st: StaticDecode) -> Optional[tuple]:
        """The model's device half on the static buffers; its outputs copied where the host half reads them."""
        r = self.m.layer_device(layer, self.x, st)
        if r is None:
            return None
        self.h.copy_(r.h)
        self.wx.copy_(r.wx)
        width = r.packed.shape[-1]
        self.pack[layer, :width].copy_(r.packed[0])
        if r.shared is not None:
            self.shared.copy_(r.shared)
        return r.moe, width, r.target, r.shared is not None

    def _layer(self, layer: int, st: StaticDecode) -> Optional[tuple]:
        entry = self.layer_graphs.get((layer, st.seq))
        if entry is None:
            entry = self.layer_graphs[(layer, st.seq)] = self._record(lambda: self._layer_body(layer, st))
        replay, meta = entry
        if replay is None:               # not captured: the same body, run now
            return self._layer_body(layer, st)
        replay()
        return meta

    def _record(self, body: Callable) -> tuple:
        """(replay, what the body returned) for a captured graph; (None, None) when not capturing."""
        if not self.capture:
            return None, None
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            meta = body()
        return graph.replay, meta

    def _expert(self, moe: int, slot: int, n: int, h: torch.Tensor, ew) -> torch.Tensor:
        layer = self.m.cache.layers[moe]
        if not self.capture:
            out = expert_forward(self.h, layer.weights[slot], self.m.kernel)
        else:
            g = self.expert_graphs.get((moe, slot))
            if g is None or g[2] is not layer:     # first use, or the cache was re-planned (new slot buffers)
                replay, out = self._record(lambda: expert_forward(self.h, layer.weights[slot], self.m.kernel))
                g = self.expert_graphs[(moe, slot)] = (replay, out, layer)
            g[0]()
            out = g[1]
        # A slot can serve two experts of one token (k smaller than top-k): keep each fetched output apart.
        return self.outs[n].copy_(out)
