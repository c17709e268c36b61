"""The pruning methods: how what to keep is chosen, each ending in the same Plan.

``registry`` names them (acp, magnitude, random, dsp, dsp+acp, head-magnitude). Measuring:
``activations`` (what each block computes), ``importance`` (scores), ``similarity``. The learned
searches: ``acp`` (channel indicators, initialised by ``acp_init``) and ``dsp`` (head logits), over
``gates``, trained by ``gate_loop`` with ``gate_optim``, distilled from the dense model
(``distill``); ``heads`` chooses whole heads; ``baselines`` runs Torch-Pruning for comparison.
"""
