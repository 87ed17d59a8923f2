"""Read MoE checkpoints in three layouts and write our own.

Layouts, told apart by the keys found:
- ``hf``: Hugging Face fp16/bf16/fp32 weights with the hub's per-expert names of the family (its row in
  families.py: ``model.layers.L.block_sparse_moe.experts.E.w1.weight`` for Mixtral, ``model.layers.L.mlp.
  experts.E.gate_proj.weight`` for the others), quantized while loading, tensor by tensor, so peak host memory
  stays near the quantized size.
- ``reference``: the reference project's pre-quantized checkpoint (hqq 0.1.x, ``P.W_q`` + ``P.meta.*``), under
  the family's names (the reference project is Mixtral's).
- ``mixoff``: ours (``python -m mixoff_app quantize``): trunk tensors by field name, each expert as one
  ``...experts.E.packed`` blob in the store's layout, so loading an expert is one copy. The metadata records
  the family (``mixoff.family``) beside the quantization.

Experts are addressed by expert layer (``cfg.moe_layers``); names in files use the decoder layer.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional

import torch

from .config import ConfigError, ModelConfig, QuantConfig, QuantSpec
from .families import DEFAULT_FAMILY, DENSE_NAMES, FAMILIES, hub_expert_suffixes
from .model import LayerWeights, TrunkWeights
from .outputs import check_new_folder, new_folder
from .quant import QWeight, pack, quantize, qweight_from, unpack, weight_fields
from .stores import ExpertLayout, ExpertStore, ExpertWeights, InclusiveStore, expert_tensors_from_dense
from .validation import CheckpointError, check_config_object, check_config_values, check_tensors, sample_experts

Progress = Callable[[str], None]

MIXOFF_FORMAT = "1"
# The attention's quantized linears: hub name -> LayerWeights field (ModelConfig.attention_shapes says which a
# model has: q/k/v/o, or MLA's q (or q_a/q_b), kv_a_proj_with_mqa and o).
ATTN_FIELDS = {"q_proj": "wq", "k_proj": "wk", "v_proj": "wv", "o_proj": "wo", "q_a_proj": "wq_a",
               "q_b_proj": "wq_b", "kv_a_proj_with_mqa": "wkv_a"}
# The reference checkpoint's meta names -> our field names.
REFERENCE_FIELDS = {"W_q": "W_q", "meta.scale": "scale", "meta.zero": "zero", "meta.scale_q": "scale_q",
               "meta.meta_scale.scale": "scale_s", "meta.meta_scale.zero": "scale_z", "meta.zero_q": "zero_q",
               "meta.meta_zero.scale": "zero_s", "meta.meta_zero.zero": "zero_z"}


def _noop(msg: str) -> None:
    pass


# ---- files and tensors -------------------------------------------------------------------------

class TensorSource:
    """Lazy access to the tensors of a (possibly sharded) safetensors checkpoint folder."""

    def __init__(self, folder: Path) -> None:
        from safetensors import safe_open
        self.folder = Path(folder)
        index = self.folder / "model.safetensors.index.json"
        if index.exists():
            try:
                self.weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError) as e:
                raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
        elif (self.folder / "model.safetensors").exists():
            self.weight_map = None
        else:
            raise CheckpointError(f"{self.folder}: no model.safetensors or model.safetensors.index.json found")
        self._open = safe_open
        self._handles: dict[str, object] = {}
        self._shard_keys: dict[str, set] = {}
        if self.weight_map is None:
            h = self._handle("model.safetensors")
            self.weight_map = {k: "model.safetensors" for k in h.keys()}
        for shard in sorted(set(self.weight_map.values())):
            if not (self.folder / shard).exists():
                raise CheckpointError(f"missing checkpoint shard {self.folder / shard} (listed in the index); "
                                      f"download it again or check the folder")
        self.metadata = self._handle(next(iter(sorted(set(self.weight_map.values()))))).metadata() or {}

    def _handle(self, shard: str):
        h = self._handles.get(shard)
        if h is None:
            path = self.folder / shard
            try:
                h = self._open(str(path), framework="pt", device="cpu")
            except Exception as e:   # safetensors raises its own error types for truncated/corrupt files
                raise CheckpointError(f"cannot read checkpoint shard {path}: {e} — the file is corrupt or "
                                      f"incomplete; delete it and download it again") from None
            self._handles[shard] = h
        return h

    def _keys(self, shard: str) -> set:
        ks = self._shard_keys.get(shard)
        if ks is None:
            ks = self._shard_keys[shard] = set(self._handle(shard).keys())
        return ks

    def keys(self) -> Iterable[str]:
        return self.weight_map.keys()

    def __contains__(self, key: str) -> bool:
        return key in self.weight_map

    def get(self, key: str) -> torch.Tensor:
        shard = self.weight_map.get(key)
        if shard is None:
            raise CheckpointError(f"checkpoint {self.folder} has no tensor {key!r}")
        try:
            h = self._handle(shard)
            if key not in self._keys(shard):
                # The reference checkpoint stores each expert in its own file under names relative to
                # the expert ("w1.W_q"); the index still maps the full names to that file.
                rel = key.split(".experts.", 1)[-1].split(".", 1)[-1]
                if ".experts." in key and rel in self._keys(shard):
                    return h.get_tensor(rel)
                raise CheckpointError(f"{self.folder / shard} has no tensor {key!r}, though the index lists it")
            return h.get_tensor(key)
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"cannot read tensor {key!r} from {self.folder / shard}: {e} — the file is "
                                  f"corrupt or incomplete; delete it and download it again") from None

    def where(self, key: str) -> Path:
        """The file a tensor comes from (the folder when the name is not in the index)."""
        shard = self.weight_map.get(key)
        return self.folder / shard if shard else self.folder

    def close(self) -> None:
        self._handles.clear()
        self._shard_keys.clear()


def detect_format(keys: Iterable[str], metadata: Optional[dict] = None) -> str:
    if metadata and metadata.get("mixoff.format"):
        return "mixoff"
    ks = set(keys)
    hub = hub_expert_suffixes()
    if any(k.endswith(tuple(s.removesuffix(".weight") + ".W_q" for s in hub)) for k in ks):
        return "reference"
    if any(k.endswith(hub) for k in ks):
        return "hf"
    if any("experts.gate_up_proj" in k for k in ks):
        raise CheckpointError("this checkpoint stores experts fused (experts.gate_up_proj); save it with "
                              "transformers' save_pretrained, which writes the hub's per-expert names")
    examples = sorted({f"{f.expert_prefix(0, 0)}.{f.expert_names[0]}.weight" for f in FAMILIES.values()})
    raise CheckpointError(f"not a supported MoE checkpoint: found no expert weights (expected keys like "
                          f"{' or '.join(examples)})")


def read_config(folder: Path) -> ModelConfig:
    path = Path(folder) / "config.json"
    if not path.exists():
        raise CheckpointError(f"{path} not found: a checkpoint folder needs its config.json")
    try:
        data = check_config_object(json.loads(path.read_text(encoding="utf-8")), path)
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: cannot read it ({getattr(e, 'strerror', None) or e})") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    check_config_values(_raw_fields(data), path)      # wrong types and ranges, named as config.json spells them
    try:
        cfg = ModelConfig.from_hf(data)
    except KeyError as e:
        raise CheckpointError(f"{path}: the setting {e.args[0]!r} is missing") from None
    except (ValueError, TypeError, ZeroDivisionError, AttributeError) as e:
        raise CheckpointError(f"{path}: {e}") from None
    check_config_values(vars(cfg), path)
    return cfg


def _raw_fields(data: dict) -> dict:
    """config.json values under ModelConfig's field names, unconverted, so a wrong type is named as given."""
    from .validation import OPTIONAL_SIZES, POSITIVE_FLOATS, SIZE_FIELDS, TOKEN_IDS
    out = {}
    for table in (SIZE_FIELDS, OPTIONAL_SIZES, POSITIVE_FLOATS, TOKEN_IDS):
        for name, key in table.items():
            if data.get(key) is not None and not (key == "eos_token_id" and isinstance(data[key], list)):
                out[name] = data[key]
    return out


