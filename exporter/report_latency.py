"""The report's latency-model lines: target, table, predicted against measured, additivity, correction.

Rendered by ``exporter.report`` when the report has a ``latency_model`` section (a run with
``--latency-budget`` or ``--target-runtime``); kept here so the report module only calls it.
"""
from __future__ import annotations

from typing import Any

from exporter.machine import describe_cpu


def latency_model_lines(section: dict[str, Any] | None) -> list[str]:
    """Markdown bullet lines for ``report["latency_model"]`` (none when it is absent)."""
    if not section:
        return []
    target = section.get("target", {})
    budget = section.get("budget")
    lines = [f"- latency model: {target.get('label', '?')}"
             + (f" ({target['note']})" if target.get("note") else "")
             + f", table {'reused' if section.get('table_reused') else 'timed'} ({section.get('table_runs')} interleaved rounds), "
             f"align {section.get('align')}"]
    machine = target.get("machine")
    if machine:
        lines.append(f"  - machine: {describe_cpu(machine)}" + (f", GPU {machine['gpu']}" if machine.get("gpu") else ""))
    what = f"latency budget {budget:g}" if budget is not None else "MAC budget (latency predicted only)"
    measured = section.get("measured_ratio")
    lines.append(f"  - {what}: predicted ratio **{section['predicted_ratio']:.3f}**"
                 + ("" if measured is None else f", measured **{measured:.3f}** ± {section['noise']:.3f} "
                    f"({section.get('measured_by')}, {section.get('runs')} runs; dense {section['dense_ms']:.2f} ms, "
                    f"pruned {section['pruned_ms']:.2f} ms)"))
    additivity = section.get("additivity") or {}
    if "group_scale" in additivity:
        scales = ", ".join(f"{g} {k:.2f}" for g, k in additivity["group_scale"].items())
        lines.append(f"  - calibration: each group's predicted savings scaled to what a whole model cut in that group alone "
                     f"measured ({scales}); {additivity.get('checked_on', '?')} is the held-out check")
    for name, check in additivity.items():
        if not isinstance(check, dict) or "measured_ratio" not in check and "measured_ms" not in check:
            continue  # the calibration factors and what was checked, shown above
        if name == "dense":
            lines.append(f"  - additivity, dense: the parts sum to {check['parts_sum_ms']:.2f} ms, the whole graph measured "
                         f"{check['measured_ms']:.2f} ms (the difference is the table's fixed overhead)")
        else:
            role = "held-out check" if check.get("held_out") else "calibration"
            lines.append(f"  - additivity, {name} ({role}): measured ratio {check['measured_ratio']:.3f}; the parts sum to "
                         f"{check['parts_ratio']:.3f}, calibrated {check['calibrated_ratio']:.3f}")
    correction = section.get("correction")
    if correction:
        first = correction["first_round"]
        lines.append(f"  - correction round: the first plan measured {first['measured_ratio']:.3f} (predicted "
                     f"{first['predicted_ratio']:.3f}); re-planned with the solver aiming at {correction['solver_budget']:.4f}")
    if section.get("miss"):
        lines.append(f"  - **MISSED**: {section['miss']}")
    return lines


def summary_row(section: dict[str, Any] | None) -> tuple[str, str, str, str] | None:
    """A row for the terminal summary: predicted and measured latency ratio on the target."""
    if not section:
        return None
    measured = section.get("measured_ratio")
    return ("latency ratio (target)", f"predicted {section['predicted_ratio']:.3f}",
            "n/a" if measured is None else f"measured {measured:.3f}",
            "MISSED" if section.get("miss") else ("" if section.get("budget") is None else f"budget {section['budget']:g}"))
