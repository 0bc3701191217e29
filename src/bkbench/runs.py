"""Run identity: which settings a run shares with the runs it is compared with, its name,
and the rule that a finished result is never replaced by accident.

A config's fields fall into three kinds:

- the **setup** (:data:`SETUP_FIELDS`): the training recipe, the data scheme and tokenizer and
  the model size every architecture shares. Runs are compared only within one setup;
- **bookkeeping** (:data:`BOOKKEEPING_FIELDS`): where files go and how often, which device;
  they do not change what a run computes (the device changes its time and memory, which the
  comparisons note);
- everything else is the run's **own** architecture: the model kind, its architecture-specific
  sizes (heads, experts, BK-Core parameters) and the optimisation flags. Overriding one of these,
  or a model size, on the command line gives the run a new name (:func:`variant_suffix`), so a
  variant never lands on the original's files.

The kinds, and a variant's name, are recipe knowledge (:mod:`bkbench.fields`, which the config
uses to name runs); this module groups and guards finished runs by them.

Pure Python (no torch), so that the command line can use it before importing anything heavy.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Iterable, Mapping

from .errors import ConfigError
from .fields import (BOOKKEEPING_FIELDS, DATA_FIELDS, IDENTITY_FIELDS, LEGACY_DEFAULTS,
                     SETUP_FIELDS, SHARED_MODEL_FIELDS, TRAINING_FIELDS, format_value, ignored_by,
                     renames_run, variant_suffix)

# --- setups ---------------------------------------------------------------------------------

def setup_of(config: Mapping[str, Any], data: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The shared setup of a run: its setup fields and, when known, the sha256 of its data."""
    config = {**LEGACY_DEFAULTS, **config}
    setup = {k: config.get(k) for k in SETUP_FIELDS}
    if data and data.get("checksums"):
        setup["data_checksums"] = dict(sorted(data["checksums"].items()))
    return setup