# ---- reference layout conversion -----------------------------------------------------------------

def reference_qweight(src: TensorSource, prefix: str, shape: tuple[int, int]) -> QWeight:
    """Read one hqq 0.1.x linear. Its W_q was repacked over the (out, in) view of the codes (the reference
    project's ``repack``); we repack it over hqq's (group, M) view, which our dequantization reads."""
    t = {}
    for src_name, ours in REFERENCE_FIELDS.items():
        key = f"{prefix}.{src_name}"
        if key in src:
            t[ours] = src.get(key)
    if "W_q" not in t:
        raise CheckpointError(f"checkpoint {src.folder} has no tensor {prefix}.W_q")
    out, inp = shape
    if "scale_q" in t:
        M = t["scale_q"].numel()
    elif "scale" in t:
        M = t["scale"].numel()
    else:
        raise CheckpointError(f"{prefix}: neither meta.scale nor meta.scale_q in {src.folder}")
    if (out * inp) % M:
        raise CheckpointError(f"{prefix}: {M} scales do not divide a weight of shape {shape}")
    group = out * inp // M
    W_q = t["W_q"]
    if W_q.dtype != torch.uint8:
        raise CheckpointError(f"{prefix}.W_q has dtype {W_q.dtype}; only 2-, 4- and 8-bit uint8 packs are supported")
    if W_q.shape[1] == inp and W_q.shape[0] * 8 % out == 0 and M != inp:
        bits = W_q.shape[0] * 8 // out
        codes = unpack(W_q, bits, out, torch.uint8)                 # [out, in]
        t["W_q"] = pack(codes.reshape(group, M), bits)              # [group*bits/8, M]
    else:
        bits = W_q.shape[0] * 8 // group
    if bits not in (2, 4, 8):
        raise CheckpointError(f"{prefix}: unsupported bit width {bits} in the pre-quantized checkpoint")
    q = QWeight(shape=shape, bits=bits, group_size=group, W_q=t["W_q"])
    for name in ("scale", "scale_q", "zero", "zero_q"):
        if name in t:
            setattr(q, name, t[name] if name.endswith("_q") else t[name].to(torch.float16).reshape(1, -1))
    for name in ("scale_s", "scale_z"):
        if name in t:
            setattr(q, name, t[name].to(torch.float16).reshape(1, -1))
    for name in ("zero_s", "zero_z"):
        if name in t:
            setattr(q, name, t[name].to(torch.float16).reshape(()))
    if q.scale_q is not None:
        q.scale_q = q.scale_q.reshape(-1, q.scale_s.numel())
    if q.zero_q is not None:
        q.zero_q = q.zero_q.reshape(1, -1)
    return q


