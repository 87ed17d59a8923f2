"""Where the rows of one forward step sit in the KV cache, and how attention writes and reads them.

The model computes projections, RoPE and the MoE block the same way for every step; what differs is only how
new keys and values go into the cache and which keys a query sees. Three kinds of step:

- ``Prefill``: T tokens of one sequence at positions pos..pos+T-1 (a prompt chunk), causal;
- ``Decode``: one token of each of B sequences, each at its own position in its own KV slot;
- ``StaticDecode``: one token whose position is a device scalar, for CUDA graphs: the cache is written with
  ``index_copy_`` and read whole behind a bias that hides positions not yet written, so one captured graph
  serves every position. It runs eagerly too (the CPU tests hold it to ``Decode``).

The cache (``KVCache``) is allocated once: per sequence slot, per decoder layer, K and V per KV head
(grouped-query attention) or, for multi-head latent attention, one latent and one rotated key per position.
"""
from __future__ import annotations

from typing import Union

import torch
import torch.nn.functional as F

from .kernels import qlinear, qlinear_rows, swiglu, swiglu_rows


class KVCache:
    """Static K/V for ``slots`` sequences: GQA [slot, layer, k|v, kv_head, position, head_dim] (a head's keys
    contiguous, which is what attention reads), MLA [slot, layer, position, latent + rope key]."""

    def __init__(self, slots: int, layers: int, max_seq: int, shape: tuple[int, ...], dtype: torch.dtype,
                 device: torch.device, mla: bool) -> None:
        self.mla = mla
        self.data = torch.zeros((slots, layers, *shape), dtype=dtype, device=device)
        self.slots, self.max_seq = slots, max_seq

    def layer(self, seq: int, layer: int) -> torch.Tensor:
        return self.data[seq, layer]


class _Together:
    """Matmuls over all of a step's rows at once (one sequence: nothing else can change its results)."""
    linear = staticmethod(qlinear)
    swiglu = staticmethod(swiglu)
    matmul = staticmethod(torch.matmul)


