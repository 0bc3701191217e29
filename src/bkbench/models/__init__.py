"""Model registry: ``build_model(name, vocab_size, **config)``."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from .common import LanguageModel
from .dropout import assign_dropout_sites
from .gla import GLAConfig, GLALM
from .lstm import LSTMConfig, LSTMLM
from .resnet_bk import ResNetBKConfig, ResNetBKLM
from .transformer import TransformerConfig, TransformerLM

MODELS: dict[str, tuple[type, Callable[[Any], LanguageModel]]] = {
    "transformer": (TransformerConfig, TransformerLM),
    "resnet_bk": (ResNetBKConfig, ResNetBKLM),
    # peer baselines (not in the default three-run benchmark)
    "gla": (GLAConfig, GLALM),
    "lstm": (LSTMConfig, LSTMLM),
}


def available_models() -> list[str]:
    return list(MODELS)


def build_model(name: str, vocab_size: int, **config: Any) -> LanguageModel:
    """Build model ``name`` (a key of MODELS) for a vocabulary of ``vocab_size``.

    Unknown config keys are an error rather than silently ignored.
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(MODELS)}")
    config_cls, model_cls = MODELS[name]
    known = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(config) - known)
    if unknown:
        raise ValueError(f"unknown config field(s) for {name}: {', '.join(unknown)}")
    if not isinstance(vocab_size, int) or vocab_size < 1:
        raise ValueError(f"vocab_size must be a positive integer, got {vocab_size!r}")
    return assign_dropout_sites(model_cls(config_cls(vocab_size=vocab_size, **config)))


__all__ = ["build_model", "available_models", "LanguageModel", "TransformerConfig", "TransformerLM",
           "ResNetBKConfig", "ResNetBKLM", "GLAConfig", "GLALM", "LSTMConfig", "LSTMLM"]
