"""What a cut is made of: the kept widths and indices of a block, and the primitives that slice a layer.

The bottom of the pruning stack, below the attention kinds and model families, which slice their
modules with ``slicing`` following a block's plan.
"""
