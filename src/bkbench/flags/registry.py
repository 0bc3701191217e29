"""The one list of optimisation flags: name -> where it applies, what it clashes with, its code.

Every ``use_*`` flag of :class:`~bkbench.config.BenchmarkConfig` that is implemented has one
:class:`FlagSpec` line in :data:`REGISTRY`. Config validation (``bkbench run``/``audit`` refuse
a flag that is not registered, does not apply to the run's architecture, or is combined with
an incompatible flag), ``--help``, the README table, ``docs/flags.md`` and the report all read
this list; nothing else decides whether a flag exists.

A flag's own hyperparameters live in a small dataclass in its module (``settings``). In a
config they are stored under ``flag_settings[<short name>]`` and are set, from the command
line or YAML, by flat names ``<short name>_<field>``: ``--koopman-weight 0.1`` or
``koopman_weight: 0.1``. :func:`settings_fields` lists those names.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from dataclasses import dataclass
from typing import Any, Mapping

from ..errors import FlagConfigError
from . import (act, active_learning, analytic_gradient, curriculum, early_exit, koopman,
               mixed_precision, multi_scale, physics_informed, pruning, quantization, sparse_bk)


@dataclass(frozen=True)
class FlagSpec:
    """One registered flag.

    ``flag_class`` implements the trainer hooks (:class:`bkbench.hooks.Flag`);
    ``settings`` is its hyperparameter dataclass (None: the flag has none); ``records`` says
    in a line what it writes under ``flags.<name>`` in the results.
    """

    name: str                              # the config field, "use_koopman"
    architectures: tuple[str, ...]         # the architectures it applies to
    module: Any                            # the module implementing it (its docstring = its doc)
    flag_class: type
    summary: str
    records: str
    settings: type | None = None
    incompatible: tuple[str, ...] = ()
    # (other flag, what the two do together): declared, documented and tested compositions
    compositions: tuple[tuple[str, str], ...] = ()

    @property
    def short(self) -> str:
        return self.name.removeprefix("use_")


REGISTRY: dict[str, FlagSpec] = {spec.name: spec for spec in (
    FlagSpec("use_analytic_gradient", ("resnet_bk",), analytic_gradient,
             analytic_gradient.AnalyticGradient,
             "BK-Core backward by the exact O(N) adjoint sweep instead of autograd through the "
             "recurrence",
             "backward path; BK-Core backward time with and without, measured on the run's shapes",
             analytic_gradient.AnalyticGradientSettings),
    FlagSpec("use_koopman", ("transformer", "resnet_bk"), koopman, koopman.Koopman,
             "Koopman auxiliary loss: a lifting phi, a linear operator K and a decoder with "
             "phi(h_{l+1}) ~ K phi(h_l) along the layers, weight warmed up",
             "loss term per epoch and final; held-out prediction error of K per layer",
             koopman.KoopmanSettings),
    FlagSpec("use_physics_informed", ("transformer", "resnet_bk"), physics_informed,
             physics_informed.PhysicsInformed,
             "energy-conservation penalty: relative drift |E(h_{l+1}) - E(h_l)| / E(h_l) "
             "along the layers, E(h) = 1/2 |h|^2 / d per position, weight warmed up",
             "loss term per epoch; held-out energy drift per layer, trained and at initialization",
             physics_informed.PhysicsInformedSettings),
    FlagSpec("use_quantization", ("transformer", "resnet_bk"), quantization,
             quantization.Quantization,
             "quantization-aware training of every Linear (INT8 or INT4 symmetric per-channel "
             "weights, INT8 per-token activations, straight-through); integer weights at evaluation",
             "test perplexity of the integer model and of the fake-quantized one; stored size "
             "against float32",
             quantization.QuantizationSettings),
    FlagSpec("use_pruning", ("transformer", "resnet_bk"), pruning, pruning.Pruning,
             "gradual pruning after the LR warm-up on a cubic schedule: feed-forward hidden "
             "units removed for real (matrices shrink), or single weights zeroed with the masks "
             "folded into the weights; rarely used MoE experts removed; head and embedding kept",
             "width or sparsity per layer; experts removed; parameters, size, forward FLOPs and "
             "training-step time pruned vs the unpruned build",
             pruning.PruningSettings),
    FlagSpec("use_mixed_precision", ("transformer", "resnet_bk"), mixed_precision,
             mixed_precision.MixedPrecision,
             "torch.autocast in bfloat16 (CPU and CUDA); the BK mixers stay in float32/complex64",
             "autocast dtype; dtypes observed in a forward; tokens/s with and without",
             mixed_precision.MixedPrecisionSettings),
    FlagSpec("use_act", ("resnet_bk",), act, act.ACT,
             "adaptive computation time over depth: per-token halting units, halted tokens' "
             "feed-forward skipped by gathering the running rows; ponder cost N + R in the loss",
             "mean and histogram of layers used per token (last training epoch, held-out); "
             "counted forward FLOPs and time with ACT and with every layer",
             act.ACTSettings),
    FlagSpec("use_early_exit", ("resnet_bk",), early_exit, early_exit.EarlyExit,
             "per-layer exits through the final norm and the shared LM head, trained on sampled "
             "positions; at evaluation a token exits once its hidden state saturates (cosine of "
             "consecutive layers' states), at a threshold calibrated on the validation split",
             "calibrated threshold and calibration table; test perplexity with exits and the "
             "exit layers; ppl, layers used, eval seconds and FLOPs with and without exits",
             early_exit.EarlyExitSettings),
    FlagSpec("use_multi_scale", ("resnet_bk",), multi_scale, multi_scale.MultiScale,
             "causal hourglass: shift right by k-1, mean-pool by k before the middle blocks, "
             "which run on N/k positions, then upsample and add the residual",
             "positions per block; counted forward FLOPs and eval time with and without",
             multi_scale.MultiScaleSettings),
    FlagSpec("use_sparse_bk", ("resnet_bk",), sparse_bk, sparse_bk.SparseBK,
             "Mixture-of-Depths routing of each block: a token whose own router logit is > 0 "
             "runs the block (MoE on the gathered rows, BK on the chain of routed tokens), "
             "the others keep their state (residual only)",
             "routed share (train and held-out) and chain lengths per layer; the share loss "
             "term; counted forward FLOPs (mixer, feed_forward) on held-out text and eval time "
             "with and without",
             sparse_bk.SparseBKSettings),
    FlagSpec("use_curriculum", ("transformer", "resnet_bk"), curriculum, curriculum.Curriculum,
             "competence-based curriculum: each step's batch drawn from the easiest c(s) share of "
             "the windows, ranked by an n-gram NLL fitted on the training split (sqrt pacing)",
             "score summary; competence used per epoch and at sampled steps; mean score fed; "
             "validation curve and time to target",
             curriculum.CurriculumSettings),
    FlagSpec("use_active_learning", ("transformer", "resnet_bk"), active_learning,
             active_learning.ActiveLearning,
             "online batch selection by each window's latest training loss (no scoring pass): "
             "every k steps the top-loss fraction of the next pool of windows is trained on "
             "(a random share kept)",
             "fraction fed, windows considered, age of the selecting losses, selection FLOPs "
             "(0, also flops.selection) and seconds; validation curve and time to target",
             active_learning.ActiveLearningSettings,
             compositions=(("use_curriculum",
                            "active learning selects within the curriculum's pacing: its pool "
                            "is the curriculum's order at the round's position, so every window "
                            "fed has been admitted by the competence schedule"),)),
)}


def spec(name: str) -> FlagSpec:
    return REGISTRY[name]


def by_short_name() -> dict[str, FlagSpec]:
    return {s.short: s for s in REGISTRY.values() if s.settings is not None}


def settings_fields() -> dict[str, tuple[FlagSpec, dataclasses.Field]]:
    """Flat config names of every flag setting -> (its flag, its dataclass field)."""
    out = {}
    for s in REGISTRY.values():
        if s.settings is not None:
            for f in dataclasses.fields(s.settings):
                out[f"{s.short}_{f.name}"] = (s, f)
    return out


def setting_type(settings_cls: type, name: str) -> type:
    hint = typing.get_type_hints(settings_cls)[name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def _coerce(flat: str, kind: type, value: Any) -> Any:
    if kind is bool:
        if not isinstance(value, bool):
            raise FlagConfigError(f"{flat} must be true or false, got {value!r}")
        return value
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise FlagConfigError(f"{flat} must be an integer, got {value!r}")
        return value
    if kind is float:
        if isinstance(value, bool):
            raise FlagConfigError(f"{flat} must be a number, got {value!r}")
        try:
            number = float(value)
        except (TypeError, ValueError, OverflowError):
            raise FlagConfigError(f"{flat} must be a number, got {value!r}") from None
        if not math.isfinite(number):   # nan passes every range check a setting makes
            raise FlagConfigError(f"{flat} must be a finite number, got {value!r}")
        return number
    if kind is str and not isinstance(value, str):
        raise FlagConfigError(f"{flat} must be a string, got {value!r}")
    return value


def resolve_settings(given: Mapping[str, Any] | None) -> dict[str, dict[str, Any]]:
    """Every registered flag's settings: the dataclass defaults updated by ``given``.

    ``given`` maps short flag names to {field: value}; unknown flags or fields are errors.
    """
    given = dict(given or {})
    flags = by_short_name()
    unknown = sorted(set(given) - set(flags))
    if unknown:
        raise FlagConfigError(f"flag_settings has unknown flag(s) {', '.join(unknown)}; "
                              f"known: {', '.join(flags)}")
    out = {}
    for short, s in flags.items():
        values = given.get(short) or {}
        if not isinstance(values, Mapping):
            raise FlagConfigError(f"flag_settings.{short} must be a mapping of settings")
        names = [f.name for f in dataclasses.fields(s.settings)]
        bad = sorted(set(values) - set(names))
        if bad:
            hints = []
            for b in bad:
                close = difflib.get_close_matches(b, names, n=1)
                hints.append(f"{short}_{b}" + (f" (did you mean {short}_{close[0]}?)" if close else ""))
            raise FlagConfigError(f"unknown setting(s) of {s.name}: {', '.join(hints)}")
        defaults = dataclasses.asdict(s.settings())
        for k, v in values.items():
            defaults[k] = _coerce(f"{short}_{k}", setting_type(s.settings, k), v)
        out[short] = defaults
    return out


def fold_flat_settings(values: Mapping[str, Any]) -> dict[str, Any]:
    """Move flat ``<flag>_<setting>`` keys of a config mapping into ``flag_settings``."""
    values = dict(values)
    flat = settings_fields()
    nested = {k: dict(v) for k, v in (values.pop("flag_settings", None) or {}).items()}
    for key in [k for k in values if k in flat]:
        s, f = flat[key]
        nested.setdefault(s.short, {})[f.name] = values.pop(key)
    values["flag_settings"] = nested
    return values


def settings_of(config, name: str):
    """The settings dataclass instance of flag ``name`` in ``config`` (None if it has none)."""
    s = REGISTRY[name]
    if s.settings is None:
        return None
    return s.settings(**config.flag_settings[s.short])


def check_flags(config) -> None:
    """Raise FlagConfigError for a flag that is unknown, inapplicable, clashing or mis-set."""
    on = config.enabled_flags()
    for name in on:
        s = REGISTRY[name]   # config fields and registry hold the same twelve (a test)
        if config.architecture not in s.architectures:
            raise FlagConfigError(f"{name} applies to {', '.join(s.architectures)} models only, "
                                  f"not to {config.architecture} (run {config.model_name!r})")
    for i, a in enumerate(on):
        for b in on[i + 1:]:
            if b in REGISTRY[a].incompatible or a in REGISTRY[b].incompatible:
                raise FlagConfigError(f"{a} and {b} cannot be used together (run "
                                      f"{config.model_name!r}); switch one of them off")
    for name in on:
        settings = settings_of(config, name)
        if settings is not None:
            try:
                settings.validate(config)
            except ValueError as exc:
                raise FlagConfigError(f"{name}: {exc}") from None


def flags_table_markdown() -> str:
    """The README's flag table: one line per registered flag."""
    lines = ["| flag | applies to | what it does | main settings | records under `flags.<flag>` |",
             "|---|---|---|---|---|"]
    for s in REGISTRY.values():
        fields = ", ".join(f"`{s.short}_{f.name}`" for f in dataclasses.fields(s.settings)) \
            if s.settings else "none"
        lines.append(f"| `{s.name}` | {', '.join(s.architectures)} | {s.summary} | {fields} | "
                     f"{s.records} |")
    return "\n".join(lines)


