"""Write tests/fixtures/reference_tiny: a tiny Mixtral in the layout of the reference pre-quantized checkpoint.

The reference checkpoint is lavawolfiee/Mixtral-8x7B-Instruct-v0.1-offloading-demo, read by the reference
project, dvmazur/mixtral-offloading (src/build_model.py, src/custom_layers.py). It was made with hqq 0.1.x's HQQLinear plus a subclass whose
``quantize`` re-packs W_q along the weight's own rows and whose state-dict hook writes ``W_q`` and the
tensors held in ``meta``. This script runs the real hqq 0.1.1 quantizer and reproduces that layout; it
does not import the reference project's code.

Run it in a throwaway virtualenv, never in the project's Python (which has hqq 0.2.x):

    python3 -m venv /tmp/refvenv
    /tmp/refvenv/bin/pip install torch==2.13.0
    /tmp/refvenv/bin/pip install --no-deps hqq==0.1.1
    /tmp/refvenv/bin/pip install numpy tqdm termcolor safetensors
    /tmp/refvenv/bin/python tools/make_reference_fixture.py --system-python /usr/bin/python3

Only ``hqq.core.quantize`` is imported (hqq's top level pulls transformers/timm/accelerate, which the
quantizer does not need). Two CPU workarounds, both keeping hqq's own arithmetic:

* ``Quantizer.cuda`` (called by ``HQQLinear.quantize``) is pointed at ``Quantizer.to_inplace(..., 'cpu')``.
  That is the same function ``.cuda()`` runs, so the fp32 -> fp16 cast of meta tensors still happens.
* ``optimize_weights_proximal`` defaults to ``device='cuda'`` and then works in fp16. It is called with a
  device string that reads as 'cpu' to torch but compares equal to 'cuda', so the optimiser runs its GPU
  branch (fp16 arithmetic) on the CPU, as it did on the GPU where the reference checkpoint was made.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import hqq
import torch
from hqq.core import quantize as hq
from hqq.core.quantize import BaseQuantizeConfig, HQQLinear, Quantizer
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parents[1]

# Every group divides as in Mixtral-8x7B: attention numel/64 is a multiple of 256 (the scale group),
# expert numel/16 a multiple of 128. Intermediate < hidden only to keep the folder under 3 MB with a
# reference for every quantized linear; w1 (64, 256) and w2 (256, 64) still differ in shape.
DIMS = dict(vocab_size=320, hidden_size=256, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=8, num_key_value_heads=2, head_dim=32, num_local_experts=4,
            num_experts_per_tok=2)


class _CudaNamedCpu(str):
    """'cpu' for torch, equal to 'cuda' for hqq's ``device == 'cuda'`` test (fp16 optimiser branch)."""
    __hash__ = str.__hash__

    def __eq__(self, other):
        return other == "cuda" or str.__eq__(self, other)


def _patch_hqq_for_cpu() -> None:
    assert hqq.__version__.startswith("0.1."), f"needs hqq 0.1.x, found {hqq.__version__}"
    Quantizer.cuda = classmethod(lambda cls, W_q, meta, device_n=0: cls.to_inplace(W_q, meta, device="cpu"))
    original = hq.optimize_weights_proximal

    def optimize_fp16_on_cpu(*args, **kwargs):
        kwargs["device"] = _CudaNamedCpu("cpu")
        return original(*args, **kwargs)

    Quantizer.optimize_weights = optimize_fp16_on_cpu


def demo_configs():
    """The quantization configs of the reference project's demo notebook."""
    attn = BaseQuantizeConfig(nbits=4, group_size=64, quant_zero=True, quant_scale=True)
    attn["scale_quant_params"]["group_size"] = 256
    ffn = BaseQuantizeConfig(nbits=2, group_size=16, quant_zero=True, quant_scale=True)
    return attn, ffn


def repack_rows(layer: HQQLinear) -> None:
    """What the reference project's subclass does right after quantizing: re-pack the integer codes along the rows of
    the (out, in) weight instead of the rows of hqq's (group_size, numel/group_size) grouping view."""
    meta = layer.meta
    shape = tuple(meta["shape"])
    if tuple(layer.W_q.shape) == shape:
        return
    codes = Quantizer.unpack[meta["packing"]](layer.W_q)           # [group_size, numel/group_size]
    codes = codes.reshape(-1, *shape[1:])[: shape[0]]              # [out, in], same element order
    layer.W_q = Quantizer.pack[meta["packing"]](codes)              # [out / (8/nbits), in]


