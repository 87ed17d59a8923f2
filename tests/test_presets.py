"""The one table of model shapes: exact names and hub ids only, and the shapes of the models we ship and build."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from mixoff_app.config import ConfigError, ModelConfig
from mixoff_app.presets import PRESETS, from_name, preset_name

ROOT = Path(__file__).resolve().parents[1]


def test_hub_ids_and_names_are_matched_exactly():
    assert from_name("Mixtral-8x7B") is PRESETS["mixtral-8x7b"]
    assert from_name("mistralai/Mixtral-8x7B-Instruct-v0.1") is PRESETS["mixtral-8x7b"]
    assert preset_name("mistralai/Mixtral-8x22B-v0.1") == "mixtral-8x22b"
    for guess in ("someone/mixtral-finetune", "mixtral", "8x7b", "tiny-chat"):
        assert preset_name(guess) is None
    with pytest.raises(ConfigError, match="no preset named 'mixtral'"):
        from_name("mixtral")


def test_tiny_is_the_shipped_demo_model():
    cfg = json.loads((ROOT / "assets" / "tiny-chat" / "config.json").read_text())
    assert ModelConfig.from_hf(cfg) == from_name("tiny")


def test_tiny_random_is_what_make_tiny_writes(tiny_dir):
    cfg = ModelConfig.from_hf(json.loads((tiny_dir / "config.json").read_text()))
    assert cfg == from_name("tiny-random")