def spec_of(q: QWeight) -> QuantSpec:
    sg = q.scale_q.shape[0] if q.scale_q is not None else None
    return QuantSpec(bits=q.bits, group_size=q.group_size, scale_group=sg, quant_zero=q.zero_q is not None)


# ---- loading -------------------------------------------------------------------------------------

@dataclass
class Loaded:
    cfg: ModelConfig
    trunk: TrunkWeights
    store: ExpertStore
    quant: QuantConfig           # what is actually in memory (a pre-quantized checkpoint decides it)
    checkpoint_format: str     # "hf" | "reference" | "mixoff": how the file stores its weights


def _dense(t: torch.Tensor, device, dtype) -> torch.Tensor:
    return t.to(device=device, dtype=dtype).contiguous()


def _qdevice(q: QWeight, device) -> QWeight:
    for k, v in q.tensors().items():
        setattr(q, k, v.to(device))
    return q


def load_checkpoint(folder: str | os.PathLike, quant: QuantConfig, device: str | torch.device,
                    dtype: torch.dtype, pin: bool = False, progress: Progress = _noop,
                    quant_device: Optional[str] = None) -> Loaded:
    """Load any of the three layouts into device trunk weights and an inclusive host expert store."""
    return load_checkpoint_placed(folder, quant, device, dtype,
                                  lambda cfg, elayout, layout, folder: InclusiveStore(cfg, elayout, pin=pin),
                                  progress=progress, quant_device=quant_device)


def _check_specs(cfg: ModelConfig, quant: QuantConfig) -> None:
    h, f = cfg.hidden_size, cfg.intermediate_size
    checks = [(quant.attn, "attention", o * i) for o, i in cfg.attention_shapes().values()]
    checks.append((quant.experts, "expert", f * h))
    for size in (cfg.shared_intermediate_size, cfg.dense_intermediate_size):
        if size:     # dense MLPs and shared experts are trunk: quantized like attention
            checks.append((quant.attn, "attention", size * h))
    for spec, what, numel in checks:
        if spec.enabled and numel % spec.group_size:
            raise ConfigError(f"{what} group size {spec.group_size} does not divide the {what} weights of this "
                              f"model ({numel} values); pick a divisor")


