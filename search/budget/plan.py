"""The Plan: which heads, q/k channels, v channels and MLP units each block keeps.

The Plan is the contract between search and surgery, and the replayable record of a pruning run
(Torch-Pruning's pruning history, as data). It is saved as JSON, so a search is never lost and
``--plan`` can replay it on the same model without searching again.

Indices are stored per kept head. With the default equal removal every head has the same indices;
with ``--per-head-indices`` each head has its own. Equal *counts* in every head of a block are an
invariant in both cases: the pruned block must still reshape to (B, H, N, d').

A block may keep no head at all (head pruning, ``--method dsp``): ``heads``, ``qk`` and ``v`` are
then empty, its attention costs no MAC, and surgery removes its attention branch, keeping the
residual. Version 2 of the file format allows this; version 1 files (every block keeps a head) load
unchanged, since their schema is the same.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from search.core.errors import PlanError
from search.budget.macs import ModelGeometry, model_macs
from search.cut.blocks import BlockPlan, BlockWidths

FORMAT = "prune-export/plan"
VERSION = 2
READABLE_VERSIONS = (1, 2)  # v1: the same schema, before blocks could keep no head


def _check_indices(what: str, indices: tuple[int, ...], size: int) -> None:
    if not indices:
        raise PlanError(f"{what} keeps no index; a plan must keep at least one")
    if list(indices) != sorted(set(indices)):
        raise PlanError(f"{what} indices must be sorted and unique")
    if indices[0] < 0 or indices[-1] >= size:
        raise PlanError(f"{what} index out of range [0, {size})")


def check_block(block: BlockPlan, index: int, geometry: ModelGeometry) -> None:
    """Raise PlanError unless ``block`` fits block ``index`` of ``geometry``."""
    g = geometry.blocks[index]
    name = f"block {index}"
    if block.heads:
        _check_indices(f"{name} heads", block.heads, g.attention.num_heads)
    for group, rows, size in (("qk", block.qk, g.attention.qk_dim), ("v", block.v, g.attention.v_dim)):
        if len(rows) != len(block.heads):
            raise PlanError(f"{name} has {len(rows)} {group} rows for {len(block.heads)} kept heads")
        if len({len(r) for r in rows}) > 1:
            raise PlanError(f"{name} keeps unequal {group} counts across heads; every head must keep the same number")
        for h, r in zip(block.heads, rows):
            _check_indices(f"{name} head {h} {group}", r, size)
    _check_indices(f"{name} mlp", block.mlp, g.mlp_hidden)


@dataclass(frozen=True)
class Plan:
    """A complete, checked pruning plan for one model.

    Attributes:
        model: timm model name the plan was made for.
        img_size: input resolution the MACs were counted at.
        method: the selection method that produced it (magnitude, random, acp, dense, ...).
        budget: fraction of the dense cost asked for (MACs, unless ``cost`` says latency).
        align: every pruned width is a multiple of this.
        dense_macs: MACs of the dense model at batch 1.
        pruned_macs: MACs of the pruned model at batch 1 (≤ budget × dense_macs under a MAC budget).
        blocks: one BlockPlan per transformer block.
        cost: what ``budget`` is a fraction of: ``macs``, or ``latency`` (a measured table, ``search.budget.cost``).
        cost_ratio: under a latency budget, the latency ratio the table predicts (None for MACs).
        cost_table: under a latency budget, the key of the table it was solved with.
    """

    model: str
    img_size: int
    method: str
    budget: float
    align: int
    dense_macs: int
    pruned_macs: int
    blocks: tuple[BlockPlan, ...]
    cost: str = "macs"
    cost_ratio: float | None = None
    cost_table: str | None = None

    @property
    def mac_ratio(self) -> float:
        return self.pruned_macs / self.dense_macs

    @property
    def removes_nothing(self) -> bool:
        """True when the plan keeps every head, channel and unit (any removal costs MACs)."""
        return self.pruned_macs >= self.dense_macs

    def widths(self) -> tuple[BlockWidths, ...]:
        return tuple(b.widths for b in self.blocks)

    def check(self, geometry: ModelGeometry, model_name: str | None = None) -> None:
        """Raise PlanError unless the plan fits ``geometry`` and its MAC figures are true."""
        if model_name is not None and model_name != self.model:
            raise PlanError(f"plan was made for {self.model}, not {model_name}; run without --plan to search anew")
        if len(self.blocks) != len(geometry.blocks):
            raise PlanError(f"plan has {len(self.blocks)} blocks, the model has {len(geometry.blocks)}")
        for i, block in enumerate(self.blocks):
            check_block(block, i, geometry)
        dense, pruned = model_macs(geometry), model_macs(geometry, self.widths())
        if (dense, pruned) != (self.dense_macs, self.pruned_macs):
            raise PlanError(
                f"plan records {self.pruned_macs}/{self.dense_macs} MACs but the model gives {pruned}/{dense}; "
                "was it made at another --img-size?"
            )

    @classmethod
    def dense(cls, model: str, img_size: int, geometry: ModelGeometry) -> "Plan":
        """The plan that keeps everything: budget 1.0 goes through the same path as any other."""
        blocks = tuple(
            BlockPlan(
                heads=tuple(range(g.attention.num_heads)),
                qk=(tuple(range(g.attention.qk_dim)),) * g.attention.num_heads,
                v=(tuple(range(g.attention.v_dim)),) * g.attention.num_heads,
                mlp=tuple(range(g.mlp_hidden)),
            )
            for g in geometry.blocks
        )
        macs = model_macs(geometry)
        return cls(model, img_size, "dense", 1.0, 1, macs, macs, blocks)

    def to_dict(self) -> dict[str, Any]:
        data = {"format": FORMAT, "version": VERSION, **asdict(self)}
        if self.cost == "macs":  # a MAC plan's file stays what it always was
            for key in ("cost", "cost_ratio", "cost_table"):
                del data[key]
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Plan":
        if data.get("format") != FORMAT or data.get("version") not in READABLE_VERSIONS:
            readable = " or ".join(f"v{v}" for v in READABLE_VERSIONS)
            raise PlanError(f"not a {FORMAT} {readable} file")
        try:
            blocks = tuple(
                BlockPlan(
                    heads=tuple(int(h) for h in b["heads"]),
                    qk=tuple(tuple(int(c) for c in row) for row in b["qk"]),
                    v=tuple(tuple(int(c) for c in row) for row in b["v"]),
                    mlp=tuple(int(u) for u in b["mlp"]),
                )
                for b in data["blocks"]
            )
            return cls(
                model=str(data["model"]),
                img_size=int(data["img_size"]),
                method=str(data["method"]),
                budget=float(data["budget"]),
                align=int(data["align"]),
                dense_macs=int(data["dense_macs"]),
                pruned_macs=int(data["pruned_macs"]),
                blocks=blocks,
                cost=str(data.get("cost", "macs")),
                cost_ratio=None if data.get("cost_ratio") is None else float(data["cost_ratio"]),
                cost_table=None if data.get("cost_table") is None else str(data["cost_table"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise PlanError(f"plan file is malformed ({type(exc).__name__}: {exc})") from None

    @classmethod
    def load(cls, path: Path) -> "Plan":
        """Read a plan file, with errors that say what is wrong with it."""
        path = Path(path)
        if not path.is_file():
            raise PlanError(f"plan file {path} does not exist; give the path of a plan.json written by an earlier run")
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise PlanError(f"plan file {path} is not valid JSON ({exc}); re-run the search without --plan") from None
        if not isinstance(data, dict):
            raise PlanError(f"plan file {path} is not a JSON object")
        try:
            return cls.from_dict(data)
        except PlanError as exc:
            raise PlanError(f"plan file {path}: {exc}") from None
