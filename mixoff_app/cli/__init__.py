"""Headless command line: ``python -m mixoff_app {generate,quantize,make-tiny,trace,plan,serve} ...``.

The flags and the ``--json`` output of ``generate`` are a contract that benchmarks and checks rely on:
extend them, never break them. Each subcommand is one module with ``add_parser(subparsers)``; they are
registered explicitly, so a subcommand that fails to import fails the whole CLI instead of vanishing.
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional

from ..checkpoints import CheckpointError
from ..config import ConfigError
from ..hub import ModelNotAvailable
from . import generate, make_tiny, plan, quantize, serve, trace

SUBCOMMANDS = (generate, quantize, make_tiny, trace, plan, serve)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mixoff_app", description="Mixture-of-Experts models with offloaded experts")
    sub = p.add_subparsers(dest="command", required=True)
    for command in SUBCOMMANDS:
        command.add_parser(sub)
    return p


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except (ConfigError, CheckpointError, ModelNotAvailable, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:       # an unwritable or unreadable path the user gave: say which, no traceback
        where = f"{e.filename}: " if e.filename else ""
        print(f"error: {where}{e.strerror or e} — check the path and its permissions", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