def reference_entries(layer: HQQLinear) -> dict[str, torch.Tensor]:
    """The tensors the reference project's state-dict hook writes for one linear, under its relative names."""
    meta = layer.meta
    out = {"W_q": layer.W_q}
    if getattr(layer, "bias", None) is not None:
        out["bias"] = layer.bias
    for part in ("scale", "zero"):          # each either meta-quantized (codes + their scale/zero) or plain
        if f"meta_{part}" in meta:
            out[f"meta.{part}_q"] = meta[f"{part}_q"]
            out[f"meta.meta_{part}.scale"] = meta[f"meta_{part}"]["scale"]
            out[f"meta.meta_{part}.zero"] = meta[f"meta_{part}"]["zero"]
        else:
            out[f"meta.{part}"] = meta[part]
    return {k: v.contiguous() for k, v in out.items()}


def reference_dequantize(layer: HQQLinear) -> torch.Tensor:
    """Dequantize the re-packed layer the way the reference project's subclass does (used only as a cross-check)."""
    meta = layer.meta
    scale = Quantizer.dequantize(meta["scale_q"], meta["meta_scale"])
    zero = Quantizer.dequantize(meta["zero_q"], meta["meta_zero"])
    codes = Quantizer.unpack[meta["packing"]](layer.W_q).half()[: meta["shape"][0]]
    codes = codes.reshape(meta["group_size"], -1)
    return ((codes - zero) * scale).reshape(meta["shape"])


def quantize_linear(weight16: torch.Tensor, config) -> tuple[HQQLinear, torch.Tensor]:
    lin = torch.nn.Linear(weight16.shape[1], weight16.shape[0], bias=False, dtype=torch.float16)
    lin.weight.data.copy_(weight16)
    layer = HQQLinear(lin, config)                 # Quantizer.quantize + meta quantization + "cuda()" casts
    reference = layer.dequantize().clone()         # hqq 0.1.1's own dequantization, before re-packing
    repack_rows(layer)
    assert torch.equal(reference_dequantize(layer), reference), "re-packing changed the dequantized weight"
    return layer, reference


def random_weights(seed: int) -> dict[str, torch.Tensor]:
    """Deterministic fp32 weights under the hub's per-expert names."""
    g = torch.Generator().manual_seed(seed)
    d = DIMS
    h, f, hd = d["hidden_size"], d["intermediate_size"], d["head_dim"]
    nh, nkv = d["num_attention_heads"], d["num_key_value_heads"]

    def normal(*shape, std):
        return torch.randn(*shape, generator=g) * std

    sd = {"model.embed_tokens.weight": normal(d["vocab_size"], h, std=1.0),
          "model.norm.weight": 1 + normal(h, std=0.1)}
    for i in range(d["num_hidden_layers"]):
        p = f"model.layers.{i}."
        sd[p + "input_layernorm.weight"] = 1 + normal(h, std=0.1)
        sd[p + "post_attention_layernorm.weight"] = 1 + normal(h, std=0.1)
        sd[p + "self_attn.q_proj.weight"] = normal(nh * hd, h, std=h ** -0.5)
        sd[p + "self_attn.k_proj.weight"] = normal(nkv * hd, h, std=h ** -0.5)
        sd[p + "self_attn.v_proj.weight"] = normal(nkv * hd, h, std=h ** -0.5)
        sd[p + "self_attn.o_proj.weight"] = normal(h, nh * hd, std=(nh * hd) ** -0.5)
        sd[p + "block_sparse_moe.gate.weight"] = normal(d["num_local_experts"], h, std=1.0)
        for e in range(d["num_local_experts"]):
            q = f"{p}block_sparse_moe.experts.{e}."
            sd[q + "w1.weight"] = normal(f, h, std=h ** -0.5)
            sd[q + "w2.weight"] = normal(h, f, std=f ** -0.5)
            sd[q + "w3.weight"] = normal(f, h, std=h ** -0.5)
    sd["lm_head.weight"] = normal(d["vocab_size"], h, std=h ** -0.5)
    return sd