class Prefill(_Together):
    """T tokens of the sequence in KV slot ``seq``, at positions pos..pos+T-1."""
    rows = 1

    def __init__(self, model, seq: int, pos: int, T: int) -> None:
        self.seq, self.pos, self.T = seq, pos, T
        self.cos, self.sin = model.cos[pos:pos + T, None, :], model.sin[pos:pos + T, None, :]   # [T, 1, rd]
        # Query i sees keys 0..pos+i; built once per chunk and shared by every head and layer.
        self.mask = None
        if T > 1 and pos > 0:
            self.mask = torch.ones((T, pos + T), dtype=torch.bool, device=model.device).tril(diagonal=pos)

    def gqa(self, kv: KVCache, layer: int, q, k, v) -> torch.Tensor:
        """q [T, nh, hd], k and v [T, nkv, hd] -> [T, nh, hd]."""
        c, p, T = kv.layer(self.seq, layer), self.pos, self.T
        c[0, :, p:p + T] = k.transpose(0, 1)
        c[1, :, p:p + T] = v.transpose(0, 1)
        K, V = c[0, :, :p + T], c[1, :, :p + T]                                      # [nkv, S, hd]
        if T == 1:     # the g query heads sharing a KV head are g query rows against it: no repeated K/V
            nkv, nh = K.shape[0], q.shape[1]
            return F.scaled_dot_product_attention(q.view(1, nkv, nh // nkv, -1), K[None], V[None]).view(1, nh, -1)
        o = F.scaled_dot_product_attention(q.transpose(0, 1)[None], K[None], V[None], attn_mask=self.mask,
                                           is_causal=self.mask is None, enable_gqa=True)[0]   # [nh, T, hd]
        return o.transpose(0, 1)

    def mla(self, kv: KVCache, layer: int, ql, entry, scale: float, c: int) -> torch.Tensor:
        """ql [nh, T, c + rd] (queries in the latent space), entry [T, c + rd] -> [nh, T, c]."""
        cache, p, T = kv.layer(self.seq, layer), self.pos, self.T
        cache[p:p + T] = entry
        KV = cache[:p + T][None, None]                                               # [1, 1, S, c + rd]
        nh = ql.shape[0]
        if T == 1:     # the heads are the query rows of the one latent "head"
            o = F.scaled_dot_product_attention(ql.reshape(1, 1, nh, -1), KV, KV[..., :c], scale=scale)
            return o.view(nh, 1, c)
        return F.scaled_dot_product_attention(ql[None], KV, KV[..., :c], attn_mask=self.mask,
                                              is_causal=self.mask is None, enable_gqa=True, scale=scale)[0]


class RowByRow:
    """Matmuls over the rows of several sequences, each row bit for bit what it gets alone (``kernels``)."""
    linear = staticmethod(qlinear_rows)
    swiglu = staticmethod(swiglu_rows)

    @staticmethod
    def matmul(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """a [heads, B, i] @ w [heads, i, o] per row (a batched matmul over B rows rounds otherwise)."""
        if a.shape[1] == 1:
            return torch.matmul(a, w)
        return torch.cat([torch.matmul(a[:, b:b + 1], w) for b in range(a.shape[1])], dim=1)


class Decode(RowByRow):
    """One token of each of B sequences: row b is position ``pos[b]`` of the sequence in slot ``seqs[b]``.
    Each row's attention is exactly a one-token ``Prefill`` of its sequence (the same ops on the same
    shapes), so a row's result does not depend on the other rows."""

    def __init__(self, model, seqs: list[int], pos: list[int]) -> None:
        self.seqs, self.pos, self.rows = seqs, pos, len(seqs)
        self._one = [Prefill(model, s, p, 1) for s, p in zip(seqs, pos)]
        if self.rows == 1:
            self.cos, self.sin = self._one[0].cos, self._one[0].sin
        else:
            self.cos = torch.cat([o.cos for o in self._one])
            self.sin = torch.cat([o.sin for o in self._one])

    def gqa(self, kv: KVCache, layer: int, q, k, v) -> torch.Tensor:
        if self.rows == 1:
            return self._one[0].gqa(kv, layer, q, k, v)
        return torch.cat([o.gqa(kv, layer, q[b:b + 1], k[b:b + 1], v[b:b + 1]) for b, o in enumerate(self._one)])

    def mla(self, kv: KVCache, layer: int, ql, entry, scale: float, c: int) -> torch.Tensor:
        if self.rows == 1:
            return self._one[0].mla(kv, layer, ql, entry, scale, c)
        return torch.cat([o.mla(kv, layer, ql[:, b:b + 1], entry[b:b + 1], scale, c) for b, o in enumerate(self._one)],
                         dim=1)


class StaticDecode(_Together):
    """One token of the sequence in slot ``seq`` whose position lives in a device scalar (``set`` fills it and
    the static cos/sin/bias buffers before each replay): what a CUDA graph captures once and replays at every
    position. Attention runs over the whole static cache; the bias hides keys beyond the position."""
    rows = 1

    def __init__(self, model, seq: int) -> None:
        dev, dt, S = model.device, model.dtype, model.max_seq
        self.model, self.seq = model, seq
        self.pos = torch.zeros(1, dtype=torch.long, device=dev)
        rd = model.cos.shape[-1]
        self.cos = torch.zeros((1, 1, rd), dtype=dt, device=dev)
        self.sin = torch.zeros((1, 1, rd), dtype=dt, device=dev)
        self.bias = torch.zeros((1, 1, 1, S), dtype=dt, device=dev)    # 0 where a key exists, -inf beyond
        self._keys = torch.arange(S, device=dev)
        self._ninf = torch.tensor(float("-inf"), dtype=dt, device=dev)
        self._zero = torch.zeros((), dtype=dt, device=dev)

    def set(self, pos: int) -> None:
        m = self.model
        self.pos.fill_(pos)
        self.cos.copy_(m.cos[pos:pos + 1, None])
        self.sin.copy_(m.sin[pos:pos + 1, None])
        torch.where(self._keys > pos, self._ninf, self._zero, out=self.bias[0, 0, 0])

    def gqa(self, kv: KVCache, layer: int, q, k, v) -> torch.Tensor:
        c = kv.layer(self.seq, layer)
        c[0].index_copy_(1, self.pos, k.transpose(0, 1))
        c[1].index_copy_(1, self.pos, v.transpose(0, 1))
        nkv, nh = c.shape[1], q.shape[1]
        o = F.scaled_dot_product_attention(q.view(1, nkv, nh // nkv, -1), c[0][None], c[1][None],
                                           attn_mask=self.bias)
        return o.view(1, nh, -1)

    def mla(self, kv: KVCache, layer: int, ql, entry, scale: float, c: int) -> torch.Tensor:
        cache = kv.layer(self.seq, layer)
        cache.index_copy_(0, self.pos, entry)
        KV = cache[None, None]
        nh = ql.shape[0]
        o = F.scaled_dot_product_attention(ql.reshape(1, 1, nh, -1), KV, KV[..., :c], attn_mask=self.bias,
                                           scale=scale)
        return o.view(nh, 1, c)


Step = Union[Prefill, Decode, StaticDecode]     # what the model's layers take
