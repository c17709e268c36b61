"""Fashion-MNIST from the Debian package: IDX parsing, the balanced image folder, and its errors."""
from __future__ import annotations

import gzip
import json
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from search.core.errors import DataError, OutputPathError
from search.images.fashion_mnist import (
    CLASSES,
    FASHION_MNIST_DIR,
    MANIFEST_NAME,
    idx_paths,
    main,
    read_idx,
    write_image_folder,
)

needs_debian_data = pytest.mark.skipif(
    not FASHION_MNIST_DIR.is_dir(),
    reason=f"{FASHION_MNIST_DIR} is absent; run `apt-get install -y dataset-fashion-mnist`",
)


def _write_idx(root: Path, split: str, images: np.ndarray, labels: np.ndarray) -> None:
    """Write a tiny IDX pair in the Debian package's layout, so folder tests need no real data."""
    images_gz, labels_gz = idx_paths(split, root)  # type: ignore[arg-type]
    root.mkdir(parents=True, exist_ok=True)
    count, rows, cols = images.shape
    with gzip.open(images_gz, "wb") as handle:
        handle.write(struct.pack(">IIII", 0x803, count, rows, cols) + images.astype(np.uint8).tobytes())
    with gzip.open(labels_gz, "wb") as handle:
        handle.write(struct.pack(">II", 0x801, count) + labels.astype(np.uint8).tobytes())


@pytest.fixture()
def tiny_root(tmp_path: Path) -> Path:
    """Six 28x28 images per class for the test split; pixel value encodes the source index."""
    labels = np.tile(np.arange(len(CLASSES)), 6)
    images = np.broadcast_to(np.arange(labels.size, dtype=np.uint8)[:, None, None], (labels.size, 28, 28))
    root = tmp_path / "idx"
    _write_idx(root, "test", np.ascontiguousarray(images), labels)
    return root


