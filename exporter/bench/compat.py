"""Which timm vision transformer families prune-export supports, shown by running each one.

Every family in :data:`FAMILIES` is tried the way a user would meet it, in seconds:

- First its real model name goes through the architecture check the CLI makes before any weights
  (:func:`search.models.load.check_architecture`, on the meta device, so a full-size model costs
  nothing). A family prune-export cannot prune must be refused there: the bench then runs the CLI
  itself on that name (``prune-export NAME --random-init -o …``) and records its exit code and its
  one-line message.
- A family that passes is built in a tiny form (timm's constructor takes the depth, width, heads
  and image size: :data:`TINY`), given a magnitude plan at 0.63 of the dense MACs, cut, exported,
  its MACs counted in the ONNX graph (they must equal the analytic count and stay under the
  budget), and its graph run in ONNX Runtime at batch 1 and 3 against the pruned PyTorch model.

Nothing may end in anything but one of these two outcomes: a failure of a supported family is
recorded as such, with its error, and fails the test that runs this bench. The README's
compatibility table is :func:`readme_table` of the outcomes; ``tests/test_compat.py`` checks that
the README holds exactly that table.

    python -m exporter.bench.compat [--out artifacts/bench] [--update-readme README.md]
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import timm
import torch

from search.core.atomic import atomic_path
from search.core.errors import UserError

BUDGET = 0.63
ALIGN = 4
TINY: dict[str, Any] = {"depth": 2, "embed_dim": 64, "num_heads": 4, "img_size": 32, "patch_size": 8}
"""The tiny form: 2 blocks of width 64 with 4 heads of 16, a 4×4 patch grid at 32 px."""
WEIGHT_STD = 0.1
"""Every weight of a tiny form is drawn from N(0, WEIGHT_STD²), so that every branch shows in its output."""
README_START = "<!-- compat table: python -m exporter.bench.compat --update-readme README.md -->"
README_END = "<!-- end of compat table -->"


@dataclass(frozen=True)
class Family:
    """One family of timm models, as the compatibility table lists it.

    Attributes:
        family: the family's name in words.
        example: a real timm model name of the family (what a user types).
        supported: whether prune-export is meant to prune it (the bench checks it does or refuses it).
        tiny: constructor overrides on top of :data:`TINY` for this family's tiny form.
        note: what sets the family apart, for the table.
    """

    family: str
    example: str
    supported: bool
    note: str = ""
    tiny: dict[str, Any] = field(default_factory=dict)


FAMILIES: tuple[Family, ...] = (
    Family("ViT (class token, absolute position embedding)", "vit_small_patch16_224", True),
    Family("DeiT", "deit_tiny_patch16_224", True),
    Family("DeiT distilled", "deit_small_distilled_patch16_224", True, "class and distillation tokens, two heads"),
    Family("DeiT-III", "deit3_small_patch16_224", True, "class token after the position embedding, layer scale"),
    Family("DINOv2", "vit_small_patch14_dinov2", True, "layer scale"),
    Family("DINOv2 with registers", "vit_small_patch14_reg4_dinov2", True, "4 register tokens"),
    Family("FlexiViT", "flexivit_small", True, "class token after the position embedding"),
    Family("CLIP image tower", "vit_base_patch16_clip_224", True, "pre-norm"),
    Family("SigLIP", "vit_base_patch16_siglip_224", True, "attention-pool head, left dense"),
    Family("SigLIP, average pooled", "vit_base_patch16_siglip_gap_224", True, "no class token"),
    Family("ViT, average pooled", "vit_medium_patch16_gap_256", True, "no class token"),
    Family("ViT with registers, average pooled", "vit_medium_patch16_reg4_gap_256", True, "registers, no class token"),
    Family("ViT, residual post-norm", "vit_base_patch16_rpn_224", True, "ResPostBlock"),
    Family("ViT with RMSNorm", "test_vit4", True, "timm's RmsNorm, exported in opset-17 ops"),
    Family("FLatten DeiT", "flatten_deit_s", True, "focused linear attention in the first half"),
    Family("BEiT, BEiT v2", "beit_base_patch16_224", True, "relative position bias, q/v biases"),
    Family("ViT with relative position", "vit_relpos_small_patch16_224", False),
    Family("EVA-02", "eva02_small_patch14_224", False, "RoPE, SwiGLU"),
    Family("ViT with RoPE", "vit_small_patch16_rope_224", False),
    Family("DINOv3", "vit_small_patch16_dinov3", False),
    Family("ViT, parallel blocks", "vit_small_patch16_18x2_224", False),
    Family("ViT, parallel scaling blocks", "vit_base_patch16_xp_224", False),
    Family("DINOv2 giant (SwiGLU MLP)", "vit_giant_patch14_dinov2", False),
    Family("ViT hybrid (ResNet stem)", "vit_small_r26_s32_224", False),
    Family("NaFlexViT", "naflexvit_base_patch16_gap", False),
    Family("CaiT", "cait_xxs24_224", False, "class attention"),
    Family("XCiT", "xcit_nano_12_p16_224", False, "cross-covariance attention"),
    Family("Swin", "swin_tiny_patch4_window7_224", False, "windowed attention, stages"),
)


@dataclass(frozen=True)
class Outcome:
    """What happened to one family.

    Attributes:
        family: the family tried.
        status: ``supported`` (pruned, exported, parity passed), ``refused`` (one-line refusal,
            exit 2, before any work) or ``failed`` (anything else: the bench's error).
        message: the refusal's line, or the failure's error; empty when supported.
        exit_code: the CLI's exit code for a refused family.
        figures: for a supported family, the tiny form's MAC ratios and parity.
    """

    family: Family
    status: str
    message: str = ""
    exit_code: int | None = None
    figures: dict[str, Any] = field(default_factory=dict)

    @property
    def as_expected(self) -> bool:
        return self.status == ("supported" if self.family.supported else "refused")

    @property
    def reason(self) -> str:
        """The refusal's reason, short: its first clause, without the model name the CLI puts first."""
        text = self.message.removeprefix("error:").strip().removeprefix(f"{self.family.example}:").strip()
        return text.split("; ")[0]


def _cli_refusal(name: str, work: Path) -> tuple[int, str]:
    """Run ``prune-export NAME --random-init`` in-process; its exit code and its output's lines joined."""
    from typer.testing import CliRunner

    from exporter.cli import app

    result = CliRunner().invoke(app, [name, "--random-init", "-o", str(work / "refused.onnx"), "--latency-runs", "0"])
    return result.exit_code, result.output.strip()


def _prune_tiny(family: Family, work: Path) -> dict[str, Any]:
    """Build the tiny form, prune it at :data:`BUDGET` by magnitude, export and check it; its figures."""
    from exporter.onnx_export import export_onnx
    from exporter.onnx_macs import count_onnx_macs
    from exporter.surgery import apply_plan
    from exporter.parity import check_parity
    from search.budget.allocate import SolverConfig, make_plan
    from search.families import family_of, prepare
    from search.methods.importance import magnitude_scores
    from search.budget.macs import describe, model_macs

    torch.manual_seed(0)
    model = timm.create_model(family.example, pretrained=False, **{**TINY, **family.tiny}).eval()
    with torch.no_grad():  # timm's inits scale layer scales by 1e-5 and heads by 1e-3: the blocks would hide from parity
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * WEIGHT_STD)
    model = prepare(model)
    geometry = describe(model)
    plan = make_plan(geometry, magnitude_scores(model), SolverConfig(BUDGET, align=ALIGN), model=family.example,
                     img_size=TINY["img_size"], method="magnitude")
    pruned = apply_plan(model, plan, geometry)
    size = (3, TINY["img_size"], TINY["img_size"])
    dense_path, pruned_path = export_onnx(model, work / "dense.onnx", size), export_onnx(pruned, work / "pruned.onnx", size)
    graph_dense, graph_pruned = count_onnx_macs(dense_path), count_onnx_macs(pruned_path)
    analytic_pruned = model_macs(describe(pruned))
    if (graph_dense, graph_pruned) != (plan.dense_macs, analytic_pruned):
        raise AssertionError(f"graph MACs {graph_dense}, {graph_pruned} differ from the analytic count "
                             f"{plan.dense_macs}, {analytic_pruned}")
    if graph_pruned > BUDGET * graph_dense:
        raise AssertionError(f"graph MAC ratio {graph_pruned / graph_dense:.4f} is above the budget {BUDGET}")
    inputs = torch.randn(4, *size, generator=torch.Generator().manual_seed(1))
    classifier = family_of(model).classes(model) > 0
    parity = {batch: check_parity(pruned_path, pruned, inputs[:batch], classifier, batch_size=batch)
              for batch in (1, 3)}
    return {
        "tokens": geometry.tokens, "blocks": len(geometry.blocks), "dense_macs": graph_dense, "pruned_macs": graph_pruned,
        "graph_ratio": graph_pruned / graph_dense, "analytic_equals_graph": True,
        "max_abs_diff": {str(b): p.max_abs_diff for b, p in parity.items()},
    }


