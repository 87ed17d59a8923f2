"""``ui/launch.py``: the app's flags become an engine config and a bind address; nothing is exposed unasked.

(The launched app itself, page and API on one server, is exercised in test_ui_layout.py, test_api.py and
test_hostile.py.)"""
from __future__ import annotations

import pytest

pytest.importorskip("gradio")

from mixoff_app.config import ConfigError  # noqa: E402
from mixoff_app.ui import launch as launcher  # noqa: E402


def test_cli_flags():
    args = launcher.build_parser().parse_args(
        ["--model", "tiny", "--cache-size", "3", "--attn-bits", "4", "--expert-bits", "none", "--policy", "lfu",
         "--max-new-tokens", "64", "--auth", "ann:secret"])
    said = []
    cfg, reason = launcher.engine_config(args, said.append)
    assert cfg.model == "tiny" and cfg.cache.sizes == (3,) and cfg.cache.policy == "lfu"
    assert cfg.quant.attn.bits == 4 and cfg.quant.experts.bits is None
    assert "tiny" in reason and any("k = 3" in s for s in said)
    assert launcher.parse_auth(args.auth) == ("ann", "secret")
    with pytest.raises(ConfigError):
        launcher.parse_auth("nopassword")
    with pytest.raises(SystemExit):
        launcher.build_parser().parse_args(["--expert-bits", "5"])
    # without --cache-size and without a GPU: a small k so the cache has work to do, and it says so
    said.clear()
    cfg, reason = launcher.engine_config(launcher.build_parser().parse_args(["--device", "cpu"]), said.append)
    assert cfg.model == "tiny" and "no CUDA GPU" in reason
    assert cfg.cache.sizes == (launcher.CPU_DEMO_K,) and any("no CUDA GPU" in s and f"k = {launcher.CPU_DEMO_K}" in s for s in said)


def test_bind_address_is_local_unless_asked():
    assert launcher.bind_address(None, {}) == "127.0.0.1"
    assert launcher.bind_address(None, {"GRADIO_SERVER_NAME": "0.0.0.0"}) == "127.0.0.1"
    assert launcher.bind_address("0.0.0.0", {}) == "0.0.0.0"
    assert launcher.bind_address(None, {"SPACE_ID": "u/s", "GRADIO_SERVER_NAME": "0.0.0.0"}) == "0.0.0.0"
