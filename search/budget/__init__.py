"""What a model costs and the plan that fits a budget.

``macs`` reads a model's geometry and counts its MACs at any kept widths; ``cost`` prices widths in
MACs or in a measured ``latency_table``; ``allocate`` shares kept widths out across blocks to meet a
budget; ``plan`` is the Plan, the file that records what every block keeps and that surgery cuts.
"""