def hf_config(bos: int, eos: int) -> dict:
    return {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", **DIMS,
            "hidden_act": "silu", "rms_norm_eps": 1e-5, "rope_theta": 1e6, "max_position_embeddings": 2048,
            "sliding_window": None, "tie_word_embeddings": False, "bos_token_id": bos, "eos_token_id": eos,
            "attention_dropout": 0.0, "router_aux_loss_coef": 0.02, "output_router_logits": False,
            "initializer_range": 0.02, "use_cache": True, "torch_dtype": "float16"}


ORIGINALS = ("model.layers.0.self_attn.k_proj.weight",
             "model.layers.0.block_sparse_moe.experts.0.w1.weight",
             "model.layers.0.block_sparse_moe.experts.0.w2.weight",
             "model.layers.0.block_sparse_moe.experts.0.w3.weight")


def build(out: Path, seed: int) -> None:
    attn_cfg, ffn_cfg = demo_configs()
    weights = random_weights(seed)
    trunk: dict[str, torch.Tensor] = {}
    experts: dict[str, dict[str, torch.Tensor]] = {}     # file name -> keys relative to the expert
    weight_map: dict[str, str] = {}
    reference: dict[str, torch.Tensor] = {}
    for name in ORIGINALS:
        reference["original." + name] = weights[name].half().float()   # what was quantized, exactly

    for name, w in weights.items():
        w16 = w.half()
        module = name[: -len(".weight")]
        if ".self_attn." in name:
            layer, ref = quantize_linear(w16, attn_cfg)
            for k, v in reference_entries(layer).items():
                trunk[f"{module}.{k}"] = v
            reference[name] = ref
        elif ".experts." in name:
            layer, ref = quantize_linear(w16, ffn_cfg)
            expert, proj = module.rsplit(".", 1)                       # ...experts.E, w1
            li, ei = int(expert.split(".")[2]), int(expert.rsplit(".", 1)[1])
            fname = f"layer{li:02d}_expert{ei:02d}.safetensors"
            for k, v in reference_entries(layer).items():
                experts.setdefault(fname, {})[f"{proj}.{k}"] = v
                weight_map[f"{module}.{k}"] = fname
            reference[name] = ref
        else:
            trunk[name] = w16

    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.safetensors"):
        old.unlink()
    trunk_name = "trunk.safetensors"
    weight_map.update({k: trunk_name for k in trunk})
    meta = {"format": "pt"}
    save_file(trunk, str(out / trunk_name), metadata=meta)
    for fname, sd in experts.items():
        save_file(sd, str(out / fname), metadata=meta)
    total = sum(t.numel() * t.element_size() for t in trunk.values())
    total += sum(t.numel() * t.element_size() for sd in experts.values() for t in sd.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    save_file(reference, str(out / "reference.safetensors"),
              # one metadata key: safetensors writes several in hash order, which changes the bytes run to run
              metadata={"made_by": f"hqq {hqq.__version__}, torch {torch.__version__}, seed {seed}"})


def write_tokenizer(out: Path, system_python: str) -> tuple[int, int]:
    code = ("import sys; from mixoff_app.tiny import train_tokenizer, doc_corpus; "
            f"t = train_tokenizer(doc_corpus(), {DIMS['vocab_size']}); t.save_pretrained(sys.argv[1]); "
            "print(len(t), t.bos_token_id, t.eos_token_id)")
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONHOME", "PYTHONPATH")}
    res = subprocess.run([system_python, "-c", code, str(out)], cwd=REPO, env=env, check=True,
                         capture_output=True, text=True)
    n, bos, eos = map(int, res.stdout.split()[-3:])
    assert n == DIMS["vocab_size"], f"tokenizer has {n} tokens, config says {DIMS['vocab_size']}"
    return bos, eos


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=REPO / "tests" / "fixtures" / "reference_tiny")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--system-python", default=None,
                    help="the project's Python (with transformers/tokenizers) to train and save the tokenizer")
    args = ap.parse_args(argv)
    _patch_hqq_for_cpu()
    torch.manual_seed(args.seed)
    build(args.out, args.seed)
    bos, eos = (1, 2)
    if args.system_python:
        bos, eos = write_tokenizer(args.out, args.system_python)
    else:
        print("tokenizer not written: pass --system-python", file=sys.stderr)
    (args.out / "config.json").write_text(json.dumps(hf_config(bos, eos), indent=2) + "\n")
    print(f"wrote {args.out} with hqq {hqq.__version__}, torch {torch.__version__}")


if __name__ == "__main__":
    main()