def flags_doc_markdown(sweeps: Mapping[str, Any] | None = None) -> str:
    """``docs/flags.md``: one section per registered flag, from this registry and its module;
    with ``sweeps`` (a checked flag_sweeps.json) each flag's default-settings sweep too."""
    import inspect

    from .sweeps_doc import sweep_section
    out = ["# Optimisation flags", "",
           "Generated from `bkbench.flags.registry` by `python -m bkbench.flags > docs/flags.md`",
           "(a test checks that this file is up to date). Every flag is a `use_*` config field",
           "(`--use-<flag>` on the command line); its settings are config fields named",
           "`<flag>_<setting>` (`--<flag>-<setting>`, or `<flag>_<setting>:` in a YAML file).",
           "With a flag on, the results file holds `flags.<flag>.settings` and",
           "`flags.<flag>.measured`.", ""]
    if sweeps is not None:
        out += ["Each flag's default settings come from a sweep on the validation split, never",
                "the test split (`python -m bkbench.experiments.flag_sweeps`; this file is then",
                "regenerated by `python -m bkbench.flags --sweeps flag_sweeps.json`; see",
                "docs/experiments.md).", ""]
    for s in REGISTRY.values():
        out += [f"## `{s.name}`", "", s.summary[0].upper() + s.summary[1:] + ".", "",
                f"- applies to: {', '.join(s.architectures)}",
                f"- cannot be combined with: {', '.join(s.incompatible) or 'none'}",
                *[f"- with `{other}`: {how}" for other, how in s.compositions],
                f"- code: `{s.module.__name__}`",
                f"- records: {s.records}", ""]
        if s.settings is not None:
            out += ["| setting | default | meaning |", "|---|---|---|"]
            for f in dataclasses.fields(s.settings):
                out.append(f"| `{s.short}_{f.name}` | `{f.default!r}` | {f.metadata.get('help', '')} |")
            out.append("")
        if sweeps is not None:
            current = ({f.name: f.default for f in dataclasses.fields(s.settings)}
                       if s.settings is not None else {})
            out += sweep_section(s.short, sweeps, s.name, current)
        doc = inspect.cleandoc(s.module.__doc__ or "")
        out += ["```text", doc, "```", ""]
    return "\n".join(out)


__all__ = ["FlagSpec", "REGISTRY", "FlagConfigError", "spec", "settings_fields", "settings_of",
           "resolve_settings", "fold_flat_settings", "check_flags", "flags_table_markdown", "flags_doc_markdown"]
