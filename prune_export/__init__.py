"""prune-export from Python: prune a timm vision transformer you hold, keep the pruned model, export it.

    import prune_export

    model = prune_export.load_model("vit_small_patch14_dinov2", checkpoint="my_10_class.pth")
    result = prune_export.prune(model, budget=0.63, data="train/", output="model.onnx")
    result.model          # the pruned torch module, reweights folded: fine-tune it in your own loop
    result.plan           # what was kept, per block (a Plan)
    result.report         # the same fields as model.json
    # ... fine-tune result.model in your own loop ...
    prune_export.save(result, "pruned.pt")   # or use model.pt, which every run writes
    again = prune_export.load_pruned("pruned.pt")
    prune_export.export(result, "tuned.onnx")   # validated, against the dense model it was pruned from

The command line (``prune-export NAME --budget 0.63 -o model.onnx``) runs the same pipeline: these
functions build the same frozen run configuration and call the same stages.
"""
from __future__ import annotations

from prune_export.api import PruneResult, export, load_model, load_pruned, prune, save

__all__ = ["PruneResult", "export", "load_model", "load_pruned", "prune", "save"]
