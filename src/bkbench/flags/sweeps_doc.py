"""The flag sweeps file (``flag_sweeps.json``): its schema, reading it, its part of docs/flags.md.

``python -m bkbench.experiments.flag_sweeps`` writes the file: per flag, one setting tried at a
few values, each value an ordinary run of ``resnet_bk_baseline`` with that flag alone, and the
value chosen by a rule that reads validation perplexity only.  ``python -m bkbench.flags
--sweeps FILE`` renders each flag's table into its section of docs/flags.md.  The schema lives
here, beside the rendering, because the flags layer may not import the experiments.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import best_match

MAX_SWEEPS_BYTES = 4 << 20   # tens of candidates of a few hundred bytes each

_NUM, _STR, _OBJ = {"type": "number"}, {"type": "string"}, {"type": "object"}
_VALUE = {"type": ["number", "string", "boolean"]}


def _nullable(schema: dict) -> dict:
    return {"anyOf": [schema, {"type": "null"}]}


_COSTS = {"valid_perplexity": _NUM, "training_flops": _nullable(_NUM),
          "training_seconds": _NUM, "tokens_per_second": _NUM, "row": _STR, "command": _STR}
_CANDIDATE = {"type": "object",
              "required": ["value", "saving", "within_tolerance", *_COSTS],
              "properties": {**_COSTS, "value": _VALUE, "saving": _nullable(_NUM),
                             "within_tolerance": _nullable({"type": "boolean"})}}
_FLAG = {"type": "object",
         "required": ["setting", "default", "goal", "saving_figure", "why_candidates", "rule",
                      "candidates", "chosen", "why_chosen"],
         "properties": {"setting": _STR, "default": _VALUE, "goal": {"enum": ["saving", "quality"]},
                        "saving_figure": _nullable(_STR), "why_candidates": _STR, "rule": _STR,
                        "candidates": {"type": "array", "minItems": 1, "items": _CANDIDATE},
                        "chosen": _VALUE, "why_chosen": _STR}}
FLAG_SWEEPS_SCHEMA = {
    "type": "object",
    "required": ["kind", "preset", "seed", "split_scheme", "selection_split", "tolerance",
                 "command", "baseline", "flags", "not_swept", "environment"],
    "properties": {
        "kind": {"const": "bkbench flag sweeps"}, "preset": _STR, "seed": {"type": "integer"},
        "split_scheme": _nullable(_STR), "selection_split": {"const": "validation"},
        "tolerance": {"type": "number", "minimum": 0}, "command": _STR,
        "baseline": {"type": "object", "required": list(_COSTS), "properties": _COSTS},
        "flags": {"type": "object", "additionalProperties": _FLAG},
        "not_swept": {"type": "object", "additionalProperties": _STR},
        "environment": _OBJ, "setup": _OBJ, "commits": {"type": "array", "items": _STR}, "parallel_jobs": {"type": "integer", "minimum": 1},
        "timing_note": _nullable(_STR),
    }}
Draft202012Validator.check_schema(FLAG_SWEEPS_SCHEMA)


def check_flag_sweeps(data: Any) -> None:
    """ValueError saying where ``data`` departs from the sweeps file's schema."""
    error = best_match(Draft202012Validator(FLAG_SWEEPS_SCHEMA).iter_errors(data))
    if error is not None:
        where = error.json_path if error.path else "the top level"
        raise ValueError(f"at {where}: {error.message[:200]}")


def _no_constant(name: str) -> None:
    raise ValueError(f"holds {name}, which bkbench never writes")


def load_flag_sweeps(path: str | Path) -> dict[str, Any]:
    """The sweeps file at ``path``, parsed strictly and checked; ValueError or OSError if not."""
    path = Path(path)
    if path.stat().st_size > MAX_SWEEPS_BYTES:
        raise ValueError(f"{path.stat().st_size} bytes, more than a sweeps file holds")
    try:
        data = json.loads(path.read_bytes().decode("utf-8"), parse_constant=_no_constant)
    except UnicodeDecodeError:
        raise ValueError("not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"not valid JSON ({exc.msg}, line {exc.lineno})") from None
    check_flag_sweeps(data)
    return data


def _number(x: float | None, spec: str) -> str:
    return "n/a" if x is None else format(x, spec)


def sweep_section(short: str, sweeps: dict[str, Any], flag: str,
                  current: dict[str, Any] | None = None) -> list[str]:
    """The markdown lines of ``flag``'s sweep in docs/flags.md (empty: not in the file);
    ``current``: the flag's settings' defaults now, to say whether the chosen value is one."""
    if flag in sweeps["not_swept"]:
        return ["Default settings: not swept. " + sweeps["not_swept"][flag], ""]
    entry = sweeps["flags"].get(flag)
    if entry is None:
        return []
    base = sweeps["baseline"]
    scheme = sweeps["split_scheme"]
    commits = sweeps.get("commits") or []
    out = [f"Default settings: `{short}_{entry['setting']}` swept on the **validation** split "
           f"(preset `{sweeps['preset']}`, seed {sweeps['seed']}"
           + (", PROXY split scheme" if scheme == "proxy" else f", {scheme} split scheme")
           + (f", commit{'s' if len(commits) > 1 else ''} {', '.join(commits)}" if commits else "")
           + f"), by `{sweeps['command']}`. {entry['why_candidates']}", "",
           f"Rule: {entry['rule']}", ""]
    saving = entry["saving_figure"]
    if sweeps.get("timing_note"):
        out += [f"Note: {sweeps['timing_note']}.", ""]
    out += ["| value | valid ppl | vs baseline | " + ("saving | " if saving else "")
            + "training FLOPs | training s | tokens/s | chosen |",
            "|---|---|---|" + ("---|" if saving else "") + "---|---|---|---|"]
    rows = [("baseline (flag off)", base, None, "")]
    rows += [(f"`{c['value']!r}`" + (" (default when swept)" if c["value"] == entry["default"] else ""), c,
              c["saving"], "**chosen**" if c["value"] == entry["chosen"] else "")
             for c in entry["candidates"]]
    for label, r, saved, mark in rows:
        rel = r["valid_perplexity"] / base["valid_perplexity"] - 1
        cells = [label, f"{r['valid_perplexity']:.2f}", f"{100 * rel:+.2f}%"]
        if saving:
            cells.append("" if r is base else _number(saved, ".4f"))
        cells += [_number(r["training_flops"], ".3e"), f"{r['training_seconds']:.1f}",
                  f"{r['tokens_per_second']:,.0f}", mark]
        out.append("| " + " | ".join(cells) + " |")
    now = (current or {}).get(entry["setting"], entry["chosen"])
    adopted = ("; it is the default now" if now == entry["chosen"]
               else f"; the default now is `{now!r}`, not the sweep's choice")
    out += ["", f"Chosen: `{entry['chosen']!r}`: {entry['why_chosen']}{adopted}", ""]
    return out


__all__ = ["FLAG_SWEEPS_SCHEMA", "check_flag_sweeps", "load_flag_sweeps", "sweep_section"]