def _mixoff_quant(src: TensorSource, cfg: Optional[ModelConfig] = None) -> QuantConfig:
    fam = src.metadata.get("mixoff.family", DEFAULT_FAMILY)    # format 1 files before families were Mixtral
    if cfg is not None and fam != cfg.family:
        raise CheckpointError(f"{src.folder}: the weights were quantized from a {fam} model but config.json says "
                              f"{cfg.family}; quantize the checkpoint again")
    try:
        q = json.loads(src.metadata["mixoff.quant"])
        return QuantConfig(attn=QuantSpec(**q["attn"]), experts=QuantSpec(**q["experts"]))
    except (KeyError, ValueError, TypeError) as e:
        raise CheckpointError(f"{src.folder}: mixoff metadata is damaged ({e}); quantize the checkpoint again")


def _reference_quant(src: TensorSource, cfg: ModelConfig) -> QuantConfig:
    h, f = cfg.hidden_size, cfg.intermediate_size
    a = spec_of(reference_qweight(src, "model.layers.0.self_attn.q_proj", (cfg.num_heads * cfg.head_dim, h)))
    fam = cfg.traits
    first = cfg.moe_layers[0]
    e = spec_of(reference_qweight(src, f"{fam.expert_prefix(first, 0)}.{fam.expert_names[0]}", (f, h)))
    return QuantConfig(attn=a, experts=e)


def _trunk_linear(src, fmt, prefix, shape, spec, device, dtype, qdev):
    """One always-resident linear (attention, a dense MLP, a shared expert) in any layout, quantized with
    ``spec`` (the attention spec) when it is enabled."""
    if fmt == "reference":
        return _qdevice(reference_qweight(src, prefix, shape), device)
    if fmt == "mixoff" and spec.enabled:
        fields = weight_fields(prefix, shape, spec, dtype)
        got = {f.name: src.get(f.name) for f in fields}
        check_tensors(((f.name, got[f.name], f.shape) for f in fields), src.where, finite=False)
        return qweight_from({k: v.to(device) for k, v in got.items()}, prefix, shape, spec)
    dense = src.get(prefix + ".weight")
    if tuple(dense.shape) != shape:
        raise CheckpointError(f"{prefix}.weight has shape {tuple(dense.shape)}, config says {shape}")
    return _qdevice(quantize(dense, spec, qdev), device) if spec.enabled else _dense(dense, device, dtype)


def _resident_mlp(src, fmt, prefix, size, h, spec, device, dtype, qdev) -> ExpertWeights:
    shapes = ((size, h), (size, h), (h, size))
    return ExpertWeights(*(_trunk_linear(src, fmt, f"{prefix}.{n}", s, spec, device, dtype, qdev)
                           for n, s in zip(DENSE_NAMES, shapes)))


def _mla_extras(src, p: str, cfg: ModelConfig, device, dtype) -> dict:
    """MLA's unquantized attention tensors of one layer: the latent's norm (and the q LoRA's), and kv_b_proj
    split per head into the key half [nh, nope, c] and the transposed value half [nh, c, v]."""
    nh, c, v = cfg.num_heads, cfg.kv_lora_rank, cfg.v_head_dim
    nope = cfg.head_dim - cfg.qk_rope_head_dim
    key = f"{p}self_attn.kv_b_proj.weight"
    kv_b = src.get(key)
    if tuple(kv_b.shape) != (nh * (nope + v), c):
        raise CheckpointError(f"{key} has shape {tuple(kv_b.shape)}, config says {(nh * (nope + v), c)}")
    kv_b = kv_b.view(nh, nope + v, c)
    out = {"kv_a_norm": _dense(src.get(f"{p}self_attn.kv_a_layernorm.weight"), device, dtype),
           "wk_b": _dense(kv_b[:, :nope], device, dtype), "wv_b": _dense(kv_b[:, nope:].transpose(1, 2), device, dtype)}
    if cfg.q_lora_rank:
        out["q_a_norm"] = _dense(src.get(f"{p}self_attn.q_a_layernorm.weight"), device, dtype)
    return out


