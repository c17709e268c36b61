"""FLatten (focused linear attention) in one place: the module, its attention kind, the models built on it.

``attention`` is the torch module; ``kind`` is its attention kind (how search and surgery read and
cut it); ``deit`` registers the FLatten DeiT models with timm; ``dinov2`` builds ``flatten_dinov2_s``
from the bundled DINOv2 weights and the trained parameters in ``weights/``; ``distill`` trains those
parameters block by block, and ``train`` is the command that does it
(``python -m search.models.flatten.train``).

Importing any of it registers the kind, so a FLatten module is never met before its kind is known.
"""
from __future__ import annotations

from search.models.flatten import kind as _kind  # noqa: F401  (registers the FLatten attention kind)
