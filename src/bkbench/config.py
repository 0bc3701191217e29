"""Benchmark configuration: one dataclass that is the whole recipe of a run.

A run is fully described by a :class:`BenchmarkConfig`; the engine (``bkbench.train``,
``bkbench.benchmark``) reads nothing else. Configs come from presets, YAML files and
command-line overrides, and are validated before any work starts.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

from .errors import ConfigError, FlagConfigError
from .fields import variant_suffix
from .validation import check_config, check_run_name, load_config_file, short



def _flags():
    """The flag registry, imported on first use: its flag modules import torch, which
    ``bkbench --help`` and config errors should not wait for."""
    from .flags import registry
    return registry

ARCHITECTURES = ("transformer", "resnet_bk", "gla", "lstm")

# The twelve optimisation flags (docs/flags.md), in the seed's order. Which of them are
# implemented, where they apply and what they clash with is bkbench.flags.registry.REGISTRY;
# a flag that is not registered is refused, so that no flag can be on and do nothing.
OPTIMIZATION_FLAGS = (
    "use_analytic_gradient",
    "use_koopman",
    "use_physics_informed",
    "use_quantization",
    "use_pruning",
    "use_mixed_precision",
    "use_act",
    "use_multi_scale",
    "use_sparse_bk",
    "use_early_exit",
    "use_curriculum",
    "use_active_learning",
)


@dataclass
class BenchmarkConfig:
    """Everything that defines one benchmark run (model, data, training, measurement).

    ``model_name`` is the run's name (``transformer_baseline`` in the seed); ``architecture``
    says which model is built and is inferred from the name when left empty.
    """

    model_name: str = "transformer_baseline"
    architecture: str | None = None

    # model size (shared by all architectures so that comparisons are like for like)
    d_model: int = 64
    n_layers: int = 4
    n_seq: int = 128
    n_heads: int = 4
    dropout: float = 0.1
    tie_weights: bool = False

    # ResNet-BK layer (ignored by the Transformer)
    num_experts: int = 4
    top_k: int = 1
    bk_heads: int = 1
    bk_mode: str = "causal"
    v_max: float = 3.0
    bk_h0: float = -2.0
    bk_t: float = 1.0
    bk_energy: float = 0.0
    bk_eps: float = 1.0
    moe_balance_weight: float = 0.01

    # GLA peer (models/gla.py; ignored by the others)
    gla_chunk_size: int = 16
    gla_backend: str = "auto"

    # training
    batch_size: int = 32
    epochs: int = 5
    max_steps: int | None = None
    max_tokens: int | None = None
    # equal-compute budgets: stop when the counted FLOPs (steps x the step's counted FLOPs,
    # optimizer included) would exceed budget_flops, or when training time reaches
    # budget_seconds (the learning-rate schedule still follows the step budget above)
    budget_flops: float | None = None
    budget_seconds: float | None = None
    lr: float = 1e-3
    weight_decay: float = 0.01
    grad_clip: float = 0.5
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1
    seed: int = 42
    device: str = "auto"

    # evaluation
    eval_batch_size: int = 32
    eval_stride: int | None = None

    # data
    dataset: str = "wikitext-2"
    data_dir: str | None = None
    variant: str = "tokens"
    split_scheme: str = "official"
    tokenizer: str = "word"

    # durability and logging
    checkpoint_every: int = 0
    keep_checkpoints: int = 2
    tensorboard: bool = False

    # a run whose model fails the causality audit is refused unless this is set
    allow_noncausal: bool = False

    # the twelve optimisation flags (docs/flags.md)
    use_analytic_gradient: bool = False
    use_koopman: bool = False
    use_physics_informed: bool = False
    use_quantization: bool = False
    use_pruning: bool = False
    use_mixed_precision: bool = False
    use_act: bool = False
    use_multi_scale: bool = False
    use_sparse_bk: bool = False
    use_early_exit: bool = False
    use_curriculum: bool = False
    use_active_learning: bool = False
    # each registered flag's own settings, {short flag name: {setting: value}}, complete with
    # defaults; set them by flat names, e.g. koopman_weight (bkbench.flags.registry)
    flag_settings: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        try:
            self.flag_settings = _flags().resolve_settings(self.flag_settings)
        except FlagConfigError as exc:
            raise ConfigError(str(exc)) from None
        if self.architecture is None:
            for arch in ARCHITECTURES:
                if self.model_name.startswith(arch):
                    self.architecture = arch
                    break

    # --- derived views -------------------------------------------------------------------

    def model_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``bkbench.models.build_model`` (vocab size excluded)."""
        common = dict(d_model=self.d_model, n_layers=self.n_layers, n_seq=self.n_seq,
                      dropout=self.dropout, tie_weights=self.tie_weights)
        if self.architecture == "transformer":
            return dict(common, n_heads=self.n_heads)
        if self.architecture == "gla":
            return dict(common, n_heads=self.n_heads, chunk_size=self.gla_chunk_size,
                        backend=self.gla_backend)
        if self.architecture == "lstm":
            return common
        return dict(common, num_experts=self.num_experts, top_k=self.top_k,
                    bk_heads=self.bk_heads, bk_mode=self.bk_mode, v_max=self.v_max,
                    bk_h0=self.bk_h0, bk_t=self.bk_t, bk_energy=self.bk_energy,
                    bk_eps=self.bk_eps, moe_balance_weight=self.moe_balance_weight)

    def enabled_flags(self) -> list[str]:
        return [name for name in OPTIMIZATION_FLAGS if getattr(self, name)]

    def settings(self, flag: str):
        """The settings dataclass of ``flag`` (e.g. "use_koopman"), None if it has none."""
        return _flags().settings_of(self, flag)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "BenchmarkConfig":
        values = _flags().fold_flat_settings(values)
        unknown = set(values) - {f.name for f in fields(cls)}
        if unknown:
            raise ConfigError(_unknown_fields_message(sorted(unknown)))
        return cls(**{k: _coerce(k, v) for k, v in values.items()})

    @classmethod
    def from_preset(cls, name: str = "default", **overrides: Any) -> "BenchmarkConfig":
        """The validated config ``bkbench run --preset NAME --models RUN --<field> VALUE``
        would train: the preset, then the run's own settings (``model_name``, default
        ``transformer_baseline``; for the benchmark's runs, their architecture and flags),
        then ``overrides``. Overriding a model size or flag of one of the benchmark's runs
        renames it as the command line does (``resnet_bk_full-d_model128``)."""
        overrides = dict(overrides)
        model_name = overrides.pop("model_name", "transformer_baseline")
        if model_name in DEFAULT_RUNS:
            (config,) = build_run_configs(name, overrides=overrides, models=[model_name])
            return config
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
        return cls.from_dict({**PRESETS[name], **overrides, "model_name": model_name}).validate()

    def replace(self, **changes: Any) -> "BenchmarkConfig":
        return BenchmarkConfig.from_dict({**self.to_dict(), **changes})

    # --- validation ----------------------------------------------------------------------

    def validate(self) -> "BenchmarkConfig":
        """Raise :class:`ConfigError` for any value that cannot work; return self."""
        check_run_name(self.model_name)
        if self.architecture not in ARCHITECTURES:
            raise ConfigError(
                f"architecture {short(self.architecture)} (from model_name {short(self.model_name)}) is not "
                f"one of {', '.join(ARCHITECTURES)}; set architecture= or name the run "
                f"transformer_* or resnet_bk_*")
        if not self.model_name or any(c in self.model_name for c in "/\\ "):
            raise ConfigError(f"model_name {short(self.model_name)} must be a non-empty name without "
                              "spaces or slashes (it names the results file)")
        positive = ["d_model", "n_layers", "n_seq", "n_heads", "batch_size", "eval_batch_size",
                    "num_experts", "top_k", "bk_heads", "keep_checkpoints"]
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {short(value)}")
        for name in ("epochs", "warmup_steps", "checkpoint_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"{name} must be a non-negative integer, got {short(value)}")
        for name in ("max_steps", "max_tokens", "eval_stride"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ConfigError(f"{name} must be a positive integer or null, got {short(value)}")
        for name in ("budget_flops", "budget_seconds"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ConfigError(f"{name} must be a positive finite number or null, got {short(value)}")
        if self.epochs == 0 and self.max_steps is None and self.max_tokens is None:
            raise ConfigError("no training budget: set epochs >= 1, max_steps or max_tokens")
        if self.eval_stride is not None and self.eval_stride > self.n_seq:
            raise ConfigError(f"eval_stride ({self.eval_stride}) cannot exceed n_seq ({self.n_seq})")
        if self.architecture == "transformer" and self.d_model % self.n_heads:
            raise ConfigError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if self.architecture == "gla":
            _validate_gla(self)
        if self.top_k > self.num_experts:
            raise ConfigError(f"top_k ({self.top_k}) cannot exceed num_experts ({self.num_experts})")
        if self.bk_mode not in ("causal", "bidirectional"):
            raise ConfigError(f"bk_mode must be 'causal' or 'bidirectional', got {short(self.bk_mode)}")
        if not self.bk_eps > 0:
            raise ConfigError(f"bk_eps must be > 0 (the resolvent is bounded by 1/eps), got {self.bk_eps}")
        if not self.v_max > 0:
            raise ConfigError(f"v_max must be > 0, got {self.v_max}")
        for name in ("lr", "grad_clip"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be > 0, got {short(getattr(self, name))}")
        if self.lr > 1 and self.lr != float("inf"):   # inf: refused as not finite
            # AdamW moves each weight by about lr per step: above 1 the first step destroys
            # the initialisation and the run ends in NaN instead of in a message
            raise ConfigError(f"lr must be <= 1 (AdamW moves each weight by ~lr per step), "
                              f"got {short(self.lr)}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.weight_decay < 0 or self.moe_balance_weight < 0:
            raise ConfigError("weight_decay and moe_balance_weight must be >= 0")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.variant not in ("tokens", "raw"):
            raise ConfigError(f"variant must be 'tokens' or 'raw', got {short(self.variant)}")
        if self.split_scheme not in ("official", "proxy"):
            raise ConfigError(f"split_scheme must be 'official' or 'proxy', got {short(self.split_scheme)}")
        _check_data_choice(self)
        if self.device not in ("auto", "cpu") and not self.device.startswith("cuda"):
            raise ConfigError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {short(self.device)}")
        if self.data_dir is not None and not Path(self.data_dir).expanduser().is_dir():
            raise ConfigError(f"data_dir {short(self.data_dir)} does not exist or is not a directory; "
                              "point --data-dir at a folder holding the dataset's files (docs/data.md)")
        try:
            _flags().check_flags(self)
        except FlagConfigError as exc:
            raise ConfigError(str(exc)) from None
        check_config(self)
        return self


def _check_data_choice(config: "BenchmarkConfig") -> None:
    """The dataset, its form, tokenizer and split scheme go together (bkbench.corpora)."""
    from .corpora import release_for
    from .token_cache import parse_tokenizer
    try:
        kind, _ = parse_tokenizer(config.tokenizer)
        release = release_for(config.dataset, config.variant)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if kind not in release.tokenizers:
        raise ConfigError(f"{config.dataset} is read with the {' or '.join(release.tokenizers)} "
                          f"tokenizer only, not {short(config.tokenizer)}")
    if config.split_scheme == "proxy" and config.dataset != "wikitext-2":
        raise ConfigError(f"split_scheme proxy exists only for wikitext-2; use --split-scheme "
                          f"official with {config.dataset}")


def _validate_gla(config: "BenchmarkConfig") -> None:
    from .models.gla import GLAConfig
    from .ops.gla import BACKENDS, fla_available
    if config.gla_backend not in BACKENDS:
        raise ConfigError(f"gla_backend must be one of {', '.join(BACKENDS)}, "
                          f"got {config.gla_backend!r}")
    if not isinstance(config.gla_chunk_size, int) or config.gla_chunk_size < 1:
        raise ConfigError(f"gla_chunk_size must be a positive integer, got {config.gla_chunk_size!r}")
    if config.gla_backend == "fla":
        import torch
        if config.device == "cpu" or (config.device == "auto" and not torch.cuda.is_available()):
            raise ConfigError("gla_backend 'fla' runs on CUDA only; use --gla-backend torch "
                              "(or auto) on this device")
        if not fla_available():
            raise ConfigError("gla_backend 'fla' needs flash-linear-attention: "
                              "pip install 'bkbench[fla]', or use --gla-backend torch")
    key_dim = int(config.d_model * GLAConfig.expand_k)
    if config.d_model % config.n_heads or key_dim % config.n_heads or key_dim < config.n_heads:
        raise ConfigError(f"GLA needs d_model ({config.d_model}) and its key width "
                          f"{key_dim} (d_model/2) divisible by n_heads ({config.n_heads})")


def _coerce(name: str, value: Any) -> Any:
    """Check a value against the field's type; accept YAML's '1e-3' (a string) for floats."""
    if name == "flag_settings":
        return value  # checked field by field by the flag registry
    hint = typing.get_type_hints(BenchmarkConfig)[name]
    optional = type(None) in typing.get_args(hint)
    kind = next((a for a in typing.get_args(hint) if a is not type(None)), hint)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{name} cannot be null")
    if kind is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{name} must be true or false, got {short(value)}")
        return value
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name} must be an integer, got {short(value)}")
        return value
    if kind is float:
        try:
            return float(value) if not isinstance(value, bool) else _bad_float(name, value)
        except (TypeError, ValueError):
            _bad_float(name, value)
    if kind is str and not isinstance(value, str):
        raise ConfigError(f"{name} must be a string, got {short(value)}")
    return value


def _bad_float(name: str, value: Any):
    raise ConfigError(f"{name} must be a number, got {short(value)}")


def _unknown_fields_message(unknown: list[str]) -> str:
    known = [f.name for f in fields(BenchmarkConfig)] + list(_flags().settings_fields())
    parts = []
    for name in unknown:
        close = difflib.get_close_matches(name, known, n=1)
        parts.append(f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    return f"unknown config field(s): {', '.join(parts)}"


# --- presets ------------------------------------------------------------------------------

# The seed's benchmark: three runs sharing one training setup.
DEFAULT_RUNS: dict[str, dict[str, Any]] = {
    "transformer_baseline": {"architecture": "transformer"},
    "resnet_bk_baseline": {"architecture": "resnet_bk"},
    # "ResNet-BK Full (all optimizations)": every one of the twelve flags on
    "resnet_bk_full": {"architecture": "resnet_bk", **{flag: True for flag in OPTIMIZATION_FLAGS}},
}

# Peer baselines, run with --models gla_baseline,lstm_baseline or --models all.
PEER_RUNS: dict[str, dict[str, Any]] = {
    "gla_baseline": {"architecture": "gla"},
    "lstm_baseline": {"architecture": "lstm"},
}
ALL_RUNS: dict[str, dict[str, Any]] = {**DEFAULT_RUNS, **PEER_RUNS}

PRESETS: dict[str, dict[str, Any]] = {
    # the seed's sizes and budget
    "default": dict(d_model=64, n_layers=4, n_seq=128, n_heads=4, batch_size=32, epochs=5,
                    lr=1e-3, weight_decay=0.01, grad_clip=0.5, warmup_steps=20, seed=42),
    # a set-up check: all three models in under a minute on 2 CPU cores. Byte-level, because
    # evaluation always scores every token of the held-out splits, and with the word
    # vocabulary the LM head and softmax alone cost ~20 s of evaluation per model here.
    # the default's model and optimizer on UTF-8 bytes: with 256 outputs the LM head is a small
    # part of the forward (the word vocabulary makes it most of it), so the blocks - where the
    # architectures differ - carry the cost; windows of 256 bytes (~45 words), one epoch, about
    # the default's training tokens
    "bytes": dict(d_model=64, n_layers=4, n_seq=256, n_heads=4, batch_size=32, epochs=1,
                  lr=1e-3, weight_decay=0.01, grad_clip=0.5, warmup_steps=20, seed=42,
                  tokenizer="byte"),
    "smoke": dict(d_model=32, n_layers=3, n_seq=64, n_heads=2, batch_size=16, epochs=1,
                  max_steps=20, lr=3e-3, warmup_steps=2, eval_batch_size=256, seed=0,
                  num_experts=2, tokenizer="byte"),
}


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML config: a mapping of config fields, optionally with a ``runs`` mapping.

    ``runs`` maps run names to per-run overrides (like :data:`DEFAULT_RUNS`). The file's size,
    encoding, aliases and nesting are checked first (:func:`bkbench.validation.load_config_file`).
    """
    return load_config_file(path)


def build_run_configs(preset: str = "default", file_values: Mapping[str, Any] | None = None,
                      overrides: Mapping[str, Any] | None = None,
                      models: list[str] | None = None,
                      run_suffix: str | None = None) -> list[BenchmarkConfig]:
    """Assemble and validate the configs of one benchmark invocation.

    Precedence, lowest first: preset, YAML file, command-line overrides; per-run settings
    (the run's architecture and flags) sit between the shared values and the overrides.
    A run whose model size, architecture setting or flag an override changes is named
    ``<run>-<field><value>...`` (``bkbench.fields.variant_suffix``), or ``<run>-<run_suffix>``
    when ``run_suffix`` is given, so that a variant never replaces the original's files.
    """
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    file_values = dict(file_values or {})
    file_runs = file_values.pop("runs", None)
    runs = file_runs or DEFAULT_RUNS
    if not isinstance(runs, dict) or not runs:
        raise ConfigError("'runs' in the config file must map run names to settings")
    shared = {**PRESETS[preset], **file_values}
    if not file_runs and models:
        # without a file's runs, --models may also name the peers; "all" is all five runs
        runs = ALL_RUNS
        if models == ["all"]:
            models = list(ALL_RUNS)
    if models:
        missing = [m for m in models if m not in runs]
        if missing:
            raise ConfigError(f"unknown model(s) {', '.join(missing)}; this benchmark has "
                              f"{', '.join(runs)}")
        runs = {name: runs[name] for name in models}
    configs = []
    if run_suffix is not None and (not run_suffix or any(c in run_suffix for c in "/\\ ")):
        raise ConfigError(f"--run-suffix {run_suffix!r} must be a non-empty name without spaces "
                          "or slashes (it becomes part of the results file names)")
    order = [f.name for f in fields(BenchmarkConfig)]
    configs = []
    for name, run_values in runs.items():
        # the run's values before the overrides, coerced as the overrides are
        base = BenchmarkConfig.from_dict({**shared, **(run_values or {}), "model_name": name}).to_dict()
        suffix = (f"-{run_suffix}" if run_suffix is not None
                  else variant_suffix(base, overrides or {}, order))
        values = {**base, **(overrides or {}), "model_name": name + suffix}
        configs.append(BenchmarkConfig.from_dict(values).validate())
    return configs


def config_keys() -> set[str]:
    """Every name a config mapping may use: the fields and the flat flag-setting names."""
    return {f.name for f in fields(BenchmarkConfig)} | set(_flags().settings_fields())


__all__ = ["BenchmarkConfig", "ConfigError", "OPTIMIZATION_FLAGS", "config_keys", "PRESETS",
           "DEFAULT_RUNS", "PEER_RUNS", "ALL_RUNS",
           "ARCHITECTURES", "build_run_configs", "load_yaml"]
