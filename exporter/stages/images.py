"""Stage: the images a run learns from and checks on."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from exporter.input_checks import check_image_count, min_held_out
from exporter.recovery import HeldOut
from exporter.stages.config import RunConfig
from search.images.builtin import builtin_images, describe_builtin
from search.core.errors import OptionError
from search.images.folders import balanced_subset, image_folder, stack_images
from search.models.load import LoadedModel


@dataclass(frozen=True)
class Images:
    """The images of one run: a pool for search and recovery, and a disjoint held-out set."""

    pool: torch.Tensor
    held_out: HeldOut
    label: str


def load_images(cfg: RunConfig, loaded: LoadedModel, device: torch.device | str = "cpu") -> Images:
    """The run's images, by what is there to learn from.

    - --data: class-balanced images from the ImageFolder (fixed seed), held-out ones labelled;
    - no --data, real weights: augmented crops of the built-in photographs, so the search and the
      recovery still distil the dense model on natural images (``search.images.builtin``);
    - no --data, random weights: fixed-seed Gaussian inputs, enough for parity and nothing more.

    The built-in crops are drawn on ``device`` (the training device) and returned on the CPU.
    """
    held_needed = min_held_out(loaded.is_classifier, cfg.recovery_steps(loaded.random_weights))
    if cfg.data is None and not loaded.random_weights:
        if cfg.heldout_images < held_needed:
            raise OptionError(f"--heldout-images {cfg.heldout_images} is too few for recovery's held-out metric; "
                              f"use --heldout-images {held_needed} or more")
        total = cfg.search_images + cfg.heldout_images
        images = builtin_images(total, loaded.data_config, cfg.seed, device)
        held = cfg.heldout_images
        return Images(images[held:], HeldOut(images[:held], None), describe_builtin(total))
    if cfg.data is None:
        gen = torch.Generator().manual_seed(cfg.seed)
        size = loaded.data_config["input_size"]
        pool = torch.randn(max(cfg.calib_images, 32), *size, generator=gen)
        held = torch.randn(cfg.calib_images, *size, generator=gen)
        return Images(pool, HeldOut(held, None), "random normal inputs (no --data; random weights)")
    dataset = image_folder(cfg.data, loaded.data_config)
    check_image_count(cfg.data, len(dataset), cfg.search_images, cfg.heldout_images, held_needed)
    subset = balanced_subset(dataset, cfg.search_images + cfg.heldout_images, cfg.seed)
    images, labels = stack_images(subset)
    held = max(1, min(cfg.heldout_images, len(images) // 2))
    pool = images[held:] if len(images) > held else images
    labels_held = labels[:held] if len(dataset.classes) > 1 else None
    label = f"{len(pool)} search + {held} held-out images from {cfg.data}"  # as given: no machine path in a shared report
    return Images(pool, HeldOut(images[:held], labels_held), label)
