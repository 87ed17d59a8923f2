"""Files and folders the CLI writes: never over what a user already has without ``--force``, and never half.

A path that holds something is refused with one sentence unless ``force``; the new contents are written
beside it under a temporary name and moved into place only when whole, so a crash or Ctrl-C leaves the old
contents (or nothing) rather than a truncated file.
"""
from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Iterator

from .config import ConfigError


def check_new_file(path: str | os.PathLike, force: bool) -> Path:
    """Refuse a file path that exists (unless ``force``) or names a folder."""
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"{p} is a folder: give a file path to write")
    if p.exists() and not force:
        raise ConfigError(f"{p} exists: choose a new file, or pass --force to replace it")
    return p


def check_new_folder(path: str | os.PathLike, force: bool) -> Path:
    """Refuse a folder path that holds files (unless ``force``) or names a file."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise ConfigError(f"{p} exists and is not a folder: choose another output folder")
    if p.is_dir() and any(p.iterdir()) and not force:
        raise ConfigError(f"the output folder {p} is not empty: choose a new folder, or pass --force to "
                          f"replace its contents")
    return p


@contextlib.contextmanager
def new_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; once the block ends without an error it becomes ``path``."""
    p = Path(path)
    tmp = p.with_name(f".{p.name}.partial-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, p)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def new_folder(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``path``; once the block ends without an error it replaces
    ``path`` (the old contents are removed only after the new ones are in place)."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
        old = None
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, old)
        try:
            os.replace(tmp, out)
        except OSError:
            if old is not None:
                os.replace(old, out)        # put the old contents back
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
