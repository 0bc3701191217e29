"""Layers that the structural optimisation flags put into a model (one module per flag)."""
