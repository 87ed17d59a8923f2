"""No script or helper may shadow an importable module.

``python bench/<script>.py`` puts ``bench/`` first on ``sys.path`` (pytest does the same with ``tests/``), so a
file there named like an installed package replaces it for everything the script imports: ``bench/kernels.py``
once broke transformers (which imports the ``kernels`` package) in every benchmark that loaded a model.
"""
from __future__ import annotations

import importlib.machinery
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = ("bench", "tools", "tests")


def _own_modules(folder: Path) -> set[str]:
    """What a script in ``folder`` can import by a bare name from its own folder: its .py files and packages."""
    names = {p.stem for p in folder.glob("*.py")}
    names |= {p.name for p in folder.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    return names - {"__init__", "conftest"}


def _importable_elsewhere(name: str) -> bool:
    """Whether ``name`` resolves to a module outside this repository (stdlib, builtins, site-packages)."""
    if name in sys.builtin_module_names or name in sys.stdlib_module_names:
        return True
    ours = {str(ROOT)} | {str(ROOT / f) for f in FOLDERS}
    path = [p for p in sys.path if p and str(Path(p).resolve()) not in ours]
    spec = importlib.machinery.PathFinder.find_spec(name, path)
    # A namespace portion (a bare directory) never wins over a real module, so it cannot be shadowed.
    return spec is not None and spec.origin is not None


def test_the_check_sees_a_real_package():
    assert _importable_elsewhere("torch") and _importable_elsewhere("json")
    assert not _importable_elsewhere("decode_costs")


def test_no_script_or_helper_shadows_an_importable_module():
    clashes = [f"{f}/{n}" for f in FOLDERS for n in sorted(_own_modules(ROOT / f)) if _importable_elsewhere(n)]
    assert not clashes, f"these names shadow installed or standard modules for scripts in their folder: {clashes}"
