"""Optimisation flags: the registry, the trainer hooks, and the flags that are not model layers.

``bkbench.flags.registry.REGISTRY`` lists every implemented flag; ``build_model(config,
vocab_size)`` builds a run's model with its flags applied and returns the :class:`FlagSet`
the trainer calls.
"""

from .base import Flag, FlagSet, build_model
from .registry import REGISTRY, FlagConfigError, FlagSpec

__all__ = ["Flag", "FlagSet", "build_model", "REGISTRY", "FlagSpec", "FlagConfigError"]