def try_family(family: Family, work: Path) -> Outcome:
    """Refuse ``family`` as the CLI would, or prune its tiny form end to end; never raises."""
    from search.models.load import check_architecture

    work.mkdir(parents=True, exist_ok=True)
    try:
        check_architecture(family.example)
    except UserError:
        code, output = _cli_refusal(family.example, work)
        one_line = len(output.splitlines()) == 1 and output.startswith("error:")
        status = "refused" if code == 2 and one_line else "failed"
        return Outcome(family, status, output, exit_code=code)
    except Exception as exc:  # noqa: BLE001 - the bench records every other failure as one
        return Outcome(family, "failed", f"{type(exc).__name__}: {exc}")
    try:
        return Outcome(family, "supported", figures=_prune_tiny(family, work))
    except Exception as exc:  # noqa: BLE001
        return Outcome(family, "failed", f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")


def run(families: Sequence[Family] = FAMILIES, on_done: Callable[[Outcome], None] | None = None) -> list[Outcome]:
    """Try every family in a scratch folder; ``on_done`` sees each outcome as it comes."""
    outcomes = []
    with tempfile.TemporaryDirectory(prefix="compat-") as tmp:
        for i, family in enumerate(families):
            outcome = try_family(family, Path(tmp) / str(i))
            outcomes.append(outcome)
            if on_done is not None:
                on_done(outcome)
    return outcomes


def _verdict(outcome: Outcome) -> str:
    if outcome.status == "supported":
        return "yes"
    if outcome.status == "refused":
        return f"no: {outcome.reason}"
    return f"FAILED: {outcome.message}"


def readme_table(outcomes: Sequence[Outcome]) -> str:
    """The compatibility table the README holds: family, example name, supported or the reason not."""
    rows = ["| family | example | prunes? |", "|---|---|---|"]
    for o in outcomes:
        family = o.family.family + (f" ({o.family.note})" if o.family.note else "")
        rows.append(f"| {family} | `{o.family.example}` | {_verdict(o)} |")
    return "\n".join(rows)


def report(outcomes: Sequence[Outcome], seconds: float) -> str:
    """``compat.md``: how the table was made, the table, and the tiny forms' figures."""
    tiny = ", ".join(f"{k}={v}" for k, v in TINY.items())
    lines = [
        "# Compatibility: timm vision transformer families",
        "",
        f"Produced by `python -m exporter.bench.compat` in {seconds:.0f} s. A family that prune-export cannot prune is "
        "refused by the architecture check before any weights are read: the CLI run on its real name "
        f"(`prune-export NAME --random-init -o …`) exits with code 2 and one line. A supported family is built in a tiny "
        f"form ({tiny}, every weight drawn from N(0, {WEIGHT_STD}²)), pruned by magnitude at {BUDGET} of the dense MACs (align {ALIGN}), exported, "
        "its MACs counted in the graph (equal to the analytic count) and run in ONNX Runtime at batch 1 and 3 against "
        "the pruned PyTorch model.",
        "",
        readme_table(outcomes),
        "",
        "## Tiny forms of the supported families",
        "",
        "| example | tokens | graph MAC ratio | parity max abs diff, batch 1 / 3 |",
        "|---|---:|---:|---|",
    ]
    for o in outcomes:
        if o.status == "supported":
            f = o.figures
            lines.append(f"| `{o.family.example}` | {f['tokens']} | {f['graph_ratio']:.4f} | "
                         f"{f['max_abs_diff']['1']:.1e} / {f['max_abs_diff']['3']:.1e} |")
    lines += ["", "## Refusals, as the CLI prints them", ""]
    lines += [f"- `{o.family.example}` (exit {o.exit_code}): {o.message}" for o in outcomes if o.status == "refused"]
    failed = [o for o in outcomes if not o.as_expected]
    if failed:
        lines += ["", "## Not as expected", ""] + [f"- `{o.family.example}`: {o.status}: {o.message}" for o in failed]
    return "\n".join(lines) + "\n"


def update_readme(readme: Path, table: str) -> bool:
    """Replace the table between the README's compat markers; True when the file changed."""
    text = readme.read_text()
    start, end = text.index(README_START) + len(README_START), text.index(README_END)
    new = text[:start] + "\n" + table + "\n" + text[end:]
    if new == text:
        return False
    with atomic_path(readme) as temp:
        Path(temp).write_text(new)
    return True


def readme_block(readme: Path) -> str:
    """The table the README holds between its compat markers."""
    text = readme.read_text()
    return text[text.index(README_START) + len(README_START) : text.index(README_END)].strip()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("artifacts/bench"), help="folder for compat.md and compat.json")
    parser.add_argument("--update-readme", type=Path, default=None, help="rewrite this README's compatibility table")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    outcomes = run(on_done=lambda o: print(f"{o.family.example}: {o.status} {o.reason if o.status != 'supported' else ''}", flush=True))
    seconds = time.perf_counter() - start
    args.out.mkdir(parents=True, exist_ok=True)
    with atomic_path(args.out / "compat.md") as temp:
        Path(temp).write_text(report(outcomes, seconds))
    with atomic_path(args.out / "compat.json") as temp:
        Path(temp).write_text(json.dumps([asdict(o) for o in outcomes], indent=2) + "\n")
    if args.update_readme is not None:
        update_readme(args.update_readme, readme_table(outcomes))
    unexpected = [o for o in outcomes if not o.as_expected]
    for o in unexpected:
        print(f"NOT AS EXPECTED: {o.family.example}: {o.status}: {o.message}")
    return 1 if unexpected else 0


if __name__ == "__main__":
    raise SystemExit(main())
