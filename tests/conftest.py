"""Shared fixtures: the random tiny Mixtral, built once per test session, offline."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

torch.set_num_threads(min(2, torch.get_num_threads()))


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped without one)")
    config.addinivalue_line("markers", "browser: drives headless chromium")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """The deterministic random tiny model (seed 0) in Hugging Face format."""
    from mixoff_app.tiny import make_tiny
    return make_tiny(tmp_path_factory.mktemp("tiny") / "tiny", seed=0)


@pytest.fixture(scope="session")
def hf_model(tiny_dir):
    """transformers' MixtralForCausalLM on the same checkpoint: the reference."""
    from transformers import MixtralForCausalLM
    m = MixtralForCausalLM.from_pretrained(str(tiny_dir), dtype=torch.float32)
    m.eval()
    return m


@pytest.fixture(scope="session")
def tokenizer(tiny_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(tiny_dir))
