"""atomic_path replaces only on success; ensure_writable_dir fails fast on unwritable places."""
from __future__ import annotations

from pathlib import Path

import pytest

from search.atomic import atomic_path, ensure_writable_dir
from search.errors import OutputPathError


def test_replaces_on_success(tmp_path: Path) -> None:
    final = tmp_path / "model.onnx"
    final.write_text("old")
    with atomic_path(final) as temp:
        assert temp.parent == final.parent
        assert temp.name.startswith(".model.onnx.tmp-")
        temp.write_text("new")
        assert final.read_text() == "old"
    assert final.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


def test_exception_leaves_old_file_and_no_temp(tmp_path: Path) -> None:
    final = tmp_path / "model.onnx"
    final.write_text("old")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_path(final) as temp:
            temp.write_text("half")
            raise RuntimeError("boom")
    assert final.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


def test_exception_before_writing_creates_nothing(tmp_path: Path) -> None:
    final = tmp_path / "model.onnx"
    with pytest.raises(KeyError):
        with atomic_path(final):
            raise KeyError("x")
    assert list(tmp_path.iterdir()) == []


def test_ensure_writable_dir_creates_parents(tmp_path: Path) -> None:
    out = tmp_path / "a" / "b" / "model.onnx"
    ensure_writable_dir(out)
    assert out.parent.is_dir()
    assert list(out.parent.iterdir()) == []  # probe removed


def test_ensure_writable_dir_parent_is_a_file(tmp_path: Path) -> None:
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    with pytest.raises(OutputPathError, match="cannot write .*file.txt.*choose another -o path"):
        ensure_writable_dir(blocker / "out.onnx")


def test_ensure_writable_dir_under_proc() -> None:
    with pytest.raises(OutputPathError):
        ensure_writable_dir(Path("/proc/prune-export-test/out.onnx"))


def test_ensure_writable_dir_target_is_directory(tmp_path: Path) -> None:
    with pytest.raises(OutputPathError, match="is a directory"):
        ensure_writable_dir(tmp_path)
