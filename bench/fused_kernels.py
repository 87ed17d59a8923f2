"""Quantized matmul micro-benchmark at Mixtral-8x7B's shapes: fused kernels vs dequantize + matmul.

For each weight (experts w1/w3 14336x4096 and w2 4096x14336 at 2-bit g16; attention q/o 4096x4096 and k/v
1024x4096 at 4-bit g64; scales and zeros meta-quantized to 8 bits as in the reference checkpoint) it times
one token (GEMV) and a prefill chunk (GEMM), and reports the packed bytes each call must read, the GB/s that
makes, and that as a fraction of the device's copy bandwidth measured in the same run (bytes read plus
bytes written per second by a device-to-device copy).

On CUDA each call is timed inside a CUDA graph (the GPU's time, which is what decode pays once its launches
are graphed) and also eagerly (with Python and launch overhead); every GEMV launch configuration the tuner
considers is timed too, so a GPU run shows which to keep. ``gate_up`` times an expert's gate and up
projections for one token as one fused launch (``kernels.swiglu``) against two GEMVs + silu + product.
Prints one JSON object.

    python bench/fused_kernels.py                     # on a GPU: Mixtral shapes
    python bench/fused_kernels.py --tiny --repeats 2  # anywhere: shapes / 16, Triton's interpreter on a CPU
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import torch.nn.functional as F

from mixoff_app.config import ConfigError
from mixoff_app.kernels import backend, fused, qlinear, resolve_kernel, swiglu
from mixoff_app.kernels.geometry import geometry
from mixoff_app.quant import QWeight, dequantize, pack

# name, (out, in), bits, group, scale group: the reference checkpoint's formats.
CASES = [("expert_w1", (14336, 4096), 2, 16, 128), ("expert_w2", (4096, 14336), 2, 16, 128),
         ("attn_q", (4096, 4096), 4, 64, 256), ("attn_k", (1024, 4096), 4, 64, 256)]


def random_qweight(shape, bits, group, scale_group, device, seed=0) -> QWeight:
    gen = torch.Generator(device=device).manual_seed(seed)
    out, inp = shape
    M = out * inp // group
    codes = torch.randint(0, 2 ** bits, (group, M), generator=gen, device=device, dtype=torch.int32)
    q = QWeight(shape=tuple(shape), bits=bits, group_size=group, W_q=pack(codes, bits))
    C = M // scale_group
    q.scale_q = torch.randint(0, 256, (scale_group, C), generator=gen, device=device, dtype=torch.uint8)
    q.scale_z = (-40 - 20 * torch.rand((1, C), generator=gen, device=device)).half()
    q.scale_s = (1e-3 * (1 + torch.rand((1, C), generator=gen, device=device))).half()
    q.zero_q = torch.randint(0, 256, (1, M), generator=gen, device=device, dtype=torch.uint8)
    q.zero_s = torch.tensor((2 ** bits - 1) / 255, device=device).half()
    q.zero_z = torch.tensor(-3.0, device=device).half()
    return q


def timed(fn, device: torch.device, repeats: int, graph: bool = False) -> float:
    """Median seconds per call."""
    fn()                                           # compile, tune, warm
    if device.type != "cuda":
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)
    torch.cuda.synchronize(device)
    inner = 20
    if graph:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(inner):
                fn()
        run = g.replay
    else:
        def run():
            for _ in range(inner):
                fn()
    run()
    times = []
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        run()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3 / inner)
    return statistics.median(times)


def copy_bandwidth(device: torch.device, nbytes: int, repeats: int) -> float:
    """Device memory bandwidth as a copy moves it: (read + written bytes) / s."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    t = timed(lambda: dst.copy_(src), device, repeats)
    return 2 * nbytes / t


def bench_weight(w: QWeight, mod, kernel: str, device: torch.device, dtype: torch.dtype, bw: float, args) -> dict:
    out, inp = w.shape
    x = torch.randn((1, inp), device=device).to(dtype)
    ref = F.linear(x, dequantize(w, dtype))
    err = (qlinear(x, w, kernel).float() - ref.float()).abs().max().item()
    tol = (2e-6 if dtype == torch.float32 else 4e-3) * ref.float().abs().max().item()
    graph = device.type == "cuda"
    c = {"fused": kernel == "triton" and fused(w), "packed_bytes": w.nbytes,
         "max_abs_err": err, "tolerance": tol,
         "fused_s": timed(lambda: qlinear(x, w, kernel), device, args.repeats, graph=graph),
         "torch_s": timed(lambda: qlinear(x, w, "torch"), device, args.repeats, graph=graph)}
    c["speedup"] = c["torch_s"] / c["fused_s"]
    c["packed_GBps"] = w.nbytes / c["fused_s"] / 1e9
    c["fraction_of_copy_bw"] = w.nbytes / c["fused_s"] / bw
    if device.type == "cuda":
        c["fused_eager_s"] = timed(lambda: qlinear(x, w, kernel), device, args.repeats)
        if mod is not None and c["fused"]:
            g = geometry(tuple(w.shape), w.bits, w.group_size)
            c["gemv_candidates"] = []
            for cfg in mod.gemv_candidates(g, mod.sm_count(device)):
                s = timed(lambda cfg=cfg: mod.qgemv(x[0], w, g, cfg), device, args.repeats, graph=True)
                c["gemv_candidates"].append(dict(cfg.__dict__, s=s, packed_GBps=w.nbytes / s / 1e9))
    if args.prefill:
        xp = torch.randn((args.prefill, inp), device=device).to(dtype)
        c["prefill_tokens"] = args.prefill
        c["prefill_fused_s"] = timed(lambda: qlinear(xp, w, kernel), device, args.repeats)
        c["prefill_torch_s"] = timed(lambda: qlinear(xp, w, "torch"), device, args.repeats)
    return c


