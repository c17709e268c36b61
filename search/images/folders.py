"""Images for calibration, search, recovery and parity checks.

``--data DIR`` is an ImageFolder: one sub-folder per class, images inside. Images go through timm's
evaluation transform built from the model's own data config, so what is pruned, validated and later
served sees the same preprocessing. Without data, the pipeline uses a fixed-seed Gaussian batch
and its report says so.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import timm.data
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset, Subset
from torchvision.datasets import ImageFolder

from search.core.errors import DataError


def _checked_loader(path: str) -> Image.Image:
    try:
        with open(path, "rb") as f:
            return Image.open(f).convert("RGB")
    except (OSError, UnidentifiedImageError) as exc:
        raise DataError(f"image {path} cannot be read ({exc}); remove it or fix the data directory") from None


def image_folder(root: Path, data_config: dict[str, Any], is_training: bool = False) -> ImageFolder:
    """The ImageFolder at ``root`` with the model's transform; DataError if missing or empty."""
    root = Path(root)
    if not root.is_dir():
        problem = "is a file, not a directory" if root.exists() else "does not exist"
        raise DataError(f"data directory {root} {problem}; give an ImageFolder (one sub-folder per class)")
    cfg = {k: data_config[k] for k in ("input_size", "mean", "std", "interpolation", "crop_pct") if k in data_config}
    cfg["input_size"] = tuple(cfg["input_size"])
    transform = timm.data.create_transform(**cfg, is_training=is_training)
    try:
        return ImageFolder(str(root), transform=transform, loader=_checked_loader)
    except (FileNotFoundError, OSError) as exc:
        raise DataError(
            f"data directory {root} holds no images in class sub-folders ({exc}); "
            "put images in DIR/<class>/*.png or *.jpg"
        ) from None


def balanced_subset(dataset: ImageFolder, count: int, seed: int) -> Subset:
    """``count`` samples spread evenly over the classes, picked with a fixed seed."""
    gen = torch.Generator().manual_seed(seed)
    targets = torch.tensor(dataset.targets)
    per_class = [torch.nonzero(targets == c).flatten() for c in range(len(dataset.classes))]
    per_class = [idx[torch.randperm(len(idx), generator=gen)] for idx in per_class]
    chosen: list[int] = []
    rank = 0
    while len(chosen) < min(count, len(dataset)):
        for idx in per_class:
            if rank < len(idx) and len(chosen) < count:
                chosen.append(int(idx[rank]))
        rank += 1
    return Subset(dataset, chosen)


def stack_images(dataset: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """All images and labels of a small dataset as two tensors."""
    images, labels = zip(*(dataset[i] for i in range(len(dataset))))
    return torch.stack(images), torch.tensor(labels)

