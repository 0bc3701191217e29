"""Optimisation flags: the registry, the set of active flags, and one module per flag.

``bkbench.flags.registry.REGISTRY`` lists every implemented flag; ``build_model(config,
vocab_size)`` builds a run's model with its flags applied and returns the :class:`FlagSet`
the trainer calls. Each flag's policy (its hooks and record) is ``bkbench.flags.<name>``; its
mechanism lives beside what it changes (``models/layers``, ``objectives``, ``compression``,
``data_selection``). The hook protocol is :mod:`bkbench.hooks`.
"""

from ..errors import FlagConfigError
from ..hooks import Flag
from .base import FlagSet, build_model
from .registry import REGISTRY, FlagSpec

__all__ = ["Flag", "FlagSet", "build_model", "REGISTRY", "FlagSpec", "FlagConfigError"]
