"""Aggregation only: thin additions on top of Flower's own strategies."""
