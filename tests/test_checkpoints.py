"""Loader input checks: every broken checkpoint gives an error that names the file or key."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from mixoff_app.checkpoints import CheckpointError, detect_format, load_checkpoint
from mixoff_app.config import NO_QUANT, ConfigError, QuantConfig
from mixoff_app.hub import ModelNotAvailable, resolve


def sharded_copy(tiny_dir, dst, n=3):
    """The tiny checkpoint split into n shards with an index, as hub checkpoints come."""
    dst.mkdir()
    for f in tiny_dir.iterdir():
        if f.name != "model.safetensors":
            shutil.copy2(f, dst / f.name)
    sd = load_file(str(tiny_dir / "model.safetensors"))
    keys = sorted(sd)
    weight_map = {}
    for i in range(n):
        name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        part = {k: sd[k] for k in keys[i::n]}
        save_file(part, str(dst / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    (dst / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return dst, weight_map


def test_sharded_checkpoint_loads_like_the_single_file(tiny_dir, tmp_path):
    folder, _ = sharded_copy(tiny_dir, tmp_path / "sharded")
    a = load_checkpoint(tiny_dir, NO_QUANT, "cpu", torch.float32)
    b = load_checkpoint(folder, NO_QUANT, "cpu", torch.float32)
    assert torch.equal(a.store.buffer(2, 5), b.store.buffer(2, 5))
    assert torch.equal(a.trunk.layers[1].wq, b.trunk.layers[1].wq)


def test_missing_shard_names_the_file(tiny_dir, tmp_path):
    folder, wm = sharded_copy(tiny_dir, tmp_path / "sharded")
    gone = sorted(set(wm.values()))[1]
    (folder / gone).unlink()
    with pytest.raises(CheckpointError, match=f"missing checkpoint shard .*{gone}"):
        load_checkpoint(folder, NO_QUANT, "cpu", torch.float32)


def edited_copy(tiny_dir, folder, edit):
    """A copy of the tiny checkpoint whose state dict went through ``edit`` (in place)."""
    shutil.copytree(tiny_dir, folder)
    sd = load_file(str(folder / "model.safetensors"))
    edit(sd)
    save_file(sd, str(folder / "model.safetensors"))
    return folder


def test_missing_key_names_the_key(tiny_dir, tmp_path):
    folder = edited_copy(tiny_dir, tmp_path / "nokey",
                         lambda sd: sd.pop("model.layers.2.block_sparse_moe.experts.3.w2.weight"))
    with pytest.raises(CheckpointError, match=r"model\.layers\.2\.block_sparse_moe\.experts\.3\.w2\.weight"):
        load_checkpoint(folder, NO_QUANT, "cpu", torch.float32)


def test_wrong_shape_names_the_key(tiny_dir, tmp_path):
    folder = edited_copy(tiny_dir, tmp_path / "shape",
                         lambda sd: sd.update({"model.layers.0.self_attn.q_proj.weight": torch.zeros(3, 3)}))
    with pytest.raises(CheckpointError, match=r"q_proj\.weight has shape \(3, 3\)"):
        load_checkpoint(folder, NO_QUANT, "cpu", torch.float32)


def test_corrupt_file_names_the_file(tiny_dir, tmp_path):
    folder = tmp_path / "corrupt"
    shutil.copytree(tiny_dir, folder)
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors.*corrupt or incomplete"):
        load_checkpoint(folder, NO_QUANT, "cpu", torch.float32)
    (folder / "model.safetensors").write_bytes(b"\x00" * 100)
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_checkpoint(folder, NO_QUANT, "cpu", torch.float32)


def test_not_a_supported_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="expected keys like"):
        detect_format(["model.embed_tokens.weight", "lm_head.weight"])
    with pytest.raises(CheckpointError, match="fused"):
        detect_format(["model.layers.0.mlp.experts.gate_up_proj"])
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    save_file({"x": torch.zeros(1)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="config.json: model_type is 'llama'; mixoff runs these MoE families: mixtral, qwen2_moe"):
        load_checkpoint(tmp_path, NO_QUANT, "cpu", torch.float32)


def test_folder_without_weights(tmp_path, tiny_dir):
    shutil.copy2(tiny_dir / "config.json", tmp_path / "config.json")
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_checkpoint(tmp_path, NO_QUANT, "cpu", torch.float32)


def test_group_size_that_does_not_divide_is_refused(tiny_dir):
    from mixoff_app.config import QuantSpec
    bad = QuantConfig(attn=QuantSpec(bits=4, group_size=24), experts=QuantSpec(bits=2, group_size=16))
    with pytest.raises(ConfigError, match="attention group size 24 does not divide"):
        load_checkpoint(tiny_dir, bad, "cpu", torch.float32)


def test_hub_id_offline_says_what_to_do(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(ModelNotAvailable, match="not in the local hub cache.*--model tiny"):
        resolve("someone/not-downloaded-model", lambda m: None)
    with pytest.raises(ModelNotAvailable, match="neither a local folder"):
        resolve("no-such-thing", lambda m: None)


def test_a_model_that_cannot_fit_is_refused_before_its_weights_are_read(tiny_dir, tmp_path):
    """The plan is made from config.json alone (for a hub id: before any weight is downloaded)."""
    from mixoff_app.config import CacheConfig, EngineConfig
    from mixoff_app.engine import Engine
    folder = tmp_path / "noweights"
    folder.mkdir()
    shutil.copy2(tiny_dir / "config.json", folder / "config.json")     # no weights at all
    with pytest.raises(ConfigError, match="does not fit"):
        Engine.load(EngineConfig(model=str(folder), device="cpu", cache=CacheConfig(sizes=(2,)),
                                 vram_budget=1024, ram_budget=1024))
    # The user's k is what is checked: a budget that k = 1 fits refuses k = 8 before anything is read.
    from mixoff_app.checkpoints import read_config
    from mixoff_app.plan import plan_for
    cfg, q = read_config(folder), QuantConfig()
    need = {k: plan_for(cfg, q.for_family(cfg.family), 512, device="cpu", sizes=(k,) * cfg.num_moe_layers,
                        ram_bytes=1 << 40).device_total for k in (1, 8)}
    budget = (need[1] + need[8]) // 2
    with pytest.raises(ConfigError, match="does not fit"):
        Engine.load(EngineConfig(model=str(folder), device="cpu", cache=CacheConfig(sizes=(8,)), max_context=512,
                                 quant=q, vram_budget=budget))
    with pytest.raises(CheckpointError, match="no model.safetensors"):     # k = 1 fits: then the missing weights
        Engine.load(EngineConfig(model=str(folder), device="cpu", cache=CacheConfig(sizes=(1,)), max_context=512,
                                 quant=q, vram_budget=budget))
