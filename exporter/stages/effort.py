"""How much work a run spends on search and recovery: ``--effort fast|default|best``, sized per device.

One name sets the four numbers that decide what a run can recover together: search steps, recovery
steps, images drawn for both, and the batch size. The same name means a different size on each
device, because the device decides what a minute buys:

- **CPU** (2 cores is the machine sized for): compensation in closed form after the cut
  (``exporter.compensation``) is the repair: it re-chooses the kept channels and refits the layers
  that read them in a few minutes, and gradient recovery from the compensated model lowered the
  held-out fidelity in every setting tried (dinov2_s at 112 px: relation agreement 0.843 after
  compensation, 0.74-0.79 after 40 steps at learning rates 1e-5 to 1e-4, with all or only the linear
  weights trained; it never came back above the start within 200 steps). So ``fast`` and ``default`` are
  the search and compensation alone, ``default`` with twice the search steps and 384 calibration
  images (under 15 minutes for dinov2_s at 224 px on 2 cores); ``best`` still adds a long recovery,
  which keeps the compensated state when recovery does not beat it.
- **CUDA**: a batch of 16 leaves the GPU waiting on kernel launches, so batches are larger and the
  step counts are those that took DINOv2-S from 1.8-5.9 points below dense to within half a point
  of it (or above it) on one H200, in about two minutes.

Explicit ``--search-steps``, ``--finetune-steps``, ``--search-images``, ``--heldout-images`` and
``--batch-size`` override the level's numbers one by one. This module imports nothing heavy, so the
command line can show the choices without loading torch.
"""
from __future__ import annotations

from dataclasses import dataclass

from exporter.options import EFFORTS


@dataclass(frozen=True)
class Effort:
    """The work one run spends, resolved for its device.

    Attributes:
        name: the level (one of ``EFFORTS``).
        device: the device kind it was sized for, ``cpu`` or ``cuda``.
        search_steps: optimisation steps of the search (acp, DSP; each stage of dsp+acp).
        finetune_steps: recovery steps (for real weights; random weights get none).
        search_images: images drawn for the search and the recovery.
        heldout_images: further images held out for model selection, parity and fidelity.
        batch_size: global batch of every search and recovery step.
        reason: why these numbers, for the terminal and the report.
        overridden: the options given explicitly that replaced the level's numbers.
    """

    name: str
    device: str
    search_steps: int
    finetune_steps: int
    search_images: int
    heldout_images: int
    batch_size: int
    reason: str
    overridden: tuple[str, ...] = ()

    def describe(self) -> str:
        """One line for the terminal: the level, the numbers, and why."""
        over = f"; given: {', '.join(self.overridden)}" if self.overridden else ""
        return (f"effort {self.name} on {self.device}: {self.search_steps} search steps, {self.finetune_steps} recovery steps, "
                f"{self.search_images} + {self.heldout_images} held-out images, batch {self.batch_size} ({self.reason}{over})")

    def to_dict(self) -> dict[str, object]:
        """The report's ``effort`` entry."""
        return {"name": self.name, "device": self.device, "search_steps": self.search_steps,
                "finetune_steps": self.finetune_steps, "search_images": self.search_images,
                "heldout_images": self.heldout_images, "batch_size": self.batch_size, "reason": self.reason,
                "overridden": list(self.overridden)}


_LEVELS: dict[tuple[str, str], tuple[int, int, int, int, int, str]] = {
    # (name, device): (search steps, recovery steps, search images, held-out images, batch, reason)
    ("fast", "cpu"): (20, 0, 96, 200, 16, "a check in minutes: the search and compensation in closed form, no recovery"),
    ("default", "cpu"): (40, 0, 384, 200, 16,
                         "no GPU: the search and compensation in closed form, sized for under 15 minutes for dinov2_s at 224 px on 2 cores"),
    ("best", "cpu"): (150, 600, 1024, 200, 16, "no GPU: the longest CPU setting, an hour or more on 2 cores"),
    ("fast", "cuda"): (100, 300, 1024, 200, 32, "GPU: a quick run, about a minute for dinov2_s"),
    ("default", "cuda"): (300, 1000, 2048, 256, 64,
                          "GPU found: the long-run setting, a few minutes for dinov2_s on one H100"),
    ("best", "cuda"): (600, 3000, 4096, 256, 64, "GPU: three times the default recovery"),
}


def resolve_effort(name: str, device_type: str, *, search_steps: int | None = None, finetune_steps: int | None = None,
                   search_images: int | None = None, heldout_images: int | None = None,
                   batch_size: int | None = None) -> Effort:
    """The effort ``name`` sized for ``device_type`` (``cpu``, ``cuda``; any other device is sized as a CPU),
    with every explicitly given number in place of the level's.

    Raises:
        ValueError: ``name`` is not one of ``EFFORTS`` (the command line refuses it before this).
    """
    if name not in EFFORTS:
        raise ValueError(f"unknown effort {name!r}; choose one of {', '.join(EFFORTS)}")
    device = "cuda" if device_type == "cuda" else "cpu"
    steps, finetune, images, held, batch, reason = _LEVELS[(name, device)]
    given = {"--search-steps": search_steps, "--finetune-steps": finetune_steps, "--search-images": search_images,
             "--heldout-images": heldout_images, "--batch-size": batch_size}
    overridden = tuple(f"{option} {value}" for option, value in given.items() if value is not None)
    return Effort(
        name=name, device=device,
        search_steps=steps if search_steps is None else search_steps,
        finetune_steps=finetune if finetune_steps is None else finetune_steps,
        search_images=images if search_images is None else search_images,
        heldout_images=held if heldout_images is None else heldout_images,
        batch_size=batch if batch_size is None else batch_size,
        reason=reason, overridden=overridden,
    )
