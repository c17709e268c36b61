"""The quality bench's MAC-budget row of equal measured latency, and the latency figures of a row.

A latency-budget plan and a MAC-budget plan are compared fairly only at equal latency. The MAC
budget that gives the latency row's measured latency is not known in advance (it depends on the
shape the search finds), so it is found by measurement: start at the latency row's MAC ratio,
measure, and scale the budget once by the latency missed (latency is close to proportional to
MACs near a working point). The row is the last run (its file is the one on disk); every try's
budget and measured latency go into the report under ``equal_latency_tries``.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any

from rich.console import Console

from exporter.pipeline import RunConfig, run

TRIES = 2


def latency_summary(report: dict[str, Any]) -> dict[str, Any]:
    """A bench row's latency figures: predicted and measured ratio on the target, and which budget it had."""
    section = report.get("latency_model")
    if not section:
        return {}
    return {"budget_kind": "latency" if section.get("cost") == "latency" else "MACs",
            "latency_predicted": section.get("predicted_ratio"), "latency_measured": section.get("measured_ratio"),
            "latency_noise": section.get("noise"), "fidelity": _fidelity(report.get("fidelity"))}


def _fidelity(fidelity: dict[str, Any] | None) -> str | None:
    if not fidelity:
        return None
    keys = ("feature_cosine", "knn_agreement", "relation_agreement", "top1_agreement", "mean_kl")
    return ", ".join(f"{k} {fidelity[k]:.3f}" for k in keys if isinstance(fidelity.get(k), (int, float)))


def equal_latency_run(cfg: RunConfig, twin: dict[str, Any], console: Console) -> dict[str, Any]:
    """Run ``cfg`` under the MAC budget whose measured latency equals ``twin``'s (the latency row's result).

    ``cfg`` must name a ``target_runtime`` so that the run measures its latency on the same target.
    """
    if cfg.latency_runs <= 0 or twin.get("latency_measured") is None:
        raise ValueError("an equal-latency row needs measured latencies: give it and its twin latency_runs > 0 "
                         "and a target_runtime")
    goal = twin["latency_measured"]
    budget = min(1.0, twin["mac_ratio"])
    tries: list[dict[str, float]] = []
    report: dict[str, Any] = {}
    for _ in range(TRIES):
        report = run(replace(cfg, budget=round(budget, 4), latency_budget=None), console)
        measured = report["latency_model"]["measured_ratio"]
        tries.append({"mac_budget": round(budget, 4), "latency_measured": measured})
        if abs(measured - goal) <= max(report["latency_model"]["noise"], 0.01):
            break
        budget = min(1.0, budget * goal / measured)
    report["equal_latency_tries"] = tries
    return report
