"""What the written file kept, measured on the held-out images: fidelity to dense first, accuracy where labelled.

The pruned side is the artifact itself (the file the user holds, fp16 or int8 included) run in ONNX
Runtime on the CPU; the dense side is the dense PyTorch model, which the dense export matches to
parity. Both see the same held-out images, which neither the search nor the recovery trained on.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from exporter.fidelity import fidelity
from exporter.runtimes.ort import make_session
from exporter.stages.images import Images
from exporter.knn import knn_top1

CHUNK = 32


def torch_outputs(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """``model``'s outputs for ``images`` on the CPU, in chunks."""
    model.eval()
    with torch.no_grad():
        return torch.cat([model(chunk).float() for chunk in images.split(CHUNK)])


def onnx_outputs(path: Path, images: torch.Tensor, threads: int) -> torch.Tensor:
    """The ONNX file's outputs for ``images`` in ONNX Runtime on the CPU, in chunks."""
    session = make_session(path, threads)
    name = session.get_inputs()[0].name
    return torch.from_numpy(np.concatenate([session.run(None, {name: c.numpy()})[0] for c in images.split(CHUNK)]).astype(np.float32))


def held_out_quality(dense: nn.Module, artifact: Path, images: Images, classifier: bool, threads: int) -> dict[str, Any]:
    """``{"fidelity": ..., "accuracy": ... or None}`` of the artifact against the dense model on the held-out images.

    Accuracy is the k-NN top-1 of backbones on labelled held-out images (half bank, half queries);
    classifiers' labels from an ImageFolder are not their classes, so they get fidelity alone.
    """
    held = images.held_out
    reference, served = torch_outputs(dense, held.images), onnx_outputs(artifact, held.images, threads)
    figures = fidelity(reference, served, classifier, held.labels if not classifier else None)
    figures["inputs"] = f"{len(held.images)} held-out images ({images.label}); pruned = the written file in ONNX Runtime"
    accuracy = None
    if held.labels is not None and not classifier:
        half = len(reference) // 2
        accuracy = {
            "metric": "k-NN top-1 (k=20, T=0.07), half the held-out images as bank, half as queries",
            "held_out_images": len(held.images),
            "dense": knn_top1(reference[:half], held.labels[:half], reference[half:], held.labels[half:]),
            "pruned": knn_top1(served[:half], held.labels[:half], served[half:], held.labels[half:]),
        }
    return {"fidelity": figures, "accuracy": accuracy}


def describe_quality(kept: dict[str, Any]) -> str:
    """One line of the figures, for the stage's note."""
    f = kept["fidelity"]
    if "top1_agreement" in f:
        text = f"top-1 agreement {f['top1_agreement']:.4f}, KL {f['mean_kl']:.4g}"
    else:
        text = (f"feature cosine {f['feature_cosine']:.4f}, k-NN agreement {f['knn_agreement']:.3f}, "
                f"relation agreement {f['relation_agreement']:.4f}")
    if kept["accuracy"] is not None:
        text += f"; k-NN accuracy dense {kept['accuracy']['dense']:.4f}, pruned {kept['accuracy']['pruned']:.4f}"
    return text
