"""Each flag's default settings from a small sweep on the validation split, never the test split.

    python -m bkbench.experiments.flag_sweeps --data-dir DIR --split-scheme proxy \\
        [--preset default] [--jobs N] [--flags pruning,act] [--output-dir DIR] [--resume]

Per flag, one main setting is tried at two or three values around (and including) its current
default. Every value is an ordinary run: ``resnet_bk_baseline`` with that flag alone and that
setting, beside one baseline row with no flag, all with the same preset, seed and data. Each row
is trained by the ablation's machinery (a ``bkbench.worker`` child per run, its own results file,
checkpoints and ``--resume``), so its numbers equal a ``bkbench run`` of the same config; the
row's ``command`` is that run. The baseline and each flag's current default are the ablation's
``bk-baseline`` and ``bk+<flag>`` configs under the same names, so an ablation folder's finished
rows are reused by ``--output-dir <it> --resume``.

The rule reads the **validation** perplexity of each run (``valid_perplexity``: the proxy or
official validation split, at the best-validation weights) and nothing measured on the test
split:

- a flag whose promise is a saving (pruning, early_exit, sparse_bk, multi_scale, act): the value
  with the largest saving, by the flag's own saving figure (below), among the values whose
  validation perplexity is within ``tolerance`` (2%) of the baseline row's; if none is, the
  value with the lowest validation perplexity;
- a flag whose promise is quality (koopman, physics_informed, curriculum, active_learning): the
  value with the lowest validation perplexity.

Ties go to the current default, then to the earlier value in the list. Quantization, mixed
precision and the analytic gradient have no setting to tune (``NOT_SWEPT`` says why).

Writes ``flag_sweeps.json`` (schema: :mod:`bkbench.flags.sweeps_doc`) and ``flag_sweeps.md``
into the output folder beside the runs; ``python -m bkbench.flags --sweeps flag_sweeps.json``
renders each flag's table into docs/flags.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from ..atomic import write_bytes_atomic, write_json_atomic
from ..config import OPTIMIZATION_FLAGS, PRESETS, BenchmarkConfig, ConfigError, build_run_configs
from ..fields import format_value
from ..flags.registry import REGISTRY
from ..flags.sweeps_doc import check_flag_sweeps, sweep_section
from ..threads import threads_option
from .ablate import BASELINE_ROW, train_rows

SWEEPS_FILE = "flag_sweeps.json"
TOLERANCE = 0.02
MODEL = "resnet_bk_baseline"


def _measured(r: Any, flag: str) -> dict[str, Any]:
    return r.flags[flag]["measured"]


def _pruning_saving(r: Any) -> float:
    return 1 - _measured(r, "use_pruning")["forward_flops_ratio"]


def _act_saving(r: Any) -> float:
    return _measured(r, "use_act")["held_out"]["forward_flops_counted"]["saving"]


def _forward_flops_saving(flag: str) -> Callable[[Any], float]:
    return lambda r: 1 - _measured(r, flag)["forward_flops"]["ratio"]


def _sparse_bk_saving(r: Any) -> float:
    """Share of tokens kept out of the BK chain on validation windows (the record's FLOP count
    routes seeded random tokens, not text)."""
    return 1 - _measured(r, "use_sparse_bk")["held_out"]["share"]


def _early_exit_saving(r: Any) -> float:
    """1 - mean exit layer / layers at the threshold in force, from the validation calibration
    of the best epoch (the record's with/without figures are on test windows: not read)."""
    calibrations = _measured(r, "use_early_exit")["calibrations"]
    cal = next((c for c in calibrations if c["epoch"] == r.best_epoch), calibrations[-1])
    row = next(t for t in cal["table"] if t["threshold"] == cal["chosen"])
    return 1 - row["mean_exit_layer"] / r.config["n_layers"]


@dataclass(frozen=True)
class Sweep:
    """One flag's sweep: ``setting`` of ``flag`` at ``values``; a saving flag has a ``saving``
    figure (higher saves more), a quality flag none."""

    flag: str
    setting: str
    values: tuple[Any, ...]
    why: str
    saving_figure: str | None = None
    saving: Callable[[Any], float] | None = None

    @property
    def short(self) -> str:
        return self.flag.removeprefix("use_")

    @property
    def goal(self) -> str:
        return "quality" if self.saving is None else "saving"

    @property
    def default(self) -> Any:
        fields = {f.name: f for f in dataclasses.fields(REGISTRY[self.flag].settings)}
        return fields[self.setting].default


_FLOPS_SAVED = "forward FLOPs saved, counted with and without the flag on the same weights"
SWEEPS: tuple[Sweep, ...] = (
    Sweep("use_koopman", "weight", (0.01, 0.1, 1.0),
          "0.1 and a decade either side: the auxiliary loss's weight is its one knob."),
    Sweep("use_physics_informed", "weight", (0.01, 0.1, 1.0),
          "0.1 and a decade either side: the penalty's weight is its one knob."),
    Sweep("use_pruning", "target_sparsity", (0.25, 0.5, 0.75),
          "A quarter, half and three quarters of the feed-forward hidden units removed.",
          "1 - forward_flops_ratio: " + _FLOPS_SAVED + " (pruned vs unpruned build)",
          _pruning_saving),
    Sweep("use_act", "bias_init", (-3.0, -2.0, -1.0),
          "Every value starts near full depth (at the default preset's 4 layers the summed "
          "initial halting probability stays below 1 - eps until the last layer), as the "
          "literature starts ACT; values closer to 0 let the ponder cost cut depth sooner.",
          "held_out.forward_flops_counted.saving: forward FLOPs saved on validation windows "
          "vs every token running every layer", _act_saving),
    Sweep("use_multi_scale", "factor", (2, 3, 4),
          "Shortening factors of the middle blocks: 2 (the hourglass papers' usual), 3 and 4.",
          "1 - forward_flops.ratio: " + _FLOPS_SAVED, _forward_flops_saving("use_multi_scale")),
    Sweep("use_sparse_bk", "target_share", (0.25, 0.5, 0.75),
          "A quarter, half and three quarters of the tokens routed into the BK chain.",
          "1 - held_out.share: share of tokens kept out of the BK chain on validation "
          "windows", _sparse_bk_saving),
    Sweep("use_early_exit", "positions", (0.03125, 0.0625, 0.125),
          "1/32, 1/16 and 1/8 of the positions have their exit losses trained: more "
          "trains better exits, at one head pass per sampled position and exit of training cost.",
          "1 - mean exit layer / layers, on the validation calibration windows at the "
          "calibrated threshold", _early_exit_saving),
    Sweep("use_curriculum", "initial_competence", (0.01, 0.1, 0.3),
          "Competence at step 0: 0.01 (Platanios et al. 2019), 0.1 and a milder 0.3."),
    Sweep("use_active_learning", "fraction", (0.25, 0.5, 0.75),
          "A quarter, half and three quarters of each pool of windows trained on."),
)
NOT_SWEPT: dict[str, str] = {
    "use_quantization": "Its one setting, `quantization_bits` (INT8 or INT4), is the storage "
                        "format the user wants, not a knob tuned on validation perplexity (INT8 "
                        "would always win on perplexity, INT4 on size); `record_windows` only "
                        "sizes the record.",
    "use_mixed_precision": "No setting changes what is trained: `timing_steps` only sizes the "
                           "with/without throughput record.",
    "use_analytic_gradient": "The adjoint sweep is exact: no setting changes the numbers; "
                             "`timing_repeats` only sizes the with/without timing record.",
}


def row_name(sweep: Sweep, value: Any) -> str:
    """``bk+<flag>`` for the current default (the ablation's row), else with the value."""
    if value == sweep.default:
        return f"bk+{sweep.short}"
    return f"bk+{sweep.short}-{sweep.setting}{format_value(value)}"


def sweep_rows(base: BenchmarkConfig, sweeps: Sequence[Sweep]) -> dict[str, BenchmarkConfig]:
    """Row name -> config: the baseline (no flag), then each sweep's flag alone at each value."""
    common = dict({f: False for f in OPTIMIZATION_FLAGS}, architecture="resnet_bk")
    rows = {BASELINE_ROW: base.replace(model_name=BASELINE_ROW, **common)}
    for sweep in sweeps:
        for value in sweep.values:
            settings = {k: dict(v) for k, v in base.flag_settings.items()}
            settings[sweep.short][sweep.setting] = value
            name = row_name(sweep, value)
            rows[name] = base.replace(model_name=name, flag_settings=settings,
                                      **dict(common, **{sweep.flag: True}))
    return {name: c.validate() for name, c in rows.items()}


def run_command(preset: str, overrides: Mapping[str, Any], sweep: Sweep | None = None,
                value: Any = None) -> str:
    """The ``bkbench run`` that trains a row's config (its run name aside)."""
    words = ["bkbench", "run", "--preset", preset, "--models", MODEL]
    for name, given in overrides.items():
        words.append(f"--{name.replace('_', '-')}={given}")
    if sweep is not None:
        words += [f"--run-suffix={sweep.short}-{sweep.setting}{format_value(value)}",
                  f"--use-{sweep.short.replace('_', '-')}",
                  f"--{sweep.short.replace('_', '-')}-{sweep.setting.replace('_', '-')}={value}"]
    return shlex.join(words)


def _costs(r: Any, row: str, command: str) -> dict[str, Any]:
    return {"row": row, "valid_perplexity": r.valid_perplexity, "training_flops": r.total_flops,
            "training_seconds": r.training_time, "tokens_per_second": r.tokens_per_second,
            "command": command}


def rule_text(sweep: Sweep, tolerance: float) -> str:
    if sweep.saving is None:
        return ("quality flag: the lowest validation perplexity; ties to the current default, "
                "then the earlier value")
    return (f"saving flag: the largest saving ({sweep.saving_figure}) among the values whose "
            f"validation perplexity is within {100 * tolerance:g}% of the baseline row's; if "
            "none is, the lowest validation perplexity; equal savings go to the lower "
            "validation perplexity, then to the current default, then to the earlier value")


def choose(sweep: Sweep, candidates: Sequence[Mapping[str, Any]], baseline_ppl: float,
           tolerance: float) -> tuple[Any, str]:
    """(value, why) by the rule; reads each candidate's ``valid_perplexity`` and ``saving``."""
    order = {c["value"]: (c["value"] != sweep.default, i) for i, c in enumerate(candidates)}
    lowest = min(candidates, key=lambda c: (c["valid_perplexity"], order[c["value"]]))
    if sweep.saving is None:
        return lowest["value"], f"lowest validation perplexity ({lowest['valid_perplexity']:.2f})"
    bound = baseline_ppl * (1 + tolerance)
    within = [c for c in candidates if c["valid_perplexity"] <= bound]
    if not within:
        return lowest["value"], (f"no value within {100 * tolerance:g}% of the baseline's "
                                 f"validation perplexity ({baseline_ppl:.2f}): the lowest "
                                 f"validation perplexity ({lowest['valid_perplexity']:.2f})")
    best = max(within, key=lambda c: (c["saving"], -c["valid_perplexity"],
                                      [-k for k in order[c["value"]]]))
    return best["value"], (f"largest saving ({best['saving']:.4f}) with validation perplexity "
                           f"{best['valid_perplexity']:.2f} <= {bound:.2f} (baseline "
                           f"{baseline_ppl:.2f} + {100 * tolerance:g}%)")


def flag_entry(sweep: Sweep, results: Mapping[str, Any], baseline_ppl: float, tolerance: float,
               preset: str, overrides: Mapping[str, Any]) -> dict[str, Any]:
    """One flag's part of the sweeps file, from its rows' results."""
    candidates = []
    for value in sweep.values:
        r = results[row_name(sweep, value)]
        saving = None if sweep.saving is None else float(sweep.saving(r))
        within = (None if sweep.saving is None
                  else r.valid_perplexity <= baseline_ppl * (1 + tolerance))
        candidates.append({"value": value, "saving": saving, "within_tolerance": within,
                           **_costs(r, row_name(sweep, value),
                                    run_command(preset, overrides, sweep, value))})
    chosen, why = choose(sweep, candidates, baseline_ppl, tolerance)
    return {"setting": sweep.setting, "default": sweep.default, "goal": sweep.goal,
            "saving_figure": sweep.saving_figure, "why_candidates": sweep.why,
            "rule": rule_text(sweep, tolerance), "candidates": candidates,
            "chosen": chosen, "why_chosen": why}


def build_sweeps(sweeps: Sequence[Sweep], results: Mapping[str, Any], *, preset: str,
                 overrides: Mapping[str, Any], command: str, tolerance: float = TOLERANCE,
                 parallel_jobs: int = 1) -> dict[str, Any]:
    """The sweeps file from the rows' results (by row name); checked against its schema."""
    base = results[BASELINE_ROW]
    out = {
        "kind": "bkbench flag sweeps", "preset": preset, "seed": base.seed,
        "split_scheme": base.config.get("split_scheme"), "selection_split": "validation",
        "tolerance": tolerance, "command": command,
        "setup": {k: v for k, v in base.config.items()
                  if k not in OPTIMIZATION_FLAGS and k not in ("model_name", "flag_settings")},
        "environment": base.environment,
        # rows reused from another folder (--resume) may come from other commits
        "commits": sorted({str(results[name].environment.get("git_commit"))
                           for name in [BASELINE_ROW] + [row_name(s, v) for s in sweeps
                                                         for v in s.values]}),
        "parallel_jobs": parallel_jobs,
        "timing_note": (None if parallel_jobs == 1 else
                        f"rows ran {parallel_jobs} at a time and competed for the CPU: training "
                        "seconds and tokens/s are not comparable between rows"),
        "baseline": _costs(base, BASELINE_ROW, run_command(preset, overrides)),
        "flags": {s.flag: flag_entry(s, results, base.valid_perplexity, tolerance, preset,
                                     overrides) for s in sweeps},
        "not_swept": dict(NOT_SWEPT),
    }
    check_flag_sweeps(out)
    return out


def format_sweeps(data: Mapping[str, Any]) -> str:
    """The sweeps as Markdown: one section per flag, as docs/flags.md shows them."""
    lines = ["# Flag default-setting sweeps (validation split)", ""]
    for flag in [*data["flags"], *data["not_swept"]]:
        lines += [f"## `{flag}`", "", *sweep_section(flag.removeprefix("use_"), data, flag)]
    return "\n".join(lines)


def select_sweeps(names: str | None) -> list[Sweep]:
    """The sweeps named by ``--flags`` (short names, comma-separated); all when None."""
    if names is None:
        return list(SWEEPS)
    by_short = {s.short: s for s in SWEEPS}
    wanted = [n.strip().removeprefix("use_") for n in names.split(",") if n.strip()]
    if not wanted:
        raise ConfigError(f"--flags {names!r} names no flag; give comma-separated flag names")
    for name in wanted:
        if "use_" + name in NOT_SWEPT:
            raise ConfigError(f"--flags: {name} has no setting to sweep: "
                              f"{NOT_SWEPT['use_' + name]}")
        if name not in by_short:
            raise ConfigError(f"--flags: unknown flag {name!r}; swept flags: {', '.join(by_short)}")
    if len(set(wanted)) != len(wanted):
        raise ConfigError(f"--flags {names!r} names a flag twice")
    return [by_short[n] for n in wanted]


def run_sweeps(preset: str, overrides: Mapping[str, Any], output_dir: str | Path, *,
               sweeps: Sequence[Sweep] = SWEEPS, jobs: int = 1, resume: bool = False,
               overwrite: bool = False, progress: bool = True, tolerance: float = TOLERANCE,
               command: str = "python -m bkbench.experiments.flag_sweeps",
               threads: str = "auto") -> dict[str, Any]:
    """Train every row (``bkbench ablate``'s way), then write the sweeps file; return it. The
    output folder is locked throughout, its workers included (bkbench.runlock)."""
    from ..runlock import FolderLock

    if not 0 <= tolerance < 1:
        raise ConfigError(f"--tolerance must be in [0, 1), got {tolerance}")
    if jobs < 1:
        raise ConfigError(f"--jobs must be at least 1, got {jobs}")
    if overwrite and resume:
        raise ConfigError("--overwrite and --resume contradict each other; pass one of them")
    output_dir = Path(output_dir)
    if (output_dir / SWEEPS_FILE).exists() and not (overwrite or resume):
        raise ConfigError(f"{output_dir / SWEEPS_FILE} exists; pass --resume to finish or reuse "
                          "its runs, --overwrite to redo them, or choose another --output-dir")
    base = build_run_configs(preset, {}, overrides, [MODEL])[0]
    rows = sweep_rows(base, sweeps)
    with FolderLock(output_dir) as folder:
        results = train_rows(list(rows.values()), output_dir, folder, jobs=jobs, resume=resume,
                             overwrite=overwrite, progress=progress, threads=threads)
        data = build_sweeps(sweeps, results, preset=preset, overrides=overrides,
                            command=command, tolerance=tolerance, parallel_jobs=jobs)
        write_json_atomic(output_dir / SWEEPS_FILE, data)
        write_bytes_atomic(output_dir / "flag_sweeps.md", format_sweeps(data).encode("utf-8"))
    return data


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bkbench.experiments.flag_sweeps",
        description="Each flag's main setting at a few values, chosen on validation perplexity "
                    "(docs/experiments.md).")
    p.add_argument("--preset", default="default", choices=sorted(PRESETS))
    p.add_argument("--data-dir", help="the dataset's folder (docs/data.md)")
    p.add_argument("--split-scheme", choices=["official", "proxy"])
    p.add_argument("--flags", metavar="A,B", help="sweep only these flags (default: all swept)")
    p.add_argument("--jobs", type=int, default=1,
                   help="rows at once (their timings then compete for the CPU)")
    p.add_argument("--tolerance", type=float, default=TOLERANCE,
                   help="relative validation perplexity above the baseline's that a saving "
                        "flag's value may cost (default: %(default)s)")
    p.add_argument("--max-steps", type=int, help="stop each run after this many steps")
    p.add_argument("--seed", type=int, help="random seed of every row")
    p.add_argument("--device", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--output-dir", type=Path,
                   help="default: benchmark_results/flag_sweeps/PRESET")
    p.add_argument("--resume", action="store_true", help="keep finished rows, continue the rest")
    p.add_argument("--overwrite", action="store_true", help="redo an existing sweep")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--threads", type=threads_option, default="auto", metavar="auto|N",
                   help="torch threads per run, as `bkbench run --threads` (default: auto)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    import logging

    from ..benchmark import RunFailedError
    from ..data import DataError

    argv = sys.argv[1:] if argv is None else list(argv)
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    overrides = {k: getattr(args, k) for k in ("data_dir", "split_scheme", "max_steps", "seed",
                                                  "device") if getattr(args, k) is not None}
    output_dir = args.output_dir or Path("benchmark_results") / "flag_sweeps" / args.preset
    try:
        data = run_sweeps(args.preset, overrides, output_dir, sweeps=select_sweeps(args.flags),
                          jobs=args.jobs, resume=args.resume, overwrite=args.overwrite,
                          progress=not args.quiet, tolerance=args.tolerance,
                          threads=args.threads,
                          command=shlex.join(["python", "-m", "bkbench.experiments.flag_sweeps",
                                              *argv]))
    except (ConfigError, DataError) as exc:
        print(f"flag_sweeps: error: {exc}", file=sys.stderr)
        return 2
    except RunFailedError as exc:
        return exc.exit_code
    print(format_sweeps(data))
    print(f"written: {output_dir / SWEEPS_FILE}, flag_sweeps.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