@needs_debian_data
@pytest.mark.parametrize(("split", "count"), [("train", 60_000), ("test", 10_000)])
def test_read_idx_reads_the_debian_package(split: str, count: int) -> None:
    images, labels = read_idx(*idx_paths(split))  # type: ignore[arg-type]
    assert images.shape == (count, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (count,) and labels.dtype == np.uint8
    assert np.array_equal(np.unique(labels), np.arange(10))
    assert np.bincount(labels).tolist() == [count // 10] * 10


@needs_debian_data
def test_real_folder_is_balanced_and_traceable(tmp_path: Path) -> None:
    out = write_image_folder("test", tmp_path / "fm", per_class=2, seed=3, show_progress=False)
    images, labels = read_idx(*idx_paths("test"))
    pngs = sorted(out.glob("*/*.png"))
    assert len(pngs) == 20
    for png in pngs:
        index = int(png.stem)
        assert CLASSES[labels[index]] == png.parent.name
        assert np.array_equal(np.asarray(Image.open(png)), images[index])


def test_folder_has_per_class_files_in_every_class(tiny_root: Path, tmp_path: Path) -> None:
    out = write_image_folder("test", tmp_path / "out", per_class=4, root=tiny_root, show_progress=False)
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == sorted(CLASSES)
    for name in CLASSES:
        assert len(list((out / name).glob("*.png"))) == 4
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert (manifest["split"], manifest["per_class"], manifest["seed"], manifest["count"]) == ("test", 4, 0, 40)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_pngs_hold_the_right_images(tiny_root: Path, tmp_path: Path) -> None:
    out = write_image_folder("test", tmp_path / "out", per_class=2, root=tiny_root, show_progress=False)
    for png in out.glob("*/*.png"):
        index = int(png.stem)
        assert CLASSES[index % len(CLASSES)] == png.parent.name
        pixels = np.asarray(Image.open(png))
        assert pixels.shape == (28, 28) and np.all(pixels == index)


def test_second_call_rewrites_nothing(tiny_root: Path, tmp_path: Path) -> None:
    out = write_image_folder("test", tmp_path / "out", per_class=3, seed=1, root=tiny_root, show_progress=False)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    again = write_image_folder("test", tmp_path / "out", per_class=3, seed=1, root=tiny_root, show_progress=False)
    assert again == out
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before


def test_same_seed_same_subset_other_seed_other_subset(tiny_root: Path, tmp_path: Path) -> None:
    def chosen(name: str, seed: int) -> set[str]:
        out = write_image_folder("test", tmp_path / name, 3, seed, root=tiny_root, show_progress=False)
        return {f"{p.parent.name}/{p.name}" for p in out.glob("*/*.png")}

    assert chosen("a", 0) == chosen("b", 0)
    assert chosen("c", 0) != chosen("d", 1)


def test_other_settings_replace_an_earlier_folder(tiny_root: Path, tmp_path: Path) -> None:
    write_image_folder("test", tmp_path / "out", per_class=2, root=tiny_root, show_progress=False)
    out = write_image_folder("test", tmp_path / "out", per_class=5, root=tiny_root, show_progress=False)
    assert len(list(out.glob("*/*.png"))) == 50
    assert json.loads((out / MANIFEST_NAME).read_text())["per_class"] == 5


def test_folder_without_manifest_is_not_trusted_or_deleted(tiny_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    with pytest.raises(OutputPathError, match="new or empty folder"):
        write_image_folder("test", out, per_class=2, root=tiny_root, show_progress=False)
    assert (out / "mine.txt").read_text() == "keep me"


def test_incomplete_folder_is_rebuilt(tiny_root: Path, tmp_path: Path) -> None:
    out = write_image_folder("test", tmp_path / "out", per_class=2, root=tiny_root, show_progress=False)
    next(out.glob("*/*.png")).unlink()
    write_image_folder("test", out, per_class=2, root=tiny_root, show_progress=False)
    assert len(list(out.glob("*/*.png"))) == 20


def test_missing_idx_names_the_package(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="apt-get install -y dataset-fashion-mnist"):
        read_idx(tmp_path / "train-images-idx3-ubyte.gz", tmp_path / "train-labels-idx1-ubyte.gz")
    with pytest.raises(DataError, match="apt-get install -y dataset-fashion-mnist"):
        write_image_folder("train", tmp_path / "out", per_class=1, root=tmp_path / "nowhere", show_progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("not_gzip", "not a readable gzip file"),
        ("truncated_gzip", "not a readable gzip file"),
        ("bad_magic", "magic"),
        ("short_body", "body has"),
        ("bad_label", "outside 0..9"),
        ("count_mismatch", "same split"),
    ],
)
def test_corrupt_idx_is_a_data_error(tiny_root: Path, damage: str, message: str) -> None:
    images_gz, labels_gz = idx_paths("test", tiny_root)
    if damage == "not_gzip":
        images_gz.write_bytes(b"this is not gzip")
    elif damage == "truncated_gzip":
        images_gz.write_bytes(images_gz.read_bytes()[:100])
    elif damage == "bad_magic":
        with gzip.open(images_gz, "wb") as handle:
            handle.write(struct.pack(">IIII", 0x801, 1, 28, 28) + bytes(784))
    elif damage == "short_body":
        with gzip.open(images_gz, "wb") as handle:
            handle.write(struct.pack(">IIII", 0x803, 60, 28, 28) + bytes(784))
    elif damage == "bad_label":
        with gzip.open(labels_gz, "wb") as handle:
            handle.write(struct.pack(">II", 0x801, 60) + bytes([10] * 60))
    elif damage == "count_mismatch":
        with gzip.open(labels_gz, "wb") as handle:
            handle.write(struct.pack(">II", 0x801, 59) + bytes(59))
    with pytest.raises(DataError, match=message):
        read_idx(images_gz, labels_gz)


def test_bad_arguments_are_data_errors(tiny_root: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="pass --per-class 6 or less"):
        write_image_folder("test", tmp_path / "out", per_class=7, root=tiny_root, show_progress=False)
    with pytest.raises(DataError, match="positive integer"):
        write_image_folder("test", tmp_path / "out", per_class=0, root=tiny_root, show_progress=False)
    with pytest.raises(DataError, match="'train' or 'test'"):
        write_image_folder("val", tmp_path / "out", per_class=1, root=tiny_root)  # type: ignore[arg-type]
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_command_line_prints_the_path(tiny_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli"
    argv = ["--split", "test", "--per-class", "1", "--out", str(out), "--root", str(tiny_root), "--quiet"]
    assert main(argv) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert main(["--split", "test", "--per-class", "9", "--out", str(out), "--root", str(tiny_root)]) == 2
    assert "pass --per-class 6 or less" in capsys.readouterr().err
