"""Fashion-MNIST as real labelled images, offline.

The Debian package ``dataset-fashion-mnist`` installs the four gzip'd IDX files of Fashion-MNIST
(Xiao et al. 2017) under :data:`FASHION_MNIST_DIR`. This module parses them and writes a
class-balanced subset as an image folder (``<out>/<class>/<index>.png``), the layout the data loader
reads, so that accuracy kept after pruning is measured on real images with real labels rather than
on noise.

    python -m search.images.fashion_mnist --split train --per-class 100 --out data/fmnist-train
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import struct
import sys
import tempfile
import zlib
from pathlib import Path
from typing import Literal

import numpy as np

from search.core.errors import DataError, OutputPathError, UserError

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
"""Where ``apt-get install dataset-fashion-mnist`` puts the IDX files."""

CLASSES: tuple[str, ...] = (
    "t-shirt_top",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle_boot",
)
"""The ten class names in label order (0..9), made safe to use as folder names."""

Split = Literal["train", "test"]

MANIFEST_NAME = "manifest.json"
"""Written last into a finished folder; its presence with matching settings means the folder is complete."""

_IMAGES_MAGIC = 0x00000803
_LABELS_MAGIC = 0x00000801
_INSTALL_HINT = "install it with `apt-get install -y dataset-fashion-mnist`"
_PREFIX = {"train": "train", "test": "t10k"}


def idx_paths(split: Split, root: Path = FASHION_MNIST_DIR) -> tuple[Path, Path]:
    """Return the (images, labels) IDX paths of ``split`` under ``root``.

    Fashion-MNIST names its test split ``t10k``; this hides that so callers say "test".
    """
    if split not in _PREFIX:
        raise DataError(f"unknown split {split!r}; use 'train' or 'test'")
    prefix = _PREFIX[split]
    return root / f"{prefix}-images-idx3-ubyte.gz", root / f"{prefix}-labels-idx1-ubyte.gz"


def _corrupt(path: Path, why: str) -> DataError:
    return DataError(
        f"Fashion-MNIST file {path} is corrupt ({why}); reinstall it with "
        "`apt-get install --reinstall -y dataset-fashion-mnist`"
    )


def _read_gzip(path: Path) -> bytes:
    """Decompress a whole file, turning every way it can fail into a DataError that names the fix."""
    if not path.is_file():
        raise DataError(f"Fashion-MNIST file {path} is missing; {_INSTALL_HINT}")
    try:
        with gzip.open(path, "rb") as handle:
            return handle.read()
    except (OSError, EOFError, zlib.error) as exc:
        raise _corrupt(path, f"not a readable gzip file: {exc}") from exc


def read_idx(images_gz: Path, labels_gz: Path) -> tuple[np.ndarray, np.ndarray]:
    """Parse a pair of gzip'd IDX files into images and labels.

    The IDX format is a big-endian header (magic ``0x0803`` for rank-3 uint8 images, ``0x0801``
    for rank-1 uint8 labels, then one uint32 per dimension) followed by the raw bytes. Every header
    field is checked against the file length so a truncated download is reported, not reshaped
    into garbage.

    Args:
        images_gz: The ``*-images-idx3-ubyte.gz`` file.
        labels_gz: The matching ``*-labels-idx1-ubyte.gz`` file.

    Returns:
        ``(images, labels)``: uint8 arrays of shape (N, rows, cols) and (N,), labels in 0..9.

    Raises:
        DataError: A file is missing, not gzip, has the wrong magic or length, the two counts
            differ, or a label is out of range.
    """
    images_gz, labels_gz = Path(images_gz), Path(labels_gz)
    raw_images = _read_gzip(images_gz)
    raw_labels = _read_gzip(labels_gz)

    if len(raw_images) < 16:
        raise _corrupt(images_gz, f"{len(raw_images)} bytes is shorter than the IDX header")
    magic, count, rows, cols = struct.unpack(">IIII", raw_images[:16])
    if magic != _IMAGES_MAGIC:
        raise _corrupt(images_gz, f"magic {magic:#010x}, expected {_IMAGES_MAGIC:#010x} for idx3 images")
    if len(raw_images) != 16 + count * rows * cols:
        raise _corrupt(
            images_gz, f"header says {count}x{rows}x{cols} pixels but the body has {len(raw_images) - 16} bytes"
        )

    if len(raw_labels) < 8:
        raise _corrupt(labels_gz, f"{len(raw_labels)} bytes is shorter than the IDX header")
    magic, label_count = struct.unpack(">II", raw_labels[:8])
    if magic != _LABELS_MAGIC:
        raise _corrupt(labels_gz, f"magic {magic:#010x}, expected {_LABELS_MAGIC:#010x} for idx1 labels")
    if len(raw_labels) != 8 + label_count:
        raise _corrupt(labels_gz, f"header says {label_count} labels but the body has {len(raw_labels) - 8} bytes")

    if count != label_count:
        raise DataError(
            f"{images_gz} holds {count} images but {labels_gz} holds {label_count} labels; "
            "pass the images and labels files of the same split"
        )
    images = np.frombuffer(raw_images, dtype=np.uint8, offset=16).reshape(count, rows, cols).copy()
    labels = np.frombuffer(raw_labels, dtype=np.uint8, offset=8).copy()
    if count and int(labels.max()) >= len(CLASSES):
        raise _corrupt(labels_gz, f"label {int(labels.max())} is outside 0..{len(CLASSES) - 1}")
    return images, labels


def _manifest(split: Split, per_class: int, seed: int) -> dict[str, object]:
    return {
        "dataset": "fashion-mnist",
        "split": split,
        "per_class": per_class,
        "seed": seed,
        "count": per_class * len(CLASSES),
        "classes": list(CLASSES),
    }


def _read_manifest(out_dir: Path) -> dict[str, object] | None:
    try:
        data = json.loads((out_dir / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("dataset") == "fashion-mnist" else None


def _is_complete(out_dir: Path, expected: dict[str, object]) -> bool:
    """True when ``out_dir`` holds a finished folder written with exactly these settings."""
    if _read_manifest(out_dir) != expected:
        return False
    written = sum(1 for _ in out_dir.glob("*/*.png"))
    return written == expected["count"]


def select_indices(labels: np.ndarray, per_class: int, seed: int = 0) -> dict[int, np.ndarray]:
    """Choose ``per_class`` distinct indices of every class with a seeded RNG.

    Returns a map from label to sorted indices into ``labels``; the same labels, count and seed
    always give the same subset, so folders written on different machines agree.
    """
    rng = np.random.default_rng(seed)
    chosen: dict[int, np.ndarray] = {}
    for label in range(len(CLASSES)):
        pool = np.flatnonzero(labels == label)
        if per_class > len(pool):
            raise DataError(
                f"--per-class {per_class} is more than the {len(pool)} images of class "
                f"'{CLASSES[label]}'; pass --per-class {len(pool)} or less"
            )
        chosen[label] = np.sort(rng.choice(pool, size=per_class, replace=False))
    return chosen


def _write_json_atomic(path: Path, payload: dict[str, object]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(payload, handle, indent=2)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write_pngs(
    images: np.ndarray, chosen: dict[int, np.ndarray], dest: Path, description: str, show_progress: bool
) -> None:
    from PIL import Image
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    total = sum(len(v) for v in chosen.values())
    columns = (
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, disable=not show_progress, transient=False) as progress:
        task = progress.add_task(description, total=total)
        for label, indices in chosen.items():
            class_dir = dest / CLASSES[label]
            class_dir.mkdir()
            for index in indices:
                Image.fromarray(images[index]).save(class_dir / f"{int(index):05d}.png", optimize=False)
                progress.advance(task)


def write_image_folder(
    split: Split,
    out_dir: Path,
    per_class: int,
    seed: int = 0,
    *,
    root: Path = FASHION_MNIST_DIR,
    show_progress: bool = True,
) -> Path:
    """Write a class-balanced Fashion-MNIST subset as ``out_dir/<class>/<index>.png``.

    ``<index>`` is the image's position in the split's IDX file, so every PNG can be traced back to
    its source. Images are 28x28 greyscale; the loader converts them to RGB.

    The folder is built in a hidden temporary sibling and renamed into place only once every PNG
    and the manifest are written, so an interrupted run never leaves a folder that looks complete.
    If ``out_dir`` already holds a complete folder with the same split, per_class and seed, nothing
    is rewritten. A folder this function wrote earlier with other settings is replaced; any other
    non-empty ``out_dir`` is refused rather than deleted.

    Args:
        split: ``"train"`` (60k images) or ``"test"`` (10k images).
        out_dir: The folder to create.
        per_class: Images per class; at most 6000 for train and 1000 for test.
        seed: Seed of the RNG that picks the images.
        root: Folder holding the IDX files (the Debian package's by default).
        show_progress: Show a rich progress bar while writing.

    Returns:
        ``out_dir``, resolved to an absolute path.

    Raises:
        DataError: The IDX files are missing or corrupt, or ``per_class`` or ``split`` is invalid.
        OutputPathError: ``out_dir`` is a file, a foreign non-empty folder, or cannot be written.
    """
    if isinstance(per_class, bool) or not isinstance(per_class, (int, np.integer)) or per_class < 1:
        raise DataError(f"--per-class must be a positive integer, got {per_class!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise DataError(f"--seed must be a non-negative integer, got {seed!r}")
    per_class, seed = int(per_class), int(seed)
    out_dir = Path(out_dir).expanduser().absolute()
    expected = _manifest(split, per_class, seed)
    images_gz, labels_gz = idx_paths(split, root)
    if _is_complete(out_dir, expected):
        return out_dir
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputPathError(f"{out_dir} is a file; pass a folder path to --out")
    if out_dir.is_dir() and any(out_dir.iterdir()) and _read_manifest(out_dir) is None:
        raise OutputPathError(
            f"{out_dir} is not empty and was not written by this tool; pass a new or empty folder to --out"
        )

    images, labels = read_idx(images_gz, labels_gz)
    chosen = select_indices(labels, per_class, seed)

    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp-"))
    except OSError as exc:
        raise OutputPathError(f"cannot create {out_dir} ({exc}); pass a writable folder to --out") from exc

    retired: Path | None = None
    try:
        _write_pngs(images, chosen, staging, f"fashion-mnist {split} -> {out_dir.name}", show_progress)
        _write_json_atomic(staging / MANIFEST_NAME, expected)
        if out_dir.exists():
            if _is_complete(out_dir, expected):
                return out_dir
            retired = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.old-"))
            os.replace(out_dir, retired / "previous")
        try:
            os.replace(staging, out_dir)
        except OSError:
            if retired is not None and not out_dir.exists():
                os.replace(retired / "previous", out_dir)
            raise
    except OSError as exc:
        if _is_complete(out_dir, expected):
            return out_dir
        raise OutputPathError(f"cannot write {out_dir} ({exc}); pass a writable folder to --out") from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if retired is not None:
            shutil.rmtree(retired, ignore_errors=True)
    return out_dir


def main(argv: list[str] | None = None) -> int:
    """Command-line entry: write the folder and print its path."""
    parser = argparse.ArgumentParser(
        prog="python -m search.images.fashion_mnist",
        description="Write a class-balanced Fashion-MNIST subset as <out>/<class>/<index>.png.",
    )
    parser.add_argument("--split", choices=("train", "test"), default="train")
    parser.add_argument("--per-class", type=int, required=True, help="images per class")
    parser.add_argument("--out", type=Path, required=True, help="folder to create")
    parser.add_argument("--seed", type=int, default=0, help="seed of the RNG that picks the images")
    parser.add_argument("--root", type=Path, default=FASHION_MNIST_DIR, help="folder holding the IDX files")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        path = write_image_folder(
            args.split, args.out, args.per_class, args.seed, root=args.root, show_progress=not args.quiet
        )
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
