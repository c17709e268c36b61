"""Everything up to the Plan, in rooms that follow the data flow.

models (a name → a dense model with weights; FLatten in ``models/flatten``) → images (what it runs
on) → attention, families (how a model is read and cut; ``cut`` holds what a block keeps and the
slicing primitives) → budget (what widths cost, the solver, the Plan) → methods (choosing what to
keep). ``core`` is the bottom layer all of them, and ``exporter``, use. Nothing here imports
``exporter``.
"""
