"""Optimisation flags: the registry, the trainer hooks, and the flags that are not model layers.

``bkbench.flags.registry.REGISTRY`` lists every implemented flag; ``build_model(config,
vocab_size)`` builds a run's model with its flags applied and returns the :class:`FlagSet`
the trainer calls.
"""

from .base import Flag, FlagSet, build_model

# The registry imports every flag's module, and those import .base (so this package): loaded
# on first use, importing any one flag module first (e.g. bkbench.compression.quantization)
# cannot meet a half-initialised module.
_FROM_REGISTRY = ("REGISTRY", "FlagConfigError", "FlagSpec")


def __getattr__(name: str):
    if name in _FROM_REGISTRY:
        from . import registry
        return getattr(registry, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["Flag", "FlagSet", "build_model", "REGISTRY", "FlagSpec", "FlagConfigError"]
