"""Every JSON file the report reads, checked before anything reads a field of it.

Each file is parsed strictly (bkbench writes no NaN or Infinity: a file holding one was not
written by it) and validated against a JSON Schema with ``jsonschema``: the results files
(``*_results.json``), the sequence-length sweep (``scale.json``) and the ablation table
(``ablation.json``). A file that fails is named, with where and what is wrong, in the report's
"Files skipped" list and on stderr, and left out; the report is built from the rest.
"""

from __future__ import annotations

import dataclasses
import json
import re
import types
import typing
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import best_match

from ..experiments.ablate import ABLATION_FILE
from ..experiments.scale import SCALE_FILE
from ..experiments.size_scaling import SIZE_SCALING_FILE
from ..results import MAX_RESULTS_BYTES, BenchmarkResults
from .common import BASELINE, CANDIDATE, ReportError

_NUMBER = {"type": "number"}
_INT = {"type": "integer"}
_STR = {"type": "string"}
_NULL = {"type": "null"}
_OBJ = {"type": "object"}


def _nullable(schema: dict) -> dict:
    return {"anyOf": [schema, _NULL]}


def _numbers_by_name() -> dict:
    return {"type": "object", "additionalProperties": _NUMBER}


def _hint_schema(hint: Any) -> dict:
    """The JSON Schema of a results field's type hint (int, float, str, bool, list, dict,
    optional)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return {}
    if origin in (typing.Union, types.UnionType):
        return {"anyOf": [_hint_schema(a) for a in args]}
    simple = {type(None): _NULL, bool: {"type": "boolean"}, int: _INT, float: _NUMBER, str: _STR}
    if hint in simple:
        return simple[hint]
    if origin is list:
        return {"type": "array", "items": _hint_schema(args[0])}
    if origin is dict:
        return {"type": "object", "additionalProperties": _hint_schema(args[1])}
    raise TypeError(f"no JSON Schema for the results field type {hint!r}")


def _results_schema() -> dict:
    """From :class:`BenchmarkResults`' fields, with the nested parts the report reads."""
    hints = typing.get_type_hints(BenchmarkResults)
    props = {f.name: _hint_schema(hints[f.name]) for f in dataclasses.fields(BenchmarkResults)}
    required = [f.name for f in dataclasses.fields(BenchmarkResults)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    props["flops"] = _nullable({"type": "object", "properties": {
        **{f"{p}_by_component": _numbers_by_name() for p in ("forward", "backward", "optimizer")},
        "training": {"type": "object", "properties": {"by_component": _numbers_by_name()}},
        "selection": {"type": "object", "properties": {"total": _NUMBER}, "required": ["total"]},
        "uncounted": {"type": "object", "properties": {
            "forward": _numbers_by_name(), "backward": _numbers_by_name(),
            "total": _NUMBER, "fraction_of_counted": _nullable(_NUMBER)}},
        "sources": _OBJ, "analytic": _nullable(_OBJ), "notes": {"type": "array", "items": _STR},
    }})
    props["memory"] = _nullable({"type": "object", "properties": {"method": _STR}})
    props["contention"] = _nullable({"type": "object", "properties": {
        "contended": {"type": "boolean"}, "reasons": {"type": "array", "items": _STR}}})
    props["flags"] = {"type": "object", "additionalProperties": {
        "type": "object", "properties": {"settings": _OBJ, "measured": _OBJ}}}
    return {"type": "object", "properties": props, "required": required}


def _summary() -> dict:   # experiments.stats.Summary as a dict
    return {"type": "object", "required": ["mean"], "properties": {
        "mean": _NUMBER, "ci_low": _nullable(_NUMBER), "ci_high": _nullable(_NUMBER)}}


ABLATION_SCHEMA = {
    "type": "object", "required": ["seeds", "rows"],
    "properties": {
        "seeds": {"type": "array", "items": _INT, "minItems": 1},
        "split_scheme": _nullable(_STR), "timing_note": _nullable(_STR),
        "rows": {"type": "array", "minItems": 1, "items": {
            "type": "object",
            "required": ["row", "flags", "test_perplexity", "delta_vs_baseline", "step_flops",
                         "tokens_per_second", "peak_memory_mb", "model_size_mb"],
            "properties": {
                "row": _STR, "flags": {"type": "array", "items": _STR},
                "runs": {"type": "array", "items": _STR},
                "delta_vs_baseline": {"type": "object", "required": ["delta", "relative"],
                                      "properties": {"delta": _NUMBER, "relative": _NUMBER,
                                                     "ci_low": _nullable(_NUMBER),
                                                     "ci_high": _nullable(_NUMBER)}},
                "welch_vs_baseline": {"type": "object", "additionalProperties": {
                    "type": "object", "properties": {"p_value": _nullable(_NUMBER)}}},
                **{k: _summary() for k in ("test_perplexity", "step_flops", "tokens_per_second",
                                           "peak_memory_mb", "model_size_mb")},
            }}},
    }}

_POINT_NUMBERS = ("tokens_per_second", "seconds_per_token", "peak_memory_mb", "flops_per_token",
                  "mixer_flops_per_token")
_FIT = _nullable({"type": "object", "required": ["exponent", "r_squared"],
                  "properties": {"exponent": _NUMBER, "r_squared": _NUMBER}})

SCALE_SCHEMA = {
    "type": "object",
    "required": ["axis", "values", "steps", "warmup", "vocab_size", "points", "fits"],
    "properties": {
        "axis": {"enum": ["n_seq", "d_model", "n_layers"]},
        "values": {"type": "array", "items": _INT, "minItems": 1},
        "tokens_per_batch": _nullable(_INT), "steps": _INT, "warmup": _INT, "vocab_size": _INT,
        "points": {"type": "array", "items": {
            "type": "object", "required": ["model_name", "value", *_POINT_NUMBERS],
            "properties": {"model_name": _STR, "value": _INT,
                           **{k: _NUMBER for k in _POINT_NUMBERS}}}},
        "fits": {"type": "object", "additionalProperties": {
            "type": "object", "additionalProperties": _FIT}},
        "configs": {"type": "object", "additionalProperties": _OBJ},
    }}

RESULTS_SCHEMA = _results_schema()
for _schema in (RESULTS_SCHEMA, ABLATION_SCHEMA, SCALE_SCHEMA):
    Draft202012Validator.check_schema(_schema)


def _no_constant(name: str) -> None:
    raise ValueError(f"holds {name}, which bkbench never writes")


def read_checked(path: Path, schema: dict) -> Any:
    """The JSON of ``path``, valid under ``schema``; ValueError saying what is wrong."""
    if path.stat().st_size > MAX_RESULTS_BYTES:
        raise ValueError(f"{path.stat().st_size} bytes, more than bkbench writes")
    try:
        data = json.loads(path.read_bytes().decode("utf-8"), parse_constant=_no_constant)
    except (UnicodeDecodeError, RecursionError) as exc:
        raise ValueError(f"not a JSON text ({type(exc).__name__})") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"not valid JSON ({exc.msg}, line {exc.lineno})") from None
    error = best_match(Draft202012Validator(schema).iter_errors(data))
    if error is not None:
        where = error.json_path if error.path else "the top level"
        raise ValueError(f"at {where}: {error.message[:200]}")
    return data


