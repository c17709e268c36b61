"""Write output files whole or not at all.

Every file the project writes goes through :func:`atomic_path`: the writer fills a temporary file
in the destination's directory, and only a clean exit renames it over the destination. A crash,
a failed check or Ctrl-C therefore never leaves a half-written model where a user expects one.
"""
from __future__ import annotations

import os
import secrets
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

from search.core.errors import OutputPathError


def _sibling(final: Path, kind: str) -> Path:
    """A hidden, randomly named path next to ``final``; same directory, so rename is atomic."""
    return final.parent / f".{final.name}.{kind}-{secrets.token_hex(6)}"


@contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """Yield a temporary path to write; on success rename it to ``final``, on error delete it.

    The temporary file is not created here, so the writer creates it with the usual permissions.
    The directory of ``final`` must exist (see :func:`ensure_writable_dir`).
    """
    final = Path(final)
    temp = _sibling(final, "tmp")
    try:
        yield temp
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    try:
        os.replace(temp, final)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_paths(finals: Sequence[Path]) -> Iterator[list[Path]]:
    """:func:`atomic_path` for files that belong together: all of them are replaced, or none.

    Yields one temporary path per final path, in the same order. Only once every writer finished
    are they renamed into place, in the given order: put last the file whose presence tells a
    reader the set is complete (the ONNX model, after its report). Old files are first moved
    aside; if any rename fails, the new files are removed and the old ones come back, so a
    reader never finds a new file beside a stale one. On any error the temporaries are removed.
    """
    finals = [Path(f) for f in finals]
    temps = [_sibling(f, "tmp") for f in finals]
    try:
        yield temps
        _replace_together(temps, finals)
    finally:
        for temp in temps:
            temp.unlink(missing_ok=True)


def _replace_together(temps: list[Path], finals: list[Path]) -> None:
    """Rename each temp onto its final path; on failure restore the finals as they were."""
    backups: list[tuple[Path, Path]] = []
    placed: list[Path] = []
    try:
        for final in finals:
            if final.exists():
                backup = _sibling(final, "old")
                os.replace(final, backup)
                backups.append((backup, final))
        for temp, final in zip(temps, finals):
            os.replace(temp, final)
            placed.append(final)
    except BaseException:
        for final in placed:
            final.unlink(missing_ok=True)
        for backup, final in backups:
            os.replace(backup, final)
        raise
    for backup, _ in backups:
        backup.unlink(missing_ok=True)


def ensure_writable_dir(path: Path) -> None:
    """Create the directory that will hold the file ``path`` and prove it is writable.

    Called before long work so that a bad ``-o`` fails in a second, not after the search. The
    proof is creating and deleting a probe file, since permission bits do not bind root and say
    nothing about read-only mounts.

    Raises:
        OutputPathError: the directory cannot be created or written, or ``path`` is a directory.
    """
    path = Path(path)
    parent = path.parent
    if path.is_dir():
        raise OutputPathError(f"cannot write {path}: it is a directory; choose another -o path")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        probe = _sibling(path, "probe")
        with open(probe, "xb"):
            pass
        probe.unlink()
    except OSError as err:
        reason = err.strerror or str(err)
        raise OutputPathError(f"cannot write {parent}: {reason}; choose another -o path") from err
