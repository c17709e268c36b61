"""What compensation did, as data: its settings, and per block the error to dense before and after."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from search.budget.plan import Plan

@dataclass(frozen=True)
class CompensationConfig:
    """Settings of compensation after the cut.

    Attributes:
        images: calibration images drawn from the start of the search pool (fewer if the pool is smaller).
        ridge: λ of every refit, relative to the mean diagonal of its Gram matrix; pulls toward the plain
            cut's weights. Measured on dinov2_s at 112 px (acp plan at 0.63, held-out feature cosine to
            dense, no recovery; 0.484 as cut): 128 images 0.755 at 1e-3, 0.831 at 1e-2, 0.874 at 0.1,
            0.877 at 0.3, 0.864 at 1; 512 images 0.917 at 0.03 and 0.916 at 0.1. Too little ridge
            fits the calibration crops, not the model.
        logits: refit the queries to the dense logits where the kind allows it.
        stream: fit to the dense residual stream where the family describes it (else each layer's own output).
        rearrange: re-choose which channels and units a block keeps (the same counts) by the error left after
            the refit (``search.cut.selection``), not by importance before it.
        inputs: refit fc1's kept rows to the dense pre-activations from the inputs the pruned MLP now sees.
        batch: images per forward pass.
    """

    images: int = 384
    ridge: float = 0.1
    logits: bool = True
    stream: bool = True
    rearrange: bool = True
    inputs: bool = True
    batch: int = 16


@dataclass(frozen=True)
class BlockRepair:
    """What compensation did to one block: its relative output error against the dense block, before and after."""

    index: int
    before: float
    after: float
    fitted: tuple[str, ...]
    target: str
    reverted: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"block": self.index, "before": self.before, "after": self.after, "fitted": list(self.fitted),
                "target": self.target, "reverted": self.reverted}


@dataclass(frozen=True)
class CompensationResult:
    """The repair of a whole model: per block, and the notes the report carries (what could not be fitted)."""

    blocks: tuple[BlockRepair, ...]
    images: int
    seconds: float
    notes: tuple[str, ...] = field(default_factory=tuple)
    plan: Plan | None = None
    rechosen: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """The report's section; ``plan`` (the plan as compensated) is left to the caller, who saves it as a file."""
        return {"images": self.images, "seconds": round(self.seconds, 2), "notes": list(self.notes),
                "rechosen": round(self.rechosen, 4), "blocks": [b.to_dict() for b in self.blocks]}

    def describe(self) -> str:
        """One line: the last block's error before and after, what was re-chosen, and the time."""
        last = self.blocks[-1]
        return (f"{len(self.blocks)} blocks from {self.images} images in {self.seconds:.0f} s; last block's error to dense "
                f"{last.before:.4f} → {last.after:.4f}; {self.rechosen:.0%} of the kept channels and units re-chosen"
                + (f" ({'; '.join(self.notes)})" if self.notes else ""))


def rechosen(before: Plan, after: Plan) -> float:
    """The fraction of the kept q/k channels, v channels and MLP units (over every head and block) that differ."""
    kept = changed = 0
    for a, b in zip(before.blocks, after.blocks):
        for old, new in [*zip(a.qk, b.qk), *zip(a.v, b.v), (a.mlp, b.mlp)]:
            kept += len(old)
            changed += len(set(old) - set(new))
    return changed / max(kept, 1)
