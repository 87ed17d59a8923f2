"""The counters the decode-cost tests and benchmarks rely on count what they say."""
from __future__ import annotations

import gc

import torch

from mixoff_app.op_counts import count_ops, count_syncs, track_live_bytes


def test_count_syncs_counts_each_host_round_trip_once():
    t = torch.ones(3)
    with count_syncs() as c:
        t.tolist()
        int(t[0])                      # __int__ calls item inside: one round trip
        bool(t[0] > 0)
        t.sum().item()
        t.add(1)                       # no host value
    assert c.total == 4 and c.by_method == {"tolist": 1, "__int__": 1, "__bool__": 1, "item": 1}
    assert torch.Tensor.item.__name__ == "item"          # restored


def test_count_ops_counts_non_view_ops():
    x = torch.ones(4, 4)
    with count_ops() as c:
        y = x.view(16)                 # views: not counted
        x.t()
        z = (y * 2).sum()
        x.add_(1)
    assert dict(c.by_op) == {"mul": 1, "sum": 1, "add_": 1} and c.total == 3
    assert z.item() == 32


def test_track_live_bytes_sees_the_peak_and_the_frees():
    x = torch.ones(1000)                                  # made before: not counted
    with track_live_bytes() as live:
        a = x * 2                                         # 4000 bytes
        b = a + 1                                         # 8000 alive
        del a
        gc.collect()
        c = b[10:]                                        # a view: no new storage
        d = b.mul_(3)                                     # in place: the same storage
    assert live.peak == 8000 and live.live == 4000
    assert c.shape == (990,) and d is b


def test_count_ops_counts_a_triton_launch_as_one_op():
    import pytest
    pytest.importorskip("triton", reason="the kernel tests need triton (.ci/run installs it)")
    from mixoff_app.config import QuantSpec
    from mixoff_app.kernels import qlinear
    from mixoff_app.quant import quantize

    w = quantize(torch.randn(64, 32), QuantSpec(bits=2, group_size=16))
    x = torch.randn(1, 32)
    qlinear(x, w, "triton")                    # loads the interpreted kernels before the count starts
    with count_ops() as c:
        y = qlinear(x, w, "triton")            # the interpreter's own torch calls inside are not counted
    assert c.by_op == {"empty": 1, "triton.qgemv_kernel": 1}, c.by_op
    with count_ops() as c:
        qlinear(torch.randn(5, 32), w, "triton")
    assert c.by_op["triton.qgemm_kernel"] == 1 and c.total <= 3, c.by_op
    assert y.shape == (1, 64)
