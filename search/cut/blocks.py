"""What one block keeps: its kept widths, and the kept head, channel and unit indices of a plan.

These are plain data, with no import from the rest of search: attention kinds and model families
slice by a :class:`BlockPlan`, the MAC count prices :class:`BlockWidths`, and the Plan
(``search.budget.plan``) is a tuple of block plans with the figures that check them.
"""
from __future__ import annotations

from dataclasses import dataclass

KeptHeads = tuple[tuple[int, ...], ...]
"""Per block, the sorted indices of the heads it keeps (empty: the block keeps no head)."""


@dataclass(frozen=True)
class BlockWidths:
    """Kept widths of one transformer block: heads, q/k and v channels per head, MLP units."""

    heads: int
    qk: int
    v: int
    mlp: int


@dataclass(frozen=True)
class BlockPlan:
    """Kept parts of one block.

    Attributes:
        heads: kept head indices; empty when the block keeps no head (its attention branch goes).
        qk: per kept head, the kept q/k channel indices (q and k go together: q·k sums over them).
        v: per kept head, the kept v channel indices (and the matching input columns of proj).
        mlp: kept MLP hidden units (rows of fc1, columns of fc2).
    """

    heads: tuple[int, ...]
    qk: tuple[tuple[int, ...], ...]
    v: tuple[tuple[int, ...], ...]
    mlp: tuple[int, ...]

    @property
    def widths(self) -> BlockWidths:
        """Kept widths; a block without heads keeps 0 q/k and 0 v channels."""
        if not self.heads:
            return BlockWidths(heads=0, qk=0, v=0, mlp=len(self.mlp))
        return BlockWidths(heads=len(self.heads), qk=len(self.qk[0]), v=len(self.v[0]), mlp=len(self.mlp))

    @property
    def shared_indices(self) -> bool:
        """True when every kept head keeps the same q/k and the same v indices (trivially, when none is kept)."""
        return len(set(self.qk)) <= 1 and len(set(self.v)) <= 1
