"""The stages of a run, one module each, in the order they run.

config (the settings) → images → plan → recovery (surgery, distillation, folding) → export and
parity (``exporter.onnx_export``; ``runtimes``: parity and latency once per runtime of
``exporter.runtimes``) → artifact → report. ``cache`` holds the work directory every stage resumes
from; ``exporter.pipeline`` runs them in order.
"""
