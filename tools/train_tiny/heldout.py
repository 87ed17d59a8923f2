"""The held-out chat turns that ship next to the weights (docstrings differ between Python versions, so the
split is saved rather than rebuilt), and reading them back tokenized as training did."""
from __future__ import annotations

import json
from pathlib import Path

from tools.train_tiny.checkpoint import ASSET_DIR
from tools.train_tiny.corpus import Example
from tools.train_tiny.encoding import encode_all

HELDOUT_FILE = "heldout.jsonl"
SCOPE_HELDOUT_FILE = "heldout_scope.jsonl"
PHRASING_HELDOUT_FILE = "heldout_phrasing.jsonl"


def write_heldout(out: Path | str, held: list[Example], name: str = HELDOUT_FILE) -> None:
    """The held-out chat turns ship next to the weights: docstrings differ between Python versions."""
    lines = [json.dumps({"key": e.key, "question": e.question, "answer": e.answer}, ensure_ascii=False) for e in held]
    (Path(out) / name).write_text("\n".join(lines) + "\n", encoding="utf-8")


def read_heldout(path: Path | str = ASSET_DIR, name: str = HELDOUT_FILE) -> list[Example]:
    rows = (Path(path) / name).read_text(encoding="utf-8").splitlines()
    return [Example(**json.loads(r)) for r in rows if r.strip()]


def heldout_encoded(path: Path | str = ASSET_DIR, tok=None, limit: int | None = None, name: str = HELDOUT_FILE):
    """The shipped held-out split, tokenized as training did, and the training report."""
    rep = json.loads((Path(path) / "train_report.json").read_text())
    enc = encode_all(tok, read_heldout(path, name), rep["hyperparameters"]["context"])
    return enc[:limit] if limit else enc, rep
