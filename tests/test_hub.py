"""Turning ``--model`` into a folder: the shipped demo model, local folders, bad names, and the hub in
offline mode (huggingface_hub's own offline path over a hub cache this test writes, never the network)."""
from __future__ import annotations

import json

import pytest
from huggingface_hub import constants

from mixoff_app.config import ConfigError
from mixoff_app.hub import (ASSETS, BASE_INSTRUCT, TOKENIZER_FALLBACK, ModelNotAvailable, resolve,
                            tokenizer_source)

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty hub cache, offline: what a machine without network sees."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    return tmp_path / "hub"


def cache_repo(cache, repo_id: str, files: dict[str, str]):
    """Lay a repo out as huggingface_hub's cache does (refs/main -> snapshots/<commit>/...)."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    snap = repo / "snapshots" / COMMIT
    snap.mkdir(parents=True)
    for name, text in files.items():
        (snap / name).write_text(text)
    return snap


def test_tiny_is_the_shipped_demo_model():
    r = resolve("tiny", progress=lambda m: None)
    assert r.path == ASSETS / "tiny-chat" and (r.path / "model.safetensors").exists()
    assert "embedded demo model" in r.name and r.repo_id is None


def test_local_folders_and_what_is_not_a_model(tmp_path):
    seen = []
    r = resolve(str(tmp_path), progress=seen.append, precheck=seen.append)
    assert r.path == tmp_path and r.name == tmp_path.name and r.repo_id is None
    assert seen == []                                    # no config.json: nothing to check yet
    (tmp_path / "config.json").write_text("{}")
    resolve(str(tmp_path), progress=seen.append, precheck=seen.append)
    assert seen == [tmp_path]
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"")
    with pytest.raises(ModelNotAvailable, match="is a file; pass the checkpoint folder that holds config.json"):
        resolve(str(f))
    for bad in ("no-such-folder", "a/b/c", "./missing/x"):
        with pytest.raises(ModelNotAvailable, match="neither a local folder, 'tiny', nor a hub repo id"):
            resolve(bad)


def test_offline_and_not_cached_says_what_to_do(hub_cache):
    with pytest.raises(ModelNotAvailable) as e:
        resolve("mixoff-test/absent", progress=lambda m: None)
    msg = str(e.value)
    assert msg.startswith("mixoff-test/absent is not in the local hub cache and the hub cannot be reached "
                          "(HF_HUB_OFFLINE is set)")
    assert "pass a local folder with --model, or use --model tiny" in msg


def test_offline_from_the_hub_cache(hub_cache):
    snap = cache_repo(hub_cache, "mixoff-test/cached", {"config.json": json.dumps({"model_type": "mixtral"})})
    checked = []
    r = resolve("mixoff-test/cached", progress=lambda m: None, precheck=checked.append)
    assert r.path == snap and r.name == r.repo_id == "mixoff-test/cached"
    assert checked == [snap]                             # the config is checked before any weight is asked for

    def refuse(folder):
        raise ConfigError("mixoff-test/cached does not fit: needs more")

    with pytest.raises(ConfigError, match="does not fit"):
        resolve("mixoff-test/cached", progress=lambda m: None, precheck=refuse)


def test_tokenizer_comes_from_the_folder_else_the_base_model(hub_cache, tmp_path):
    with_tok = tmp_path / "with"
    with_tok.mkdir()
    (with_tok / "tokenizer.json").write_text("{}")
    assert tokenizer_source(with_tok, None, None) == with_tok
    assert tokenizer_source(tmp_path, None, str(with_tok)) == with_tok        # --tokenizer wins
    # No tokenizer in the folder: the base model's, from the hub cache when offline.
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text(json.dumps({"_name_or_path": "mixoff-test/base"}))
    base = cache_repo(hub_cache, "mixoff-test/base", {"tokenizer.json": "{}"})
    said = []
    assert tokenizer_source(bare, None, None, said.append) == base
    assert said == ["the checkpoint has no tokenizer; using mixoff-test/base's"]
    # The reference checkpoint ships no tokenizer: it falls back to the instruct model's, which is not cached here.
    (repo_id, fallback), = TOKENIZER_FALLBACK.items()
    assert fallback == BASE_INSTRUCT
    with pytest.raises(ModelNotAvailable, match=f"{BASE_INSTRUCT} is not in the local hub cache"):
        tokenizer_source(bare, repo_id, None, said.append)
