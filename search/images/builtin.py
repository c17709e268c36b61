"""Built-in images: natural photographs shipped inside a package, for runs without ``--data``.

Distillation needs neither labels nor in-domain images: a student can be distilled from its
teacher on heavily augmented crops of a few natural photographs (Asano & Saeed, "Extrapolating
from a single image to a thousand classes using distillation", CVPR 2022). So when the user gives
no images but the weights are real, the search and the recovery still have something worth
learning from: the sample photographs bundled in the scikit-image wheel (an astronaut, a cat, a
cup of coffee, a rocket, motorcycles, the moon, textures of brick, grass and gravel, microscopy
and astronomy images, printed text), read straight from the installed package, never downloaded.

Each image of the pool is a random resized crop (5-100 % of a photograph's area) with a random
flip and colour jitter; half of them are then mixed with a second crop, by mixup or by CutMix.
The pool is drawn with a fixed seed, so a run and its resumption see the same images.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from search.core.errors import DataError

PACKAGE = "skimage"
PHOTOS = (
    "astronaut.png", "brick.png", "camera.png", "cell.png", "chelsea.png", "clock_motion.png", "coffee.png",
    "coins.png", "grass.png", "gravel.png", "hubble_deep_field.jpg", "ihc.png", "moon.png", "motorcycle_left.png",
    "motorcycle_right.png", "page.png", "retina.jpg", "rocket.jpg", "text.png",
)
MAX_SIDE = 640
CROP_SCALE = (0.05, 1.0)
MIX_PROBABILITY = 0.5


def photo_dir() -> Path:
    """The folder of the bundled photographs; DataError naming the fix if the package is missing."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DataError("built-in images need scikit-image (pip install scikit-image), or give --data DIR")
    return Path(next(iter(spec.submodule_search_locations))) / "data"


def load_photos() -> list[Image.Image]:
    """The bundled photographs as RGB images, their longer side at most MAX_SIDE pixels."""
    root = photo_dir()
    photos = []
    for name in PHOTOS:
        try:
            with Image.open(root / name) as image:
                photo = image.convert("RGB")
        except OSError as exc:
            raise DataError(f"built-in image {root / name} cannot be read ({exc}); reinstall scikit-image or give --data DIR") from None
        photo.thumbnail((MAX_SIDE, MAX_SIDE))
        photos.append(photo)
    return photos


def _augment(size: tuple[int, int]):
    from torchvision.transforms import v2

    return v2.Compose([
        v2.RandomResizedCrop(size, scale=CROP_SCALE, antialias=True),
        v2.RandomHorizontalFlip(),
        v2.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4, hue=0.05),
        v2.ToDtype(torch.float32, scale=True),
    ])


def _mix(a: torch.Tensor, b: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Mixup (a convex blend) or CutMix (a box of ``b`` pasted into ``a``), each half the time."""
    if torch.rand((), generator=gen) < 0.5:
        lam = 0.3 + 0.4 * torch.rand((), generator=gen)
        return lam * a + (1 - lam) * b
    _, h, w = a.shape
    frac = torch.rand((), generator=gen).sqrt().item()
    bh, bw = max(1, int(h * frac)), max(1, int(w * frac))
    top = int(torch.randint(h - bh + 1, (), generator=gen))
    left = int(torch.randint(w - bw + 1, (), generator=gen))
    out = a.clone()
    out[:, top : top + bh, left : left + bw] = b[:, top : top + bh, left : left + bw]
    return out


def builtin_images(count: int, data_config: dict[str, Any], seed: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """``count`` augmented, normalised crops of the bundled photographs: (count, 3, H, W), on the CPU.

    Args:
        count: images to draw.
        data_config: the model's timm data config (input_size, mean, std).
        seed: fixes the crops, flips, jitter and mixing (the random draws are the same on every device).
        device: where the crops are cut, resized and jittered. On a GPU a pool of thousands is drawn in
            seconds, where one CPU thread would take a minute; the pool comes back on the CPU either way.
    """
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    from torchvision.transforms.v2.functional import pil_to_tensor

    photos = [pil_to_tensor(photo).to(device) for photo in load_photos()]
    _, height, width = data_config["input_size"]
    augment = _augment((height, width))
    mean = torch.tensor(data_config["mean"], device=device).view(3, 1, 1)
    std = torch.tensor(data_config["std"], device=device).view(3, 1, 1)
    gen = torch.Generator().manual_seed(seed)
    out = torch.empty(count, 3, height, width, device=device)
    threads = torch.get_num_threads()
    # Each op works on one small image: a second thread buys nothing, and on a busy machine the
    # threads' hand-offs made the same crops 20 times slower (measured: 8 crops in 1.0 s on one
    # thread, 19.8 s on two, with other jobs on the cores).
    torch.set_num_threads(1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for i in range(count):
            first = augment(photos[int(torch.randint(len(photos), (), generator=gen))])
            if torch.rand((), generator=gen) < MIX_PROBABILITY:
                second = augment(photos[int(torch.randint(len(photos), (), generator=gen))])
                first = _mix(first, second, gen)
            out[i] = (first - mean) / std
    torch.set_num_threads(threads)
    return out.cpu()


def describe_builtin(count: int) -> str:
    """How reports name these images."""
    return (f"{count} augmented crops of {len(PHOTOS)} built-in photographs (scikit-image sample data; "
            "random resized crops, flips, colour jitter, mixup/CutMix), no --data")
