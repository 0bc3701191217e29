"""Auxiliary training objectives that are optimisation flags (Koopman, physics-informed)."""