def setup_id(setup: Mapping[str, Any]) -> str:
    """A short stable name of a setup (8 hex digits of the sha256 of its canonical JSON)."""
    text = json.dumps(setup, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def setup_differences(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[str]:
    out = []
    for k in sorted(set(a) | set(b)):
        if a.get(k) != b.get(k):
            out.append("data files (sha256)" if k == "data_checksums"
                       else f"{k}: {a.get(k)!r} vs {b.get(k)!r}")
    return out


def group_by_setup(results: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Results (run name -> BenchmarkResults) grouped by setup, the largest group first, each
    ``{"id", "setup", "runs": {name: results}}``; ties keep the order of ``results``."""
    groups: dict[str, dict[str, Any]] = {}
    for name, r in results.items():
        setup = setup_of(r.config, r.data)
        sid = setup_id(setup)
        groups.setdefault(sid, {"id": sid, "setup": setup, "runs": {}})["runs"][name] = r
    return sorted(groups.values(), key=lambda g: -len(g["runs"]))


def base_name(run_name: str) -> str:
    """The run a variant derives from: ``resnet_bk_full-d_model128`` -> ``resnet_bk_full``."""
    return run_name.split("-", 1)[0]


def grouped_pairs(groups: list[dict[str, Any]], seed_pairs: Iterable[tuple[str, str]]
                  ) -> tuple[list[tuple[str, str]], list[str]]:
    """The pairs to compare and the runs left out, with why.

    Within each setup, every pair of runs whose base names form one of ``seed_pairs``
    (so ``transformer_baseline`` is compared with ``resnet_bk_full-bk_heads2`` when they share
    a setup). A run in no pair is left out, with why: the runs of its setup form no compared
    pair with it, or no other run has its setup (then the differences from the largest setup
    are named).
    """
    seed_pairs = list(seed_pairs)
    pairs, left_out = [], []
    main = groups[0] if groups else None
    for group in groups:
        names = list(group["runs"])
        group_pairs = [(a, b) for sa, sb in seed_pairs for a in names for b in names
                       if base_name(a) == sa and base_name(b) == sb and a != b]
        pairs += group_pairs
        paired = {n for p in group_pairs for n in p}
        for name in names:
            if name in paired:
                continue
            others = [n for n in names if n != name]
            if others:
                # an ablation folder holds dozens of rows of one setup: name a few, count the rest
                named = ", ".join(others[:3]) + (f" and {len(others) - 3} more"
                                                 if len(others) > 3 else "")
                why = (f"it shares its setup with {named}, none of which the benchmark "
                       "compares it with")
            elif group is main:
                why = "no other run has its setup"
            else:
                why = (f"its setup {group['id']} differs from that of {next(iter(main['runs']))} "
                       f"(setup {main['id']}: " + "; ".join(
                           setup_differences(main["setup"], group["setup"])) + ")")
            left_out.append(f"{name}: {why}")
    return pairs, left_out


# --- never replace a finished result by accident --------------------------------------------

def results_path(output_dir: str | Path, run_name: str) -> Path:
    return Path(output_dir) / f"{run_name}_results.json"


def run_dir(output_dir: str | Path, run_name: str) -> Path:
    return Path(output_dir) / "runs" / run_name


def config_changes(stored: Mapping[str, Any], config: Mapping[str, Any]) -> list[str]:
    """The fields, bookkeeping aside, in which a finished run's config differs from ``config``:
    empty means that rerunning it would compute the same numbers."""
    stored = {**LEGACY_DEFAULTS, **stored}
    keys = (set(stored) | set(config)) - set(BOOKKEEPING_FIELDS)
    return [f"{k}: finished run has {stored.get(k)!r}, this one {config.get(k)!r}"
            for k in sorted(keys) if stored.get(k) != config.get(k)]


def check_can_write(output_dir: str | Path, config: Mapping[str, Any], resume: bool,
                    overwrite: bool) -> None:
    """Raise ConfigError, before any work, if this run would replace a finished result or
    delete checkpoints without ``overwrite``.

    With ``resume`` a finished result of the same config is kept (the run is skipped) and
    checkpoints are continued; a finished result of another config is refused all the same.
    """

    if overwrite:
        return
    name = config.get("model_name")
    results = results_path(output_dir, name)
    checkpoint_dir = run_dir(output_dir, name) / "checkpoints"
    if results.exists():
        if not resume:
            raise ConfigError(
                f"{results} already holds a finished run of {name}; pass --resume to keep "
                "it (complete runs are skipped), or --overwrite to replace it and delete its "
                "checkpoints (or --run-suffix / --output-dir to write a new run beside it)")
        stored = _stored_config(results)
        if stored is not None:
            diffs = config_changes(stored, config)
            if diffs:
                raise ConfigError(
                    f"{results} holds a finished run of {name} with another config "
                    f"({'; '.join(diffs[:4])}); --resume will not replace it: pass --overwrite "
                    "to replace it, or --run-suffix / --output-dir to keep both")
        return
    if not resume and checkpoint_dir.is_dir() and any(checkpoint_dir.glob("step_*")):
        raise ConfigError(
            f"{checkpoint_dir} holds checkpoints of an unfinished run of {name}; pass --resume "
            "to continue it, or --overwrite to delete them and start over")


def _stored_config(path: Path) -> dict[str, Any] | None:
    try:
        config = json.loads(path.read_text()).get("config")
    except (OSError, ValueError, AttributeError):
        return None  # unreadable: the run is not finished, resume replaces it (and says so)
    return config if isinstance(config, dict) else None


# --- the settings block at the start of a run -----------------------------------------------

def settings_lines(config: Mapping[str, Any], data: Mapping[str, Any] | None = None) -> list[str]:
    """The resolved settings of a run, a few lines of ``field=value`` by kind."""
    def join(keys):
        return " ".join(f"{k}={format_value(config.get(k))}" for k in keys)

    setup = setup_of(config, data)
    flags = [k for k in config if k.startswith("use_") and config[k]]
    own = [k for k in config if k not in SETUP_FIELDS + BOOKKEEPING_FIELDS + IDENTITY_FIELDS
           and not k.startswith("use_") and k != "flag_settings"]
    own = [k for k in own if k not in ignored_by(config.get("architecture"))]
    lines = [
        f"run {config.get('model_name')} (architecture {config.get('architecture')}, "
        f"setup {setup_id(setup)})",
        "  model: " + join(SHARED_MODEL_FIELDS + tuple(own)),
        "  flags: " + (" ".join(flags) or "none"),
        "  training: " + join(TRAINING_FIELDS),
        "  data: " + join(DATA_FIELDS + ("data_dir",)),
        "  other: " + join(tuple(k for k in BOOKKEEPING_FIELDS if k != "data_dir")),
    ]
    # the settings of the flags that are on only, one line each: the flags that are off have
    # settings too (their defaults), and printing all of them buried the rest of the head
    settings = config.get("flag_settings") or {}
    for flag in flags:
        values = settings.get(flag.removeprefix("use_"))
        if values:
            lines.insert(3 + flags.index(flag), f"    {flag}: " + " ".join(
                f"{k}={format_value(v)}" for k, v in values.items()))
    return lines


__all__ = ["SETUP_FIELDS", "TRAINING_FIELDS", "DATA_FIELDS", "SHARED_MODEL_FIELDS",
           "BOOKKEEPING_FIELDS", "renames_run", "variant_suffix", "setup_of", "setup_id",
           "setup_differences", "group_by_setup", "grouped_pairs", "base_name",
           "check_can_write", "config_changes", "results_path", "run_dir", "settings_lines"]
