"""Every timm model name through prune-export's architecture check, and every accepted one pruned in a tiny form.

The compatibility table (:mod:`exporter.bench.compat`) shows one example per family. This sweep backs
its claim for every name timm registers: each is built on the meta device and put through
:func:`search.models.load.check_architecture`, which must accept it or refuse it with a
:class:`search.core.errors.UserError` (one line, exit 2 in the CLI), never another exception. With
``--prune``, each accepted name is then built in the compatibility bench's tiny form (where its
constructor takes those overrides) and pruned, exported and checked like a table row.

    python -m exporter.bench.compat_sweep [--prune] [--checks compat_sweep.json] [--out artifacts/bench]

It takes minutes (about 0.2 s a name to check, 2 s a name to prune on a 2-core CPU), so it is a
bench, not a test.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import timm
import torch

from exporter.bench.compat import TINY, Family, try_family
from search.core.atomic import atomic_path
from search.core.errors import UserError


def check_name(name: str) -> tuple[str, str]:
    """(status, detail) of one timm name: ``accepted``, ``refused`` (the reason), ``unchecked`` or ``error``.

    ``unchecked``: timm cannot build it on the meta device, so the CLI checks it once built for
    real; ``error``: an exception that is not a UserError, which the CLI would show as an internal error.
    """
    from search.models.load import check_architecture

    try:
        checked = check_architecture(name)
    except UserError as exc:
        return "refused", str(exc).removeprefix(f"{name}: ").split("; ")[0]
    except Exception as exc:  # noqa: BLE001 - recorded
        return "error", f"{type(exc).__name__}: {exc}"
    return ("accepted", "") if checked else ("unchecked", "")


def _tiny_accepts(name: str) -> bool:
    """Whether ``name``'s constructor takes the tiny form's overrides (built on the meta device)."""
    try:
        with torch.device("meta"):
            timm.create_model(name, pretrained=False, **TINY)
    except Exception:  # noqa: BLE001
        return False
    return True


def sweep(prune: bool, previous: Path | None = None) -> dict[str, Any]:
    """Check every timm name (or take the checks of a ``previous`` sweep's JSON); with ``prune``, prune every
    accepted one whose constructor takes the tiny form."""
    names = timm.list_models()
    checks: dict[str, tuple[str, str]] = {}
    if previous is not None:
        checks = {n: (c["status"], c["detail"]) for n, c in json.loads(previous.read_text())["checks"].items()}
    for i, name in enumerate(names):
        if name in checks:
            continue
        checks[name] = check_name(name)
        if i % 100 == 0:
            print(f"{i}/{len(names)} {name}: {checks[name][0]}", flush=True)
    pruned: dict[str, dict[str, str]] = {}
    if prune:
        accepted = [n for n, (status, _) in checks.items() if status == "accepted"]
        with tempfile.TemporaryDirectory(prefix="sweep-") as tmp:
            for i, name in enumerate(accepted):
                if not _tiny_accepts(name):
                    pruned[name] = {"status": "no tiny form", "message": ""}
                    continue
                outcome = try_family(Family(name, name, True), Path(tmp) / str(i))
                pruned[name] = {"status": outcome.status, "message": outcome.message}
                print(f"prune {i + 1}/{len(accepted)} {name}: {outcome.status} {outcome.message[:120]}", flush=True)
    return {"checks": {n: {"status": s, "detail": d} for n, (s, d) in checks.items()}, "pruned": pruned}


def report(result: dict[str, Any], seconds: float, reused: Path | None = None) -> str:
    checks, pruned = result["checks"], result["pruned"]
    status = Counter(c["status"] for c in checks.values())
    reasons = Counter(c["detail"] for c in checks.values() if c["status"] == "refused")
    lines = [
        "# Every timm model name through the architecture check",
        "",
        f"`python -m exporter.bench.compat_sweep{' --prune' if pruned else ''}`, {seconds:.0f} s"
        f"{f' (the checks reused from {reused.name})' if reused else ''}, timm {timm.__version__}: "
        f"{len(checks)} names; {status['accepted']} accepted, {status['refused']} refused in one line, "
        f"{status['unchecked']} not buildable on the meta device (checked once built), {status['error']} other errors.",
        "",
        "| refusal (first clause) | names |",
        "|---|---:|",
    ]
    lines += [f"| {reason} | {count} |" for reason, count in reasons.most_common()]
    errors = [f"- `{n}`: {c['detail']}" for n, c in checks.items() if c["status"] == "error"]
    lines += ["", "## Errors other than a refusal", ""] + (errors or ["None."])
    if pruned:
        counts = Counter(p["status"] for p in pruned.values())
        lines += ["", "## Accepted names pruned in the tiny form", "",
                  ", ".join(f"{k}: {v}" for k, v in counts.most_common()) + ".", ""]
        lines += [f"- `{n}`: {p['status']}: {p['message']}" for n, p in pruned.items() if p["status"] not in ("supported", "no tiny form")]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prune", action="store_true", help="also prune every accepted name in the tiny form")
    parser.add_argument("--out", type=Path, default=Path("artifacts/bench"), help="folder for compat_sweep.md and .json")
    parser.add_argument("--checks", type=Path, default=None, help="reuse the checks of this compat_sweep.json")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    result = sweep(args.prune, args.checks)
    seconds = time.perf_counter() - start
    args.out.mkdir(parents=True, exist_ok=True)
    with atomic_path(args.out / "compat_sweep.md") as temp:
        Path(temp).write_text(report(result, seconds, args.checks))
    with atomic_path(args.out / "compat_sweep.json") as temp:
        Path(temp).write_text(json.dumps(result, indent=1) + "\n")
    bad = [n for n, c in result["checks"].items() if c["status"] == "error"]
    bad += [n for n, p in result["pruned"].items() if p["status"] == "failed"]
    print(f"{len(bad)} names ended in an error: {', '.join(bad[:20])}")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
