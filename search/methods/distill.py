"""Knowledge distillation from the dense model, shared by the search and the recovery.

- Classifiers: KL divergence between the teacher's and the student's class distributions.
- Backbones: every block's output, matched block by block, plus the class token that k-NN reads.
  Pruning changes only widths *inside* a block, so the residual stream keeps its shape and each
  block of the student has a teacher block to match. The loss is the mean over blocks of the MSE
  relative to the teacher's mean square (DINOv2's residual stream grows with depth, so a plain MSE
  would leave the early blocks unweighted), plus 1 - cosine of the final class token.

Why blocks and not the final features alone (measured, dinov2_s at 112 px, acp plan at 0.63, 60
recovery steps on 256 Fashion-MNIST images, k-NN with 1000 bank and 1000 test images; dense 66.5%,
pruned before recovery 66.7%):
- final features only (CLS cosine + patch cosine + CLS relation MSE): 58.9% at lr 1e-4, 69.2% at 1e-5;
- blocks + CLS cosine: 72.5% at lr 1e-4, 72.4% at 1e-5.
Distilling the final class token alone was seen earlier to take k-NN from 57.5% to 47.6%: a loss on
the last layer alone lets the student drift in ways k-NN feels.
"""
from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn

from search.core.runtime import Runtime
from search.families import family_of
from search.methods.gates import Gates


def block_outputs(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Every block's output and the final (normed) features: (batch, blocks + 1, tokens, dim)."""
    family = family_of(model)
    outputs: list[torch.Tensor] = []
    hooks = [block.register_forward_hook(lambda _m, _i, out: outputs.append(out)) for block in family.blocks(model)]
    try:
        final = family.features(model, images)
    finally:
        for hook in hooks:
            hook.remove()
    return torch.stack([*outputs, final], dim=1)


def distill_targets(model: nn.Module, images: torch.Tensor, classifier: bool) -> torch.Tensor:
    """What is distilled: logits for classifiers; every block's output and the final features for backbones."""
    return model(images) if classifier else block_outputs(model, images)


def distill_loss(student: torch.Tensor, teacher: torch.Tensor, classifier: bool) -> torch.Tensor:
    """Distillation loss of ``student`` outputs against ``teacher`` outputs (mean over the batch)."""
    student, teacher = student.float(), teacher.float()
    if classifier:
        return F.kl_div(F.log_softmax(student, -1), F.log_softmax(teacher, -1), log_target=True, reduction="batchmean")
    hidden_s, hidden_t = student[:, :-1], teacher[:, :-1]
    per_block = (hidden_s - hidden_t).pow(2).mean(dim=(0, 2, 3)) / hidden_t.pow(2).mean(dim=(0, 2, 3)).clamp_min(1e-12)
    cls = (1.0 - F.cosine_similarity(student[:, -1, 0], teacher[:, -1, 0], dim=-1)).mean()
    return per_block.mean() + cls


def distill_step_loss(teacher: nn.Module, student: nn.Module, batch: torch.Tensor, classifier: bool, runtime: Runtime,
                      target: torch.Tensor | None = None) -> torch.Tensor:
    """One training step's distillation loss: the frozen teacher's targets (no gradient), then the student's loss.

    Both run under the runtime's autocast; every distillation loop (acp, DSP, recovery) goes through here.
    ``target`` is the teacher's output for ``batch`` when it was computed beforehand (:func:`teacher_targets`).
    """
    if target is None:
        with torch.no_grad(), runtime.autocast():
            target = distill_targets(teacher, batch, classifier)
    with runtime.autocast():
        return distill_loss(student(batch), target, classifier)


TARGET_MEMORY_SHARE = 0.25
"""Largest share of the device's free memory the stored teacher targets may take."""


def free_memory(device: torch.device) -> int:
    """Bytes free on ``device``: the GPU's free memory, or the host's available memory (0 when unknown)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as info:
            for line in info:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def teacher_targets(teacher: nn.Module, pool: torch.Tensor, classifier: bool, runtime: Runtime,
                    chunk: int = 32, budget_bytes: int | None = None) -> torch.Tensor | None:
    """The frozen teacher's distillation targets for every pool image, computed once; None if they do not fit.

    A loop that draws its batches from a fixed pool sees each image many times (1000 steps of 64 from
    2048 images is 31 passes), and the teacher's forward is a third of a recovery step: computing it
    once per image and indexing the result makes every later step that much cheaper, with the same
    targets (the same forward, under the same autocast). The targets stay on the pool's device; they
    are kept only when they take at most ``budget_bytes`` (default: a quarter of the free memory).
    """
    teacher.eval()
    with torch.no_grad(), runtime.autocast():
        first = distill_targets(teacher, pool[:1], classifier)
    need = first[0].numel() * first.element_size() * len(pool)
    limit = int(TARGET_MEMORY_SHARE * free_memory(pool.device)) if budget_bytes is None else budget_bytes
    if need > limit:
        return None
    out = torch.empty((len(pool), *first.shape[1:]), dtype=first.dtype, device=pool.device)
    with torch.no_grad(), runtime.autocast():
        for start in range(0, len(pool), chunk):
            out[start : start + chunk] = distill_targets(teacher, pool[start : start + chunk], classifier)
    return out


class DistillStudent(nn.Module):
    """The student seen through what is distilled, as one module so DistributedDataParallel sees the
    whole forward and owns every trainable parameter: the gates in the searches (channel gates for
    acp, head logits for dsp; the model frozen under them), the weights and reweights in recovery
    (``gates`` None)."""

    def __init__(self, model: nn.Module, classifier: bool, gates: Gates | None = None) -> None:
        super().__init__()
        self.model, self.classifier, self.gates = model, classifier, gates

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        with self.gates.gating(self.model) if self.gates is not None else nullcontext():
            return distill_targets(self.model, images, self.classifier)
