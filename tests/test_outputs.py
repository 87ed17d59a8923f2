"""What the CLI writes never replaces a user's file or folder without --force, and is never left half-written."""
from __future__ import annotations

import pytest

from mixoff_app.config import ConfigError
from mixoff_app.outputs import check_new_file, check_new_folder, new_file, new_folder

from helpers import cli_here as run


def test_make_tiny_refuses_a_folder_with_files_unless_forced(tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    rc, err = run(capsys, "make-tiny", out)
    assert rc == 2 and "not empty" in err and "--force" in err and "Traceback" not in err
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    assert run(capsys, "make-tiny", out, "--force")[0] == 0
    assert (out / "model.safetensors").exists() and not (out / "notes.txt").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no temporary folder left behind"
    assert run(capsys, "make-tiny", tmp_path / "new")[0] == 0          # a new or empty folder needs no flag


def test_trace_synthetic_refuses_an_existing_file_unless_forced(tmp_path, capsys):
    out = tmp_path / "t.jsonl"
    out.write_text("my own notes\n")
    rc, err = run(capsys, "trace", "synthetic", out, "--tokens", "4", "--layers", "2")
    assert rc == 2 and f"{out} exists" in err and "--force" in err
    assert out.read_text() == "my own notes\n"
    assert run(capsys, "trace", "synthetic", out, "--tokens", "4", "--layers", "2", "--force")[0] == 0
    assert out.read_text().startswith('{"header"')


def test_trace_record_refuses_before_it_generates(tmp_path, capsys, monkeypatch):
    from mixoff_app.cli import trace as trace_cli
    out = tmp_path / "r.jsonl"
    out.write_text("mine\n")
    monkeypatch.setattr(trace_cli, "engine_generate", lambda args: pytest.fail("generated before refusing"))
    rc, err = run(capsys, "trace", "record", "--prompt", "hi", out)
    assert rc == 2 and "exists" in err and out.read_text() == "mine\n"


def test_new_file_and_folder_leave_the_old_contents_when_writing_fails(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("old")
    with pytest.raises(RuntimeError):
        with new_file(f) as tmp:
            tmp.write_text("half")
            raise RuntimeError("disk full")
    assert f.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]
    d = tmp_path / "d"
    d.mkdir()
    (d / "x").write_text("old")
    with pytest.raises(RuntimeError):
        with new_folder(d) as tmp:
            (tmp / "y").write_text("half")
            raise RuntimeError("interrupted")
    assert [p.name for p in d.iterdir()] == ["x"] and sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "d"]
    with new_folder(d) as tmp:
        (tmp / "y").write_text("new")
    assert [p.name for p in d.iterdir()] == ["y"]


def test_the_checks_name_the_problem(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(ConfigError, match="is a folder"):
        check_new_file(tmp_path, force=True)
    with pytest.raises(ConfigError, match="not a folder"):
        check_new_folder(tmp_path / "f", force=True)
    assert check_new_file(tmp_path / "f", force=True) == tmp_path / "f"
