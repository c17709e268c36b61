"""The Markdown report and the terminal table lead with what was kept, and carry what a person reads from the JSON."""
from __future__ import annotations

import io

from rich.console import Console

from exporter.report_text import markdown, print_summary


def _report(**sections) -> dict:
    parity = {"num_samples": 16, "inputs": "150 search + 150 held-out images from .cache/fashion-mnist/train30",
              "max_abs_diff": 5.5e-6, "min_cosine": 1.0, "top1_agreement": None}
    latency = [{"provider": "CPUExecutionProvider", "batch": 1, "threads": 2, "runs": 20,
                "median_ms": {"dense": 22.2, "pruned": 15.5}, "ratio": 0.698}]
    blocks = [{"block": 0, "heads": 6, "qk": 32, "v": 48, "mlp": 544, "dense": {"heads": 6, "qk": 64, "v": 64, "mlp": 1536}}]
    report = {
        "model": {"name": "dinov2_s", "timm_name": "vit_small_patch14_dinov2", "weights": "bundled:DINOv2", "random_weights": False,
                  "img_size": 112},
        "plan": {"method": "acp", "budget": 0.63, "align": 8, "per_head_indices": False, "path": None},
        "search": {"method": "acp", "device": "cpu", "ranks": 1, "steps": 40, "indicator": "free", "widths": "greedy",
                   "gate_optimiser": "adam", "similarity": True, "attn_init": True,
                   "images": {"search": 256, "held_out": 200, "seed": 0}},
        "recovery": {"metric": "relation_agreement", "history": [[0, 0.52], [50, 0.61]], "best_step": 50, "best_value": 0.61,
                     "steps": 50, "lr": 1e-4, "batch_size": 16, "reweight": True},
        "images": parity["inputs"],
        "accuracy": {"metric": "k-NN top-1 (k=20, T=0.07)", "held_out_images": 150, "dense": 0.5067, "pruned": 0.6133},
        "macs": {"dense": 1.434e9, "pruned": 0.903e9, "ratio": 0.6298, "onnx_dense": 1.434e9, "onnx_pruned": 0.903e9,
                 "onnx_ratio": 0.6298},
        "params": {"dense": 21.56e6, "pruned": 13.54e6, "ratio": 0.628},
        "blocks": blocks, "parity": parity, "latency": latency,
        "machine": {"cpu_model": "AMD EPYC", "cpu_count": 2, "onnxruntime": "1.31.1", "torch": "2.14.1", "threads": 2},
        "preprocessing": {"input_size": [3, 112, 112], "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
                          "interpolation": "bicubic", "crop_pct": 1.0},
        "onnx": {"path": "artifacts/demo/dinov2_s_0.63.onnx", "opset": 17, "input": "input", "output": "output", "dynamic_batch": True},
        "artifact": {"target": "portable", "precision": "fp32", "quantize": "none", "quantize_mode": None, "parity": {}},
        "work": {"path": "artifacts/demo/dinov2_s_0.63.work", "bytes": 397_000_000, "kept": False},
        "stage_seconds": {"plan": 134.1, "surgery and recovery": 195.7},
        "wall_seconds": 341.0,
    }
    report.update(sections)
    return report


FIDELITY = {"images": 150, "inputs": "held-out Fashion-MNIST", "feature_cosine": 0.981, "knn_agreement": 0.913,
            "relation_agreement": 0.874}
EFFORT = {"name": "quick", "reason": "2 CPU cores, no GPU", "search_steps": 20, "finetune_steps": 30, "search_images": 128,
          "batch_size": 16}
LATENCY_MODEL = {"target": {"label": "ONNX Runtime CPU, fp32, batch 1, 2 threads"}, "table_reused": False, "table_runs": 15,
                 "align": 8, "budget": 0.7, "predicted_ratio": 0.71, "measured_ratio": 0.698, "noise": 0.012,
                 "measured_by": "the run's latency stage", "runs": 20, "dense_ms": 10.0, "pruned_ms": 6.98}


def test_markdown_leads_with_what_was_kept_then_the_cost():
    md = markdown(_report(fidelity=FIDELITY))
    kept, cost, run = md.index("## What was kept"), md.index("## What it costs"), md.index("## The run")
    assert kept < cost < run
    head = md[kept:cost]
    assert "feature cosine **0.981**" in head and "k-NN agreement **0.913**" in head and "relation agreement **0.874**" in head
    assert "dense 0.5067, pruned **0.6133** (+10.7 points)" in head and "150 labelled held-out images" in head
    tail = md[cost:run]
    assert "ratio **0.698**" in tail and "input 3×112×112, search and recovery on cpu, wall time 5 min 41 s" in tail


def test_markdown_carries_what_a_person_reads_from_the_json():
    md = markdown(_report(fidelity=FIDELITY, effort=EFFORT, latency_model=LATENCY_MODEL,
                          warnings=["--img-size 100 is not a multiple of the 14 px patch"]))
    for needle in (
        "effort: quick (2 CPU cores, no GPU): search steps 20, recovery steps 30, search images 128, batch 16",
        "search: acp on cpu; steps 40, indicator free, widths greedy, gate optimiser adam",
        "recovery: 50 steps, lr 0.0001, batch 16, reweights on; held-out relation_agreement 0.5200 at step 0 → best 0.6100",
        "latency model: ONNX Runtime CPU, fp32, batch 1, 2 threads, table timed (15 interleaved rounds), align 8",
        "latency budget 0.7: predicted ratio **0.710**, measured **0.698** ± 0.012",
        "parity (ONNX Runtime vs PyTorch, 16 inputs",
        "machine: AMD EPYC, 2 usable CPUs (instruction sets not recorded), 2 inference threads, onnxruntime 1.31.1, torch 2.14.1",
        "preprocessing: RGB", "bicubic", "mean [0.485, 0.456, 0.406]",
        "ONNX: artifacts/demo/dinov2_s_0.63.onnx, opset 17", "prune-export info",
        "work folder: artifacts/demo/dinov2_s_0.63.work, 397 MB, removed after the run",
        "> warning: --img-size 100", "| surgery and recovery | 195.7 |", "| 0 | 6/6 | 32/64 | 48/64 | 544/1536 |",
    ):
        assert needle in md, needle


def test_markdown_without_the_optional_sections_says_what_was_not_measured():
    report = _report()
    for key in ("accuracy", "search", "recovery", "machine", "work", "wall_seconds", "stage_seconds", "onnx", "preprocessing"):
        report.pop(key)
    md = markdown(report)
    assert "not measured" in md and "## What it costs" in md and "input 3×112×112" in md


def test_the_terminal_table_leads_with_fidelity_and_accuracy():
    out = io.StringIO()
    print_summary(_report(fidelity=FIDELITY), Console(file=out, width=120))
    text = out.getvalue()
    assert "input 3×112×112, search and recovery on cpu, wall time 5 min 41 s" in text
    order = [text.index(s) for s in ("feature cosine to dense", "k-NN agreement to dense", "accuracy (150 held-out)",
                                      "GMACs", "params (M)", "ms CPU b1")]
    assert order == sorted(order)
    assert "+10.7 pts" in text and "×0.698" in text
