"""Compensation after the cut: refit, in closed form, the layers that read a cut dimension.

A cut removes q/k and v channels and MLP units; what is kept can say much of what was removed.
From calibration images (the run's search images: the user's, or the built-in photographs) the
pruned model is repaired block by block, in order, each block fed by the already compensated
blocks before it:

1. **channels re-chosen** (``choice``): the plan's counts stay, but which q/k channels, v channels
   and MLP units are kept is chosen again, as those from which the refits below reproduce the
   target best (``search.cut.selection``: greedy Optimal Brain Surgeon by groups, one channel in
   every head at once). On dinov2_s at 112 px (acp plan at 0.63, 128 images) this took the
   compensated feature cosine from 0.874 to 0.930 and relation agreement from 0.62 to 0.84;
2. **logits** (kinds whose scores are q·k: softmax): the kept q rows are refitted so that q'·k'
   reproduces the dense scores (the kind's :meth:`~search.attention.base.AttentionKind.fit_logits`);
3. **output layer** (``proj``, the layer reweights fold into): refitted from the kept heads' merged
   outputs; then **fc1**'s kept rows to the dense pre-activations from the inputs the MLP now sees,
   and **fc2** from the kept hidden units.

The result carries the plan as compensated (its indices re-chosen), which the run saves and exports by.

Each refit is ridge least squares toward the sliced dense weights (``search.cut.least_squares``).
Where the family says how a layer reaches the residual stream (a per-channel scale,
``residual_scales``), the target is the **dense residual stream** after the branch, not the
branch's own output: then each fit also takes back the drift left by the blocks before it (a
probe here: cosine to dense 0.863 with the stream target, 0.82 with the branch's own output, and
k-NN 68.4 against 55.2). A block whose output came out farther from the dense block's than the
plain cut's is put back as cut, so compensation never makes a block worse on the calibration set.

The refitted layers are exactly those reweights fold into, so the reweights start as the identity
on top of the compensated weights, and the exported graph has the same shape as without it.
"""
from __future__ import annotations

from exporter.compensation.recording import token_weights
from exporter.compensation.repair import compensate
from exporter.compensation.results import BlockRepair, CompensationConfig, CompensationResult, rechosen

__all__ = ["BlockRepair", "CompensationConfig", "CompensationResult", "compensate", "rechosen", "token_weights"]