def _mla_kv_b(lw: LayerWeights) -> torch.Tensor:
    """kv_b_proj.weight [nh * (nope + v), c] back from the per-head halves."""
    return torch.cat((lw.wk_b, lw.wv_b.transpose(1, 2)), dim=1).reshape(-1, lw.wk_b.shape[-1])


def _load_trunk(src, cfg, fmt, quant, device, dtype, qdev, progress) -> TrunkWeights:
    shapes = cfg.attention_shapes()
    fam, h = cfg.traits, cfg.hidden_size
    layers = []

    def opt(key):
        return _dense(src.get(key), device, dtype) if key in src else None

    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        attn = {name: _trunk_linear(src, fmt, f"{p}self_attn.{name}", shape, quant.attn, device, dtype,
                                    qdev) for name, shape in shapes.items()}
        bias = {n: opt(f"{p}self_attn.{n}_proj.bias") if cfg.attn_bias else None for n in "qkvo"}
        if cfg.attn_bias and any(bias[n] is None for n in "qkv"):
            raise CheckpointError(f"config.json says the attention has biases, but {src.folder} has no "
                                  f"{p}self_attn.q_proj.bias")
        moe = i not in cfg.dense_layers
        lw = LayerWeights(
            attn_norm=_dense(src.get(p + "input_layernorm.weight"), device, dtype),
            ffn_norm=_dense(src.get(p + "post_attention_layernorm.weight"), device, dtype),
            wq=attn.get("q_proj"), wk=attn.get("k_proj"), wv=attn.get("v_proj"), wo=attn["o_proj"],
            gate=_dense(src.get(fam.router_key(i)), device, dtype) if moe else None,
            bq=bias["q"], bk=bias["k"], bv=bias["v"], bo=bias["o"] if fam.bias_o else None,
            wq_a=attn.get("q_a_proj"), wq_b=attn.get("q_b_proj"), wkv_a=attn.get("kv_a_proj_with_mqa"),
            **(_mla_extras(src, p, cfg, device, dtype) if cfg.mla else {}))
        if fam.qk_norm != "none":
            lw.q_norm = _dense(src.get(p + "self_attn.q_norm.weight"), device, dtype)
            lw.k_norm = _dense(src.get(p + "self_attn.k_norm.weight"), device, dtype)
        if not moe:
            lw.mlp = _resident_mlp(src, fmt, f"{p}mlp", cfg.dense_intermediate_size, h, quant.attn, device,
                                   dtype, qdev)
        elif cfg.shared_intermediate_size:
            lw.shared = _resident_mlp(src, fmt, f"{p}mlp.{fam.shared_name}", cfg.shared_intermediate_size, h,
                                      quant.attn, device, dtype, qdev)
            if fam.shared_gate:
                lw.shared_gate = _dense(src.get(f"{p}mlp.shared_expert_gate.weight"), device, dtype)
        layers.append(lw)
    embed = _dense(src.get("model.embed_tokens.weight"), device, dtype)
    lm_head = (_dense(src.get("lm_head.weight"), device, dtype) if "lm_head.weight" in src
               else embed if cfg.tie_word_embeddings else _dense(src.get("lm_head.weight"), device, dtype))
    trunk = TrunkWeights(embed=embed, layers=layers, norm=_dense(src.get("model.norm.weight"), device, dtype),
                         lm_head=lm_head)
    check_tensors(_trunk_rows(trunk, cfg), src.where)
    extra = (", dense MLPs" if cfg.dense_layers else "") + (", shared experts" if cfg.shared_intermediate_size else "")
    progress(f"attention, router{extra} and embeddings placed on {device} "
             f"(attention {quant.attn.describe()})")
    return trunk


