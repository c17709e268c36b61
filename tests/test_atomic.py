"""atomic_path replaces only on success; ensure_writable_dir fails fast on unwritable places."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from search.core.atomic import atomic_path, atomic_paths, ensure_writable_dir
from search.core.errors import OutputPathError


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


def test_atomic_paths_replace_all_together(tmp_path: Path) -> None:
    finals = [tmp_path / "m.json", tmp_path / "m.onnx"]
    finals[0].write_text("old json")
    with atomic_paths(finals) as temps:
        assert [t.parent for t in temps] == [tmp_path, tmp_path]
        for temp, text in zip(temps, ("new json", "new onnx")):
            temp.write_text(text)
        assert finals[0].read_text() == "old json" and not finals[1].exists()
    assert [f.read_text() for f in finals] == ["new json", "new onnx"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json", "m.onnx"]


def test_atomic_paths_writer_failure_changes_nothing(tmp_path: Path) -> None:
    finals = [tmp_path / "m.json", tmp_path / "m.onnx"]
    for final in finals:
        final.write_text("old")
    with pytest.raises(RuntimeError, match="plot"):
        with atomic_paths(finals) as temps:
            temps[1].write_text("new onnx")
            raise RuntimeError("plot failed")
    assert [f.read_text() for f in finals] == ["old", "old"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json", "m.onnx"]


def test_atomic_paths_failed_rename_restores_the_old_set(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    finals = [tmp_path / "m.json", tmp_path / "m.md", tmp_path / "m.onnx"]
    for final in finals:
        final.write_text("old")
    real_replace = os.replace

    def replace(src, dst):  # the ONNX, renamed last, fails to land
        if Path(dst) == finals[2] and ".tmp-" in Path(src).name:
            raise OSError("disk full")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="disk full"):
        with atomic_paths(finals) as temps:
            for temp in temps:
                temp.write_text("new")
    assert [f.read_text() for f in finals] == ["old", "old", "old"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json", "m.md", "m.onnx"]
