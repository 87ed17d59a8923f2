"""Where an HQQ axis-0 weight's codes, scales and zeros sit, as the fused kernels read them (no triton here).

A weight (out, in) is viewed as (G, M), M = out*in/G; the M columns are the groups. When G divides out,
with R = out/G, column m = r*in + k holds rows r, r + R, ..., r + (G-1)R of input column k: a group is G
weights of one input column, R rows apart, and its scale/zero sit at [r, k] of an (R, in) matrix. Packing
stores PER codes per element (bytes; a 3-bit int32 holds 10, rows padded to a multiple of 10), code i of
packed row j being group row g = i*S + j, S = packed rows. Read as an (S*R, in) matrix, the packed tensor's
row j*R + r holds output rows (i*S + j)*R + r for every i.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional


def _pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


@dataclass(frozen=True)
class Geometry:
    bits: int
    per: int          # codes per packed element
    S: int            # packed rows per group column
    R: int            # out / group_size
    K: int            # in features
    out: int
    top: int          # shift of the first code

    @property
    def per_p(self) -> int:
        return _pow2(self.per)

    @property
    def s_p(self) -> int:
        return _pow2(self.S)


def geometry(shape: tuple[int, int], bits: int, group_size: int) -> Optional[Geometry]:
    """The kernels' view of a weight, or None when they cannot read it: a group that straddles output rows
    (out not a multiple of the group size, which only toy models have)."""
    out, inp = shape
    if bits not in (2, 3, 4, 8) or out % group_size:
        return None
    per = 10 if bits == 3 else 8 // bits
    if bits != 3 and group_size % per:
        return None
    S = math.ceil(group_size / 10) if bits == 3 else group_size // per
    return Geometry(bits, per, S, out // group_size, inp, out, 27 if bits == 3 else 8 - bits)