def _trunk_rows(trunk: TrunkWeights, cfg: ModelConfig):
    """(name, tensor, expected shape) for every trunk tensor, in checkpoint names."""
    V, H, E = cfg.vocab_size, cfg.hidden_size, cfg.num_experts
    yield "model.embed_tokens.weight", trunk.embed, (V, H)
    yield "model.norm.weight", trunk.norm, (H,)
    yield "lm_head.weight", trunk.lm_head, (V, H)
    shapes = cfg.attention_shapes()
    for i, lw in enumerate(trunk.layers):
        p = f"model.layers.{i}."
        yield p + "input_layernorm.weight", lw.attn_norm, (H,)
        yield p + "post_attention_layernorm.weight", lw.ffn_norm, (H,)
        if lw.gate is not None:
            yield cfg.traits.router_key(i), lw.gate, (E, H)
        if cfg.mla:
            yield p + "self_attn.kv_a_layernorm.weight", lw.kv_a_norm, (cfg.kv_lora_rank,)
            yield p + "self_attn.kv_b_proj.weight", lw.wk_b, None       # shape checked when split
            yield p + "self_attn.kv_b_proj.weight", lw.wv_b, None
            if cfg.q_lora_rank:
                yield p + "self_attn.q_a_layernorm.weight", lw.q_a_norm, (cfg.q_lora_rank,)
        for name in shapes:
            w = getattr(lw, ATTN_FIELDS[name])
            if isinstance(w, QWeight):
                for k, v in w.tensors().items():
                    yield f"{p}self_attn.{name}.{k}", v, None
            else:
                yield f"{p}self_attn.{name}.weight", w, shapes[name]


# ---- writing our own format ----------------------------------------------------------------------

class _LayerWriter:
    """A write-through expert "store" for ``save_quantized``: one layer of experts in memory at a time;
    each layer is written to its own shard once its experts are filled, so converting Mixtral needs about
    one layer (0.5 GB) of host memory beyond the trunk, not the whole 16 GB of experts."""

    placement = "streamed to disk"

    def __init__(self, cfg: ModelConfig, layout: ExpertLayout, out: Path, meta: dict, progress: Progress) -> None:
        self.cfg, self.layout, self.out, self.meta, self.progress = cfg, layout, out, meta, progress
        self.buf = torch.zeros((cfg.num_experts, layout.nbytes), dtype=torch.uint8)
        self.weight_map: dict[str, str] = {}

    def load_targets(self):
        fam = self.cfg.traits
        for j, i in enumerate(self.cfg.moe_layers):
            self.buf.zero_()          # padding bytes stay zero: files are byte-for-byte reproducible
            for e in range(self.cfg.num_experts):
                yield j, e, self.buf[e]
            name = f"experts-{i:05d}.safetensors"
            keys = {f"{fam.expert_prefix(i, e)}.packed": self.buf[e] for e in range(self.cfg.num_experts)}
            _write_shard(self.out / name, keys, self.meta)
            self.weight_map.update({k: name for k in keys})
            self.progress(f"wrote {self.out / name}")