def _skipped(path: Path, exc: Exception) -> str:
    return f"{path.name} skipped: {exc}"


def natural_key(name: str) -> list[str | int]:
    """Sort key that orders the numbers inside run names by value: d_model64 before
    d_model128, seed2 before seed10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def load_results_dir(results_dir: str | Path) -> tuple[dict[str, BenchmarkResults], list[str]]:
    """(results by run name, problems) from a results folder's ``*_results.json`` files."""
    folder = Path(results_dir)
    if not folder.is_dir():
        raise ReportError(f"results folder {str(folder)!r} does not exist")
    results: dict[str, BenchmarkResults] = {}
    problems: list[str] = []
    for path in sorted(folder.glob("*_results.json")):
        try:
            r = BenchmarkResults.from_dict(read_checked(path, RESULTS_SCHEMA))
        except (ValueError, KeyError, TypeError, OSError) as exc:
            problems.append(_skipped(path, exc))
            continue
        results[r.model_name] = r
    order = {n: i for i, n in enumerate((BASELINE, "resnet_bk_baseline", CANDIDATE))}
    results = dict(sorted(results.items(),
                          key=lambda kv: (order.get(kv[0], len(order)), natural_key(kv[0]))))
    if not results:
        raise ReportError(f"no readable *_results.json files in {str(folder)!r}"
                          + (f" ({'; '.join(problems)})" if problems else "")
                          + "; run `bkbench run` first")
    return results, problems


SIZE_SCALING_SCHEMA = {
    "type": "object",
    "required": ["axis", "sizes", "reference", "fits", "gaps", "setup"],
    "properties": {
        "axis": {"enum": ["d_model", "n_layers"]},
        "sizes": {"type": "array", "items": _INT, "minItems": 1},
        "reference": _STR,
        "fits": {"type": "object", "additionalProperties": _OBJ},
        "gaps": {"type": "object", "additionalProperties": {
            "type": "object", "required": ["by_size", "verdict"],
            "properties": {"verdict": _STR, "by_size": {
                "type": "object", "additionalProperties": {
                    "type": "object", "required": ["diff", "low", "high"],
                    "properties": {"diff": _NUMBER, "low": _nullable(_NUMBER),
                                   "high": _nullable(_NUMBER)}}}}}},
        "setup": {"type": "object", "required": ["dataset", "tokenizer", "split_scheme"],
                  "anyOf": [{"required": ["max_tokens"], "properties": {"max_tokens": _INT}},
                            {"required": ["budget_flops"],
                             "properties": {"budget_flops": _NUMBER}}]},
    }}


def _load_optional(path: Path, schema: dict, problems: list[str]) -> dict[str, Any] | None:
    if not path.exists():
        return None
    try:
        return read_checked(path, schema)
    except (ValueError, OSError) as exc:
        problems.append(_skipped(path, exc))
        return None


def load_scale_sweep(results_dir: str | Path, problems: list[str]) -> dict[str, Any] | None:
    """The folder's ``scale.json`` (``bkbench scale``), or None: absent, or invalid (then
    named in ``problems``)."""
    return _load_optional(Path(results_dir) / SCALE_FILE, SCALE_SCHEMA, problems)


def load_ablation_table(results_dir: str | Path, problems: list[str]) -> dict[str, Any] | None:
    """The folder's ``ablation.json`` (``bkbench ablate``), or None: absent, or invalid (then
    named in ``problems``)."""
    return _load_optional(Path(results_dir) / ABLATION_FILE, ABLATION_SCHEMA, problems)


def load_size_scaling(results_dir: str | Path, problems: list[str]) -> dict[str, Any] | None:
    """The folder's ``size_scaling.json`` (``bkbench scale --train``), or None: absent, or
    invalid (then named in ``problems``)."""
    return _load_optional(Path(results_dir) / SIZE_SCALING_FILE, SIZE_SCALING_SCHEMA, problems)
