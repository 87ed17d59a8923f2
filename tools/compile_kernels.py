"""Compile the fused kernels for NVIDIA GPUs without one: every launch configuration the tuner may pick, at
Mixtral-8x7B's shapes, for Turing (T4, sm_75), Ampere (A100, sm_80) and Hopper (H100/H200, sm_90), with the
ptxas that ships in triton's wheel. Prints JSON: registers, shared memory and spilled (local) bytes per
thread, and the compile time. A GPU session then only has to measure speed, not discover compile errors.

    python tools/compile_kernels.py [--arch 75,80,90]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")      # triton 3.9's default, said out loud

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

from mixoff_app.kernels.geometry import Geometry, geometry  # noqa: E402

# (name, shape, bits, group): the reference checkpoint's formats at Mixtral-8x7B's shapes.
SHAPES = [("expert_w1", (14336, 4096), 2, 16), ("expert_w2", (4096, 14336), 2, 16),
          ("attn_q", (4096, 4096), 4, 64), ("attn_k", (1024, 4096), 4, 64)]
SMS = {75: 40, 80: 108, 90: 132}                     # T4, A100, H100/H200
TRITON_DTYPE = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}


def _kernels():
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("TRITON_INTERPRET=1 is set: the kernels are interpreted and cannot be compiled")
    from mixoff_app.kernels import qmatmul
    return qmatmul


def _signature(kind: str, dtype: str) -> dict:
    t = TRITON_DTYPE[dtype]
    weight = {"wq_ptr": "*u8", "s_ptr": "*u8", "ss_ptr": "*fp16", "sz_ptr": "*fp16", "z_ptr": "*u8",
              "zs_ptr": "*fp16", "zz_ptr": "*fp16"}
    sig = {"x_ptr": f"*{t}", "y_ptr": "*fp32" if kind == "gemv" else f"*{t}"} | weight
    if kind == "swiglu":          # the up projection's operands: the same names with a 3
        sig |= {k.replace("_ptr", "3_ptr"): v for k, v in weight.items()}
    ints = {"gemm": ("T", "R", "K", "C", "OUT"), "gemv": ("R", "K", "C", "OUT", "K_SPLIT"),
            "swiglu": ("R", "K", "C", "OUT")}[kind]
    return sig | {n: "i32" for n in ints}


def compile_one(kind: str, g: Geometry, cfg, arch: int, dtype: str = "float16") -> dict:
    """Compile one kernel for ``sm_<arch>``; its resource usage per thread."""
    K = _kernels()
    cons = dict(BITS=g.bits, PER=g.per, S=g.S, PER_P=g.per_p, S_P=g.s_p, TOP=g.top, SCALE_META=True,
                ZERO_META=True)
    if kind == "gemm":
        fn, cons = K.qgemm_kernel, cons | dict(IEEE=dtype == "float32", BT=cfg.BT, BR=cfg.BR, BK=cfg.BK)
    elif kind == "swiglu":
        fn, cons = K.qgemv_swiglu_kernel, cons | dict(BR=cfg.BR, BK=cfg.BK)
    else:
        fn, cons = K.qgemv_kernel, cons | dict(BR=cfg.BR, BK=cfg.BK)
    sig = _signature(kind, dtype) | {k: "constexpr" for k in cons}
    t0 = time.perf_counter()
    k = triton.compile(triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=cons),
                       target=GPUTarget("cuda", arch, 32), options={"num_warps": cfg.warps})
    seconds = time.perf_counter() - t0
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(k.asm["cubin"])
        f.flush()
        tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
        dump = subprocess.run([str(tool), "--dump-resource-usage", f.name], capture_output=True, text=True,
                              check=True).stdout
    m = re.search(r"REG:(\d+).*?SHARED:(\d+).*?LOCAL:(\d+)", dump)
    return {"kernel": kind, "arch": arch, "dtype": dtype, "config": dict(cfg.__dict__), "regs": int(m.group(1)),
            "shared_bytes": int(m.group(2)), "local_bytes": int(m.group(3)), "compile_s": round(seconds, 2)}


def configs(archs, gemm_tokens=(1, 16, 64, 512)) -> list[tuple]:
    """Every (kind, name, geometry, config, arch) the tuner may try at Mixtral shapes (distinct compiles)."""
    K = _kernels()
    seen, out = set(), []
    for arch in archs:
        for name, shape, bits, group in SHAPES:
            g = geometry(shape, bits, group)
            cands = [("gemv", c) for c in K.gemv_candidates(g, SMS[arch])]
            cands += [("gemm", c) for T in gemm_tokens for c in K.gemm_candidates(g, T, gpu=True)]
            if name == "expert_w1":        # w1 and w3 together: the experts' fused gate/up GEMV
                cands += [("swiglu", c) for c in K.swiglu_candidates(g, SMS[arch])]
            for kind, c in cands:
                key = (kind, g.bits, g.S, c.BR, c.BK, c.warps, getattr(c, "BT", None), arch)
                if key not in seen:                  # the split and the shape are runtime arguments
                    seen.add(key)
                    out.append((kind, name, g, c, arch))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", default="75,80,90", help="comma-separated compute capabilities (sm_XY -> XY)")
    args = ap.parse_args()
    rows = []
    for kind, name, g, c, arch in configs([int(a) for a in args.arch.split(",")]):
        rows.append({"shape": name} | compile_one(kind, g, c, arch))
    print(json.dumps({"triton": triton.__version__, "compiled": rows}, indent=1))


if __name__ == "__main__":
    main()
