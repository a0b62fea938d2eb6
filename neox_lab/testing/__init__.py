"""Equivalence testing as a product: strategies, model comparison reports, tolerances, a pytest plugin."""
