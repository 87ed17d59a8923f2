"""Our CPU decode beside llama.cpp's on the same weights and threads, interleaved. Prints one JSON object.

The model is the random ``cpu-bench`` preset (Mixtral's structure: hidden 768, experts of 2048, 8 layers,
8 experts, top-2, vocab 2048), written once in Hugging Face format. llama.cpp gets the same weights as GGUF:
float32 written here with llama.cpp's own ``gguf`` Python package (its vendored ``gguf-py``; q and k rows
permuted the way its converter permutes them for its RoPE), then ``llama-quantize`` to Q8_0, Q4_K_M and Q2_K.
Ours: float32 and attention + experts 4-bit g64 on the CPU kernels (``--kernel cpu``), and the reference path
(``--kernel torch``) in float32 and at the default attention 4-bit / experts 2-bit, as before the CPU kernels.
Every expert is resident on both sides (our engines use exclusive placement with every expert in a slot, so
the experts sit in memory once).

Decode tokens/s, prefill excluded: ours decodes ``--tokens`` greedy tokens after a 16-token prompt; llama-bench
runs ``-p 0 -n TOKENS`` (text generation from an empty context). Each repeat runs every variant once, in turn;
medians are reported and ratios taken between medians of the same run.

llama.cpp is built only when asked (``--build``), from the llama-cpp-python sdist's vendored tree (``pip download
llama-cpp-python --no-binary :all: --no-deps``), CPU only, with ``GGML_NATIVE=OFF`` and AVX2/FMA/F16C (a native
build can hit illegal instructions in VMs); about 10 minutes on 2 cores. Nothing here is a test dependency, and no
llama.cpp code enters this repository: the sdist and the build live under ``--cache``.

    python bench/vs_llama_cpp.py --build [--threads 2] [--tokens 48] [--repeats 3] [--cache ~/.cache/mixoff/llama-cpp]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from mixoff_app.config import NO_QUANT, CacheConfig, EngineConfig, QuantConfig, QuantSpec, SamplingParams  # noqa: E402
from mixoff_app.engine import Engine  # noqa: E402
from mixoff_app.tiny import write_synthetic  # noqa: E402

CMAKE_FLAGS = ["-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=OFF", "-DGGML_AVX=ON", "-DGGML_AVX2=ON", "-DGGML_FMA=ON",
               "-DGGML_F16C=ON", "-DGGML_BMI2=ON", "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
               "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF"]
QUANTS = ("Q8_0", "Q4_K_M", "Q2_K")
INT4 = QuantConfig(attn=QuantSpec(bits=4, group_size=64, scale_group=256),
                   experts=QuantSpec(bits=4, group_size=64, scale_group=128))
OURS = {"ours_fp32": (NO_QUANT, "cpu"), "ours_int4": (INT4, "cpu"),
        "ours_fp32_reference_path": (NO_QUANT, "torch"), "ours_4_2bit_reference_path": (QuantConfig.from_bits(4, 2), "torch")}


# ---- llama.cpp: fetch and build (only with --build) --------------------------------------------------------

def llama_tree(cache: Path) -> Path | None:
    trees = sorted(cache.glob("llama_cpp_python-*/vendor/llama.cpp"))
    return trees[-1] if trees else None


def build(cache: Path) -> Path:
    """Download the sdist (if not there), unpack it, configure and build llama-bench and llama-quantize."""
    cache.mkdir(parents=True, exist_ok=True)
    if llama_tree(cache) is None:
        if not list(cache.glob("llama_cpp_python-*.tar.gz")):
            subprocess.run([sys.executable, "-m", "pip", "download", "llama-cpp-python", "--no-binary", ":all:",
                            "--no-deps", "-d", str(cache)], check=True)
        with tarfile.open(sorted(cache.glob("llama_cpp_python-*.tar.gz"))[-1]) as tar:
            tar.extractall(cache, filter="data")
    tree = llama_tree(cache)
    subprocess.run(["cmake", "-S", str(tree), "-B", str(tree / "build"), *CMAKE_FLAGS], check=True)
    subprocess.run(["cmake", "--build", str(tree / "build"), "--target", "llama-bench", "llama-quantize",
                    "-j", str(os.cpu_count() or 2)], check=True)
    return tree


def binaries(tree: Path) -> dict[str, Path]:
    return {name: tree / "build" / "bin" / name for name in ("llama-bench", "llama-quantize")}


# ---- the same weights as GGUF --------------------------------------------------------------------------------

def _permute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """q/k rows from Hugging Face's rotate-half RoPE order to llama.cpp's interleaved pairs (its converter's)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(folder: Path, out: Path, tree: Path) -> Path:
    """The Hugging Face checkpoint in ``folder`` as a float32 GGUF, written with llama.cpp's gguf-py."""
    sys.path.insert(0, str(tree / "gguf-py"))
    import gguf
    from safetensors.torch import load_file

    cfg = json.loads((folder / "config.json").read_text())
    tok = json.loads((folder / "tokenizer.json").read_text())
    sd = load_file(str(folder / "model.safetensors"))
    nh, nkv, L, E = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["num_hidden_layers"], cfg["num_local_experts"]
    w = gguf.GGUFWriter(str(out), "llama")
    w.add_name("mixoff cpu-bench")
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(L)
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(nh)
    w.add_head_count_kv(nkv)
    w.add_rope_dimension_count(cfg["head_dim"])
    w.add_rope_freq_base(cfg["rope_theta"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_expert_count(E)
    w.add_expert_used_count(cfg["num_experts_per_tok"])
    w.add_vocab_size(cfg["vocab_size"])
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    vocab = sorted(tok["model"]["vocab"].items(), key=lambda kv: kv[1])
    special = {t["id"] for t in tok.get("added_tokens", [])}
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list([t for t, _ in vocab])
    w.add_token_types([gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL for _, i in vocab])
    merges = tok["model"]["merges"]
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    w.add_bos_token_id(cfg["bos_token_id"])
    w.add_eos_token_id(cfg["eos_token_id"])

    def put(name: str, t: torch.Tensor) -> None:
        w.add_tensor(name, t.float().contiguous().numpy())

    put("token_embd.weight", sd["model.embed_tokens.weight"])
    put("output_norm.weight", sd["model.norm.weight"])
    put("output.weight", sd["lm_head.weight"])
    for i in range(L):
        p, b = f"model.layers.{i}.", f"blk.{i}."
        put(b + "attn_norm.weight", sd[p + "input_layernorm.weight"])
        put(b + "attn_q.weight", _permute(sd[p + "self_attn.q_proj.weight"], nh))
        put(b + "attn_k.weight", _permute(sd[p + "self_attn.k_proj.weight"], nkv))
        put(b + "attn_v.weight", sd[p + "self_attn.v_proj.weight"])
        put(b + "attn_output.weight", sd[p + "self_attn.o_proj.weight"])
        put(b + "ffn_norm.weight", sd[p + "post_attention_layernorm.weight"])
        put(b + "ffn_gate_inp.weight", sd[p + "block_sparse_moe.gate.weight"])
        for ours, theirs in (("w1", "ffn_gate_exps"), ("w2", "ffn_down_exps"), ("w3", "ffn_up_exps")):
            put(f"{b}{theirs}.weight",
                torch.stack([sd[f"{p}block_sparse_moe.experts.{e}.{ours}.weight"] for e in range(E)]))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


# ---- timing ----------------------------------------------------------------------------------------------------

def ours_tps(engine: Engine, prompt: list[int], n: int) -> float:
    engine.forget_kv()
    t0 = time.perf_counter()
    evs = list(engine.stream_ids(prompt, SamplingParams(max_new_tokens=n, greedy=True)))
    decoded = sum(e.token_id is not None for e in evs if e.kind == "token")
    return decoded / (time.perf_counter() - t0 - engine.stats().prefill_s)


def llama_tps(bench: Path, model: Path, n: int, threads: int) -> float:
    out = subprocess.run([str(bench), "-m", str(model), "-p", "0", "-n", str(n), "-t", str(threads), "-r", "1",
                          "-o", "json"], capture_output=True, text=True, check=True).stdout
    return float(json.loads(out)[0]["avg_ts"])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--build", action="store_true", help="download and build llama.cpp if it is not built yet")
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "mixoff" / "llama-cpp",
                    help="where the sdist, the build, the checkpoint and the GGUF files live")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    result = {"benchmark": "vs_llama_cpp", "date": time.strftime("%Y-%m-%d"), "threads": args.threads,
              "tokens": args.tokens, "torch": torch.__version__}
    tree = llama_tree(args.cache)
    if args.build and (tree is None or not all(p.exists() for p in binaries(tree).values())):
        tree = build(args.cache)
    if tree is None or not all(p.exists() for p in binaries(tree).values()):
        result["skipped"] = f"llama.cpp is not built under {args.cache}: run with --build"
        print(json.dumps(result, indent=1))
        return
    result["llama_cpp"] = tree.parent.parent.name
    bins = binaries(tree)
    work = args.cache / "cpu-bench"
    folder = work / "hf"
    if not (folder / "model.safetensors").exists():
        write_synthetic(folder, "cpu-bench", seed=0)
    ggufs = {"llama_f32": work / "f32.gguf"}
    if not ggufs["llama_f32"].exists():
        write_gguf(folder, ggufs["llama_f32"], tree)
    for q in QUANTS:
        ggufs[f"llama_{q.lower()}"] = path = work / f"{q}.gguf"
        if not path.exists():
            subprocess.run([str(bins["llama-quantize"]), str(ggufs["llama_f32"]), str(path), q], check=True,
                           capture_output=True)
    result["gguf_mib"] = {k: round(p.stat().st_size / 2**20, 1) for k, p in ggufs.items()}
    engines = {name: Engine.load(EngineConfig(model=str(folder), device="cpu", quant=q, kernel=k, max_context=256,
                                              cache=CacheConfig(placement="exclusive")))
               for name, (q, k) in OURS.items()}
    result["ours_quant"] = {n: f"{e.info.kernel}: {e.info.quant}" for n, e in engines.items()}
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(folder))
    prompt = tok("def zip(*iterables): return an iterator of tuples")["input_ids"][:16]
    for e in engines.values():
        ours_tps(e, prompt, 4)                                                           # warm-up
    runs: dict[str, list[float]] = {n: [] for n in list(engines) + list(ggufs)}
    for _ in range(args.repeats):
        for name, e in engines.items():
            runs[name].append(ours_tps(e, prompt, args.tokens))
        for name, path in ggufs.items():
            runs[name].append(llama_tps(bins["llama-bench"], path, args.tokens, args.threads))
        print(json.dumps({k: round(v[-1], 1) for k, v in runs.items()}), file=sys.stderr, flush=True)
    med = {k: round(statistics.median(v), 2) for k, v in runs.items()}
    result["tokens_per_s_median"] = med
    result["tokens_per_s_runs"] = {k: [round(x, 2) for x in v] for k, v in runs.items()}
    result["ratios"] = {"ours_int4_vs_llama_q4_k_m": round(med["ours_int4"] / med["llama_q4_k_m"], 3),
                        "ours_fp32_vs_llama_f32": round(med["ours_fp32"] / med["llama_f32"], 3),
                        "ours_int4_vs_ours_fp32": round(med["ours_int4"] / med["ours_fp32"], 3),
                        "ours_fp32_vs_reference_path": round(med["ours_fp32"] / med["ours_fp32_reference_path"], 3),
                        "ours_int4_vs_4_2bit_reference_path":
                            round(med["ours_int4"] / med["ours_4_2bit_reference_path"], 3)}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
