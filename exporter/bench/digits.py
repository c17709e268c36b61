"""A second labelled real dataset for the benches: scikit-learn's handwritten digits, as image folders.

Fashion-MNIST alone cannot say whether a k-NN figure measures what pruning kept or how recovery
moved the features: after a distillation on other images, the sign of the change depends on the
dataset. The 1797 digits (8×8 greyscale scans of 43 writers, ten classes) bundled with
scikit-learn are a second, unrelated domain that needs no download. Upscaled to the model's input by
its own preprocessing, they are far from photographs, which is the point: no search image resembles them.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from search.core.errors import DataError

BANK_PER_CLASS = 30
QUERIES_PER_CLASS = 50


def write_digit_folders(root: Path, bank_per_class: int = BANK_PER_CLASS, queries_per_class: int = QUERIES_PER_CLASS
                        ) -> tuple[Path, Path]:
    """``root/bank/<digit>/*.png`` and ``root/queries/<digit>/*.png``: the first images of each class form the
    bank, the next ones the queries (disjoint, in scikit-learn's order). Written once; an existing pair is reused."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DataError("the digits dataset needs scikit-learn: pip install 'prune-export[bench]'") from None
    from PIL import Image

    bank, queries = root / "bank", root / "queries"
    if bank.is_dir() and queries.is_dir():
        return bank, queries
    digits = load_digits()
    images = (digits.images * (255.0 / 16.0)).round().astype(np.uint8)
    staging = root.with_name(root.name + ".partial")
    for label in range(10):
        indices = np.flatnonzero(digits.target == label)
        if len(indices) < bank_per_class + queries_per_class:
            raise DataError(f"digit {label} has {len(indices)} images, fewer than {bank_per_class} + {queries_per_class}")
        for part, chosen in (("bank", indices[:bank_per_class]), ("queries", indices[bank_per_class:bank_per_class + queries_per_class])):
            folder = staging / part / str(label)
            folder.mkdir(parents=True, exist_ok=True)
            for index in chosen:
                Image.fromarray(images[index]).save(folder / f"{int(index):04d}.png")
    staging.rename(root)
    return bank, queries
