"""The kinds of config fields, and the name of a run whose own fields are overridden.

- the **setup** (:data:`SETUP_FIELDS`): the training recipe, the data scheme and tokenizer and
  the model size every architecture shares;
- **bookkeeping** (:data:`BOOKKEEPING_FIELDS`): where files go and how often, which device;
- everything else is the run's **own** architecture (model kind, architecture-specific sizes,
  the optimisation flags): overriding one of these, or a model size, renames the run
  (:func:`variant_suffix`), so a variant never lands on the original's files.

Pure Python (no torch): the config (run names) and the run planner (``bkbench.runs``: setups,
the overwrite guard) both read it.
"""

from __future__ import annotations

import hashlib
from typing import Any, Iterable, Mapping

from .validation import MAX_RUN_NAME

# dropout is a regulariser of the training, not a size: changing it does not rename a run
TRAINING_FIELDS = ("dropout", "batch_size", "epochs", "max_steps", "max_tokens",
                   "budget_flops", "budget_seconds", "lr", "weight_decay", "grad_clip",
                   "warmup_steps", "min_lr_ratio", "seed", "eval_stride")
DATA_FIELDS = ("dataset", "variant", "split_scheme", "tokenizer")
# the model sizes both architectures read: a comparison across them is not like for like
SHARED_MODEL_FIELDS = ("d_model", "n_layers", "n_seq", "tie_weights")
SETUP_FIELDS = SHARED_MODEL_FIELDS + TRAINING_FIELDS + DATA_FIELDS
BOOKKEEPING_FIELDS = ("data_dir", "device", "eval_batch_size", "checkpoint_every",
                      "keep_checkpoints", "tensorboard", "allow_noncausal")
IDENTITY_FIELDS = ("model_name", "architecture")
# results written before a field existed ran with what it now names: every run before
# --dataset was a WikiText-2 run
LEGACY_DEFAULTS = {"dataset": "wikitext-2"}
# the model settings only some architectures read; any other model setting (the flags, their
# own settings) applies to every architecture
OWN_FIELDS = {
    "transformer": ("n_heads",),
    "gla": ("n_heads", "gla_chunk_size", "gla_backend"),
    "lstm": (),
    "resnet_bk": ("num_experts", "top_k", "bk_heads", "bk_mode", "v_max", "bk_h0", "bk_t",
                  "bk_energy", "bk_eps", "moe_balance_weight"),
}


def ignored_by(architecture: str | None) -> set[str]:
    """Model settings that ``architecture`` does not read (overriding them does not rename its
    runs, and its settings block leaves them out)."""
    own = set(OWN_FIELDS.get(architecture, ()))
    return {f for fields in OWN_FIELDS.values() for f in fields} - own


def renames_run(field: str) -> bool:
    """Whether overriding ``field`` on the command line makes the run a variant of a new name:
    a model size, an architecture-specific setting or a flag (not the training recipe, the data
    or bookkeeping, whose changes the overwrite guard and the setup grouping catch)."""
    return field not in TRAINING_FIELDS + DATA_FIELDS + BOOKKEEPING_FIELDS + IDENTITY_FIELDS


def format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def variant_suffix(base: Mapping[str, Any], overrides: Mapping[str, Any],
                   field_order: Iterable[str]) -> str:
    """``-d_model128-use_koopman`` for the overrides of run-renaming fields that change the
    run's value in ``base``; empty when none does. Booleans read ``-name`` / ``-no_name``."""
    parts = []
    ignored = ignored_by(base.get("architecture"))
    for name in field_order:
        if (name not in overrides or not renames_run(name) or name in ignored
                or overrides[name] == base.get(name)):
            continue
        value = overrides[name]
        if isinstance(value, bool):
            parts.append(name if value else f"no_{name}")
        else:
            parts.append(f"{name}{format_value(value)}")
    suffix = "".join(f"-{p}" for p in parts)
    if len(str(base.get("model_name", ""))) + len(suffix) > MAX_RUN_NAME:
        # many overrides (e.g. every flag on): a name that still fits the file-name limit,
        # stable for the same overrides; the results' config lists them all
        digest = hashlib.sha256(suffix.encode()).hexdigest()[:8]
        suffix = f"-{len(parts)}changes-{digest}"
    return suffix


__all__ = ["LEGACY_DEFAULTS", "TRAINING_FIELDS", "DATA_FIELDS", "SHARED_MODEL_FIELDS",
           "SETUP_FIELDS", "BOOKKEEPING_FIELDS", "IDENTITY_FIELDS", "OWN_FIELDS", "ignored_by", "renames_run",
           "format_value", "variant_suffix"]