def bench_gate_up(w1: QWeight, w3: QWeight, kernel: str, device: torch.device, dtype: torch.dtype,
                  args) -> dict:
    """An expert's gate and up projections for one token: ``swiglu`` (one fused launch where it pays) against
    two GEMVs + silu + product, and against dequantize + matmul."""
    x = torch.randn((1, w1.shape[1]), device=device).to(dtype)
    graph = device.type == "cuda"
    a, b = (F.linear(x.float(), dequantize(w, torch.float32)) for w in (w1, w3))
    ref = F.silu(a) * b
    c = {"shape": list(w1.shape), "packed_bytes": w1.nbytes + w3.nbytes,
         "max_abs_err": (swiglu(x, w1, w3, kernel).float() - ref).abs().max().item(),
         "ref_max_abs": ref.abs().max().item(),
         "swiglu_s": timed(lambda: swiglu(x, w1, w3, kernel), device, args.repeats, graph=graph),
         "two_gemvs_s": timed(lambda: F.silu(qlinear(x, w1, kernel)) * qlinear(x, w3, kernel), device,
                              args.repeats, graph=graph),
         "torch_s": timed(lambda: swiglu(x, w1, w3, "torch"), device, args.repeats, graph=graph)}
    c["packed_GBps"] = c["packed_bytes"] / c["swiglu_s"] / 1e9
    if device.type == "cuda":
        c["swiglu_eager_s"] = timed(lambda: swiglu(x, w1, w3, kernel), device, args.repeats)
        c["two_gemvs_eager_s"] = timed(lambda: F.silu(qlinear(x, w1, kernel)) * qlinear(x, w3, kernel), device,
                                       args.repeats)
    return c


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--kernel", choices=("auto", "triton", "torch"), default="triton",
                    help="the fused side: triton (default; Triton's interpreter on a CPU) or what auto picks")
    ap.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), default=None,
                    help="activations (default float16 on CUDA, float32 on CPU)")
    ap.add_argument("--tiny", action="store_true", help="every shape divided by 16 (always on a CPU)")
    ap.add_argument("--prefill", type=int, default=128, help="tokens of the timed prefill chunk (0: skip)")
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats (default 20 on CUDA, 3 on CPU)")
    ap.add_argument("--copy-mib", type=int, default=None, help="buffer of the copy-bandwidth run (default 1024 on CUDA, 64 on CPU)")
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda:0")
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.float16 if device.type == "cuda" else torch.float32)
    try:
        kernel = resolve_kernel(args.kernel, device)
        mod = backend(device.type) if kernel == "triton" else None
    except ConfigError as e:         # no triton here: say so in the JSON, as the other benchmarks do
        print(json.dumps({"benchmark": "kernels", "device": str(device), "skipped": str(e)}, indent=1))
        return
    # Mixtral's shapes through Triton's interpreter would take hours: a CPU run is the tiny smoke run.
    args.tiny = args.tiny or device.type != "cuda"
    args.repeats = args.repeats or (20 if device.type == "cuda" else 3)
    torch.manual_seed(0)

    copy_mib = args.copy_mib or (1024 if device.type == "cuda" else 64)
    bw = copy_bandwidth(device, copy_mib * 2 ** 20, max(3, args.repeats // 2))
    result = {"benchmark": "kernels", "device": str(device), "kernel": kernel, "dtype": str(dtype).replace("torch.", ""),
              "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
              "tiny": args.tiny, "torch": torch.__version__, "copy_GBps": bw / 1e9, "copy_MiB": copy_mib, "cases": []}
    for name, shape, bits, group, sg in CASES:
        out, inp = (shape[0] // 16, shape[1] // 16) if args.tiny else shape
        w = random_qweight((out, inp), bits, group, sg, device)
        c = {"name": name, "shape": [out, inp], "bits": bits, "group": group, "scale_group": sg}
        result["cases"].append(c | bench_weight(w, mod, kernel, device, dtype, bw, args))
        if name == "expert_w1":
            w3 = random_qweight((out, inp), bits, group, sg, device, seed=1)
            result["gate_up"] = bench_gate_up(w, w3, kernel, device, dtype, args)
    if mod is not None:
        result["tuned_configs"] = mod.chosen_configs()
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