def _write_shard(path: Path, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Write under a temporary name, then rename: a crash never leaves a half file behind."""
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path.with_name(path.name + ".part")),
              metadata=meta)
    os.replace(path.with_name(path.name + ".part"), path)


def _check_output(src: Path, out: Path, force: bool) -> None:
    """Refuse an output that would overwrite the source or files the user already has."""
    s, o = src.resolve(), out.resolve()
    if o == s or s in o.parents or o in s.parents:
        raise CheckpointError(f"the output folder {out} is (or is inside, or contains) the source {src}: "
                              f"choose a separate output folder")
    check_new_folder(out, force)


def save_quantized(src_folder: str | os.PathLike, out_folder: str | os.PathLike, quant: QuantConfig,
                   progress: Progress = _noop, force: bool = False) -> Path:
    """Quantize any readable checkpoint into the mixoff format (tokenizer and config copied along).

    Nothing the user has is clobbered: a non-empty output folder is refused unless ``force``; the source is
    never written to; everything is written into a temporary sibling folder that is renamed into place
    only once complete, so a crash or Ctrl-C leaves no half-written output (and, with ``force``, the old
    contents until the new ones are whole)."""

    src_folder, out = Path(src_folder), Path(out_folder)
    _check_output(src_folder, out, force)
    cfg, q, _layout = peek_checkpoint(src_folder, quant)
    try:
        with new_folder(out) as tmp:
            _write_quantized(src_folder, tmp, cfg, quant, q, progress)
    except OSError as e:
        raise CheckpointError(f"cannot write the output folder {out}: {e.strerror or e} — nothing was written "
                              f"(check free disk space and permissions, and that you can write there)") from None
    progress(f"wrote {out}")
    return out


def _write_quantized(src_folder: Path, out: Path, cfg: ModelConfig, quant: QuantConfig, q: QuantConfig,
                     progress: Progress) -> None:
    import shutil

    meta = {"mixoff.format": MIXOFF_FORMAT, "format": "pt", "mixoff.family": cfg.family,
            "mixoff.quant": json.dumps({"attn": spec_dict(q.attn), "experts": spec_dict(q.experts)})}
    writer: list[_LayerWriter] = []

    def make_writer(mcfg, elayout, layout, folder):
        writer.append(_LayerWriter(mcfg, elayout, out, meta, progress))
        return writer[0]

    loaded = load_checkpoint_placed(src_folder, quant, "cpu", torch.float16, make_writer, progress=progress)
    trunk = loaded.trunk
    tensors: dict[str, torch.Tensor] = {"model.embed_tokens.weight": trunk.embed,
                                        "model.norm.weight": trunk.norm, "lm_head.weight": trunk.lm_head}
    def put(prefix: str, w) -> None:
        if isinstance(w, QWeight):
            for k, v in w.tensors().items():
                tensors[f"{prefix}.{k}"] = v
        else:
            tensors[f"{prefix}.weight"] = w

    for i, lw in enumerate(trunk.layers):
        p = f"model.layers.{i}."
        tensors[p + "input_layernorm.weight"] = lw.attn_norm
        tensors[p + "post_attention_layernorm.weight"] = lw.ffn_norm
        if lw.gate is not None:
            tensors[cfg.traits.router_key(i)] = lw.gate
        for name in cfg.attention_shapes():
            put(f"{p}self_attn.{name}", getattr(lw, ATTN_FIELDS[name]))
        if cfg.mla:
            tensors[p + "self_attn.kv_a_layernorm.weight"] = lw.kv_a_norm
            tensors[p + "self_attn.kv_b_proj.weight"] = _mla_kv_b(lw)
            if lw.q_a_norm is not None:
                tensors[p + "self_attn.q_a_layernorm.weight"] = lw.q_a_norm
        for n, b in zip("qkvo", (lw.bq, lw.bk, lw.bv, lw.bo)):
            if b is not None:
                tensors[f"{p}self_attn.{n}_proj.bias"] = b
        if lw.q_norm is not None:
            tensors[p + "self_attn.q_norm.weight"], tensors[p + "self_attn.k_norm.weight"] = lw.q_norm, lw.k_norm
        for prefix, mlp in ((f"{p}mlp", lw.mlp), (f"{p}mlp.{cfg.traits.shared_name}", lw.shared)):
            if mlp is not None:
                for n, w in zip(DENSE_NAMES, mlp):
                    put(f"{prefix}.{n}", w)
        if lw.shared_gate is not None:
            tensors[f"{p}mlp.shared_expert_gate.weight"] = lw.shared_gate
    _write_shard(out / "trunk.safetensors", tensors, meta)
    weight_map = {k: "trunk.safetensors" for k in tensors} | writer[0].weight_map
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"mixoff.format": MIXOFF_FORMAT}, "weight_map": weight_map}, indent=1))
    hf = json.loads((src_folder / "config.json").read_text())
    (out / "config.json").write_text(json.dumps(hf | {"torch_dtype": "float16"}, indent=2))
    for name in os.listdir(src_folder):
        if name.startswith(("tokenizer", "special_tokens", "generation_config", "chat_template")):
            shutil.copy2(src_folder / name, out / name)
    progress(f"wrote {out / 'trunk.safetensors'} and the index")


def spec_dict(s: QuantSpec) -> dict:
    """A QuantSpec as stored in a mixoff checkpoint's ``mixoff.quant`` metadata."""
    return {"bits": s.bits, "group_size": s.group_size, "scale_group": s.scale_group, "quant_zero": s.quant_zero}


# ---- placed loading (exclusive and disk placements) ----------------------------------------------

def peek_checkpoint(folder: str | os.PathLike, quant: QuantConfig) -> tuple[ModelConfig, QuantConfig, str]:
    """(config, the quantization that will be in memory, checkpoint format) without loading any weights, for planning."""
    folder = Path(folder)
    cfg = read_config(folder)
    quant = quant.for_family(cfg.family)
    src = TensorSource(folder)
    try:
        fmt = detect_format(src.keys(), src.metadata)
        if fmt == "mixoff":
            quant = _mixoff_quant(src, cfg)
        elif fmt == "reference":
            quant = _reference_quant(src, cfg)
    finally:
        src.close()
    return cfg, quant, fmt


def load_checkpoint_placed(folder: str | os.PathLike, quant: QuantConfig, device: str | torch.device,
                           dtype: torch.dtype, make_store: Callable, progress: Progress = _noop,
                           quant_device: Optional[str] = None) -> Loaded:
    """``load_checkpoint`` with the expert store built by ``make_store(cfg, expert_layout, checkpoint_format, folder)``.

    The store says what to read and where (``store.load_targets()``: host rows or device slots); a
    disk-backed store reads nothing now. Mixoff blobs are read with positioned reads straight into their
    target, so loading adds no transient copy (and no mapped pages) to the host footprint."""
    from .stores.disk import expert_blob_offsets, pread_into

    folder = Path(folder)
    cfg = read_config(folder)
    quant = quant.for_family(cfg.family)
    src = TensorSource(folder)
    fmt = detect_format(src.keys(), src.metadata)
    device = torch.device(device)
    qdev = quant_device or ("cuda" if device.type == "cuda" else "cpu")
    progress(f"reading a {fmt}-format checkpoint from {folder}")
    fds: dict[Path, int] = {}
    try:
        if fmt == "mixoff":
            quant = _mixoff_quant(src, cfg)
        elif fmt == "reference":
            quant = _reference_quant(src, cfg)
        _check_specs(cfg, quant)
        elayout = ExpertLayout.for_model(cfg, quant.experts, dtype)
        store = make_store(cfg, elayout, fmt, folder)
        trunk = _load_trunk(src, cfg, fmt, quant, device, dtype, qdev, progress)
        f, h = cfg.intermediate_size, cfg.hidden_size
        names = cfg.traits.expert_names
        blobs = expert_blob_offsets(folder, cfg, elayout.nbytes) if fmt == "mixoff" else {}
        bounce = None
        n = 0
        sample = sample_experts(len(cfg.moe_layers), cfg.num_experts)
        for j, e, target in store.load_targets():
            i = cfg.moe_layers[j]
            p = cfg.traits.expert_prefix(i, e)
            if fmt == "mixoff":
                path, off = blobs[(j, e)]
                if path not in fds:
                    fds[path] = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
                if target.device.type == "cpu":
                    pread_into(fds[path], target, off)
                else:
                    if bounce is None:
                        bounce = torch.empty(elayout.nbytes, dtype=torch.uint8)
                    pread_into(fds[path], bounce, off)
                    target.copy_(bounce)
            elif fmt == "reference":
                tensors = {}
                for ours, name, shape in zip(("w1", "w3", "w2"), names, ((f, h), (f, h), (h, f))):
                    for k, v in reference_qweight(src, f"{p}.{name}", shape).tensors().items():
                        tensors[f"{ours}.{k}"] = v
                elayout.fill(target, tensors)
            else:
                ws = []
                for name, shape in zip(names, ((f, h), (f, h), (h, f))):
                    w = src.get(f"{p}.{name}.weight")
                    if tuple(w.shape) != shape:
                        raise CheckpointError(f"{p}.{name}.weight has shape {tuple(w.shape)}, config says {shape}")
                    ws.append(w)
                elayout.fill(target, expert_tensors_from_dense(*ws, quant.experts, qdev))
            if (j, e) in sample:
                stored = "weight" if fmt == "hf" else "W_q"     # the file of the linear a field belongs to
                where = ((lambda name, j=j, e=e: blobs[(j, e)][0]) if fmt == "mixoff" else
                         (lambda name: src.where(f"{name.rsplit('.', 1)[0]}.{stored}")))
                check_tensors(((f"{p}.{k}", v, None) for k, v in elayout.views(target).items()), where)
            n += 1
        progress(f"experts placed ({store.placement}): {n} read now, experts {quant.experts.describe()}")
    finally:
        for fd in fds.values():
            os.close(fd)
        src.close()
    return Loaded(cfg, trunk, store, quant, fmt)
