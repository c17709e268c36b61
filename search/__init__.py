"""Everything up to the Plan: models and weights, data, MAC counting, importance, width allocation."""
