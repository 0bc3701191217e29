"""``bkbench ablate``: which of ResNet-BK's optimization flags helps, measured one at a time.

Rows, all with the same training setup and seeds: the ResNet-BK baseline (no flag), each
implemented flag alone, and every flag together. Each row is an ordinary ``bkbench run`` (its
own child process, results file, checkpoints and ``--resume``), so a row's numbers equal a
single run of the same config bit for bit. The table (``ablation.json``, ``ablation.md``,
``ablation.png``) gives per row: test perplexity (mean ± 95% CI over seeds), its difference
from the baseline with the Welch interval of that difference and Welch's t-test p-value,
also adjusted by Holm's method for the number of rows compared with the one baseline, FLOPs
per step, training tokens/s, peak memory and model size.

``--jobs N`` runs N rows at once: that finishes sooner but the rows then compete for the CPU,
so their timings are not comparable with each other (the table says so); perplexities and
FLOPs are unaffected.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from ..atomic import write_bytes_atomic, write_json_atomic
from ..config import BenchmarkConfig, ConfigError, OPTIMIZATION_FLAGS
from ..flags.registry import REGISTRY
from ..progress import duration
from ..results import BenchmarkResults
from ..threads import ThreadPolicy
from ..threads import choose as choose_threads
from .seeds import SIGNIFICANCE, expand_seeds
from .stats import holm_adjust, summarize, welch_difference_ci, welch_test

log = logging.getLogger(__name__)

__all__ = ["ablation_rows", "run_ablation", "build_table", "applicable_flags", "format_table",
           "load_ablation", "table_rows", "table_notes", "ABLATION_FILE"]

ABLATION_FILE = "ablation.json"
BASELINE_ROW = "bk-baseline"
ALL_ROW = "bk-all"


def applicable_flags(architecture: str = "resnet_bk") -> list[str]:
    """The implemented optimization flags that apply to ``architecture``, in the seed's order."""
    return [f for f in OPTIMIZATION_FLAGS if f in REGISTRY and architecture in REGISTRY[f].architectures]


def _row_name(flag: str) -> str:
    return "bk+" + flag.removeprefix("use_")


def ablation_rows(base: BenchmarkConfig) -> dict[str, BenchmarkConfig]:
    """Row name -> config: baseline, each applicable flag alone, all of them together."""
    off = {f: False for f in OPTIMIZATION_FLAGS}
    flags = applicable_flags("resnet_bk")
    if not flags:
        raise ConfigError("no optimization flag is implemented for resnet_bk: nothing to ablate")
    common = dict(off, architecture="resnet_bk")
    rows = {BASELINE_ROW: base.replace(model_name=BASELINE_ROW, **common)}
    for flag in flags:
        rows[_row_name(flag)] = base.replace(model_name=_row_name(flag), **dict(common, **{flag: True}))
    if len(flags) > 1:
        rows[ALL_ROW] = base.replace(model_name=ALL_ROW, **dict(common, **{f: True for f in flags}))
    return {name: c.validate() for name, c in rows.items()}


def _payload(config: BenchmarkConfig, output_dir: Path, resume: bool, overwrite: bool,
             policy: ThreadPolicy) -> str:
    return json.dumps({"config": config.to_dict(), "output_dir": str(output_dir),
                       "resume": resume, "overwrite": overwrite, "progress": False,
                       "thread_policy": policy.to_dict(),
                       "parent_pid": os.getpid()})  # the worker dies with this process


def _run_parallel(configs: Sequence[BenchmarkConfig], output_dir: Path, resume: bool,
                  jobs: int, overwrite: bool = False, pass_fds: Sequence[int] = (),
                  threads: str = "auto") -> None:
    """Each config in a ``bkbench.worker`` child, at most ``jobs`` at once; SIGTERM/SIGINT are
    forwarded so that every child checkpoints, and no further row starts. A failed child fails
    the ablation. Each child's threads are chosen as it starts (``threads``: "auto" or a number,
    bkbench.threads)."""
    pending, running, failed, signals = list(configs), [], [], []
    started, finished = time.time(), 0

    def forward(signum, _frame):
        signals.append(signum)
        for _, p in running:
            p.send_signal(signum)
    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        while running or (pending and not signals):
            while pending and not signals and len(running) < jobs:
                c = pending.pop(0)
                policy = choose_threads(threads)
                running.append((c, subprocess.Popen(
                    [sys.executable, "-m", "bkbench.worker",
                     _payload(c, output_dir, resume, overwrite, policy)],
                    pass_fds=tuple(pass_fds), env={**os.environ, **policy.environ()})))
            if not running:   # a signal came before any row of this round started
                break
            # whichever child ends first frees its slot (waiting on the oldest would idle a core
            # while a shorter row behind it has already finished)
            while (done := next((r for r in running if r[1].poll() is not None), None)) is None:
                time.sleep(0.2)
            running.remove(done)
            c, code = done[0], done[1].returncode
            finished += 1
            if code != 0:
                failed.append((c.model_name, code))
                log.info("ablate: row %s stopped (exit code %d)", c.model_name, code)
                continue
            # rows finish about as fast as each other: the command's ETA from those so far
            left = (time.time() - started) / finished * (len(configs) - finished)
            log.info("ablate: row %s done (%d of %d), command ETA %s", c.model_name, finished,
                     len(configs), duration(left))
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    from ..benchmark import RunFailedError
    if signals:
        log.warning("ablate: interrupted by signal %d; %d of %d rows not started. Run the same "
                    "command with --resume to continue.", signals[0], len(pending), len(configs))
        raise RunFailedError(failed[0][0] if failed else configs[0].model_name, 128 + signals[0])
    if failed:
        name, code = failed[0]
        raise RunFailedError(name, code)


def run_ablation(base: BenchmarkConfig, output_dir: str | Path, *, seeds: Sequence[int] | None = None,
                 jobs: int = 1, resume: bool = False, overwrite: bool = False,
                 progress: bool = True, threads: str = "auto") -> dict[str, Any]:
    """Train every row (per seed), then write the ablation table; return it. The output
    folder is locked throughout, its workers included (bkbench.runlock)."""
    from ..runlock import FolderLock
    with FolderLock(output_dir) as folder:
        return _run_ablation(base, Path(output_dir), folder, seeds, jobs, resume, overwrite,
                             progress, threads)


def _run_ablation(base: BenchmarkConfig, output_dir: Path, folder, seeds: Sequence[int] | None,
                  jobs: int, resume: bool, overwrite: bool, progress: bool,
                  threads: str) -> dict[str, Any]:
    table_path = output_dir / ABLATION_FILE
    if overwrite and resume:
        raise ConfigError("--overwrite and --resume contradict each other; pass one of them")
    if table_path.exists() and not (overwrite or resume):
        raise ConfigError(f"{table_path} exists; pass --resume to finish or reuse its runs, "
                          "--overwrite to redo them, or choose another --output-dir")
    if jobs < 1:
        raise ConfigError(f"--jobs must be at least 1, got {jobs}")
    rows = ablation_rows(base)
    configs = list(rows.values())
    if seeds:
        configs = expand_seeds(configs, seeds)
    results = train_rows(configs, output_dir, folder, jobs=jobs, resume=resume,
                         overwrite=overwrite, progress=progress, threads=threads)
    table = build_table(rows, results, seeds, parallel_jobs=jobs)
    write_json_atomic(table_path, table)
    write_bytes_atomic(output_dir / "ablation.md", format_table(table).encode("utf-8"))
    plot_ablation(table, output_dir / "ablation.png")
    return table


def train_rows(configs: Sequence[BenchmarkConfig], output_dir: Path, folder, *, jobs: int,
               resume: bool, overwrite: bool, progress: bool,
               threads: str = "auto") -> dict[str, BenchmarkResults]:
    """Train every config as an isolated ``bkbench.worker`` run (``jobs`` at once) into the
    locked ``folder``, after every check that can refuse one; their results by run name.
    The ablation's rows and the flag sweeps' candidates both run through here."""
    from ..benchmark import WikiText2Benchmark
    from ..train import resolve_device, steps_per_epoch
    from ..validation import check_model_size, check_selection_pool

    bench = WikiText2Benchmark(output_dir, progress=progress, threads=threads)
    data = bench.load_data(configs[0])   # data, training size and each row's memory and
    steps_per_epoch(configs[0], data.train.numel())   # FLOP budget checked before any work
    for c in configs:
        check_model_size(c, len(data.vocab), resolve_device(c.device))
        check_selection_pool(c, (data.train.numel() - 1) // c.n_seq)
    for c in configs:  # no row may replace a finished run unless asked to
        bench.check_can_write(c, resume=resume, overwrite=overwrite)
    bench.worker_fds = (folder.hold(),)   # the workers keep the folder locked while they live
    if jobs == 1:
        bench.run_all(configs, resume=resume, overwrite=overwrite, isolate=True, unit="row")
    elif to_train := bench.split_finished(configs, resume, unit="row")[1]:
        _run_parallel(to_train, output_dir, resume, jobs, overwrite, bench.worker_fds, threads)
    return {c.model_name: BenchmarkResults.load(bench.results_path(c.model_name))
            for c in configs}


def _values(results: dict[str, BenchmarkResults], row: str, seeds: Sequence[int] | None,
            field: str) -> list[float]:
    names = [f"{row}-seed{s}" for s in seeds] if seeds else [row]
    out = []
    for n in names:
        r = results[n]
        if field == "step_flops":
            out.append(float(r.forward_flops + r.backward_flops + r.optimizer_flops))
        else:
            out.append(float(getattr(r, field)))
    return out


def build_table(rows: dict[str, BenchmarkConfig], results: dict[str, BenchmarkResults],
                seeds: Sequence[int] | None, parallel_jobs: int = 1) -> dict[str, Any]:
    """The ablation table from the rows' results files."""
    base_ppl = _values(results, BASELINE_ROW, seeds, "test_perplexity")
    table_rows = []
    for name, config in rows.items():
        ppl = _values(results, name, seeds, "test_perplexity")
        row: dict[str, Any] = {
            "row": name, "flags": config.enabled_flags(),
            "runs": [f"{name}-seed{s}" for s in seeds] if seeds else [name],
            "test_perplexity": summarize(ppl).to_dict(),
        }
        mean_ppl, mean_base = sum(ppl) / len(ppl), sum(base_ppl) / len(base_ppl)
        delta: dict[str, Any] = {"delta": mean_ppl - mean_base, "ci_low": None, "ci_high": None,
                                 "relative": (mean_ppl - mean_base) / mean_base}
        if name != BASELINE_ROW:
            ci = welch_difference_ci(ppl, base_ppl)
            if ci is not None:
                delta["ci_low"], delta["ci_high"] = ci[1], ci[2]
            else:
                delta["why_no_ci"] = ("one seed: rerun with --seeds 1,2,3" if len(ppl) < 2
                                      else "no spread over the seeds")
        row["delta_vs_baseline"] = delta
        for field in ("step_flops", "tokens_per_second", "peak_memory_mb", "model_size_mb"):
            row[field] = summarize(_values(results, name, seeds, field)).to_dict()
        if name != BASELINE_ROW:   # Welch's t-test against the baseline, as run comparisons do
            row["welch_vs_baseline"] = {
                field: welch_test(_values(results, name, seeds, field),
                                  _values(results, BASELINE_ROW, seeds, field))
                for field in ("test_perplexity", "tokens_per_second")}
        table_rows.append(row)
    tests = [row["welch_vs_baseline"]["test_perplexity"] for row in table_rows
             if "welch_vs_baseline" in row]
    for test, p_holm in zip(tests, holm_adjust([t["p_value"] for t in tests])):
        test["p_holm"] = p_holm
    first = results[table_rows[0]["runs"][0]]
    return {
        "kind": "bkbench ablation", "seeds": list(seeds) if seeds else [first.seed],
        "split_scheme": first.config.get("split_scheme"),
        "setup": {k: v for k, v in first.config.items()
                  if k not in OPTIMIZATION_FLAGS and k not in ("model_name", "seed")},
        "parallel_jobs": parallel_jobs,
        "timing_note": (None if parallel_jobs == 1 else
                        f"rows ran {parallel_jobs} at a time and competed for the CPU: "
                        "tokens/s are not comparable between rows"),
        "rows": table_rows,
    }


def _mean_ci(s: dict[str, Any], spec: str) -> str:
    if s.get("ci_high") is None:
        return format(s["mean"], spec)
    return f"{format(s['mean'], spec)} ± {format(s['ci_high'] - s['mean'], spec)}"


ABLATION_HEADERS = ["row", "flags", "test ppl", "Δ vs baseline", "FLOPs/step", "tokens/s",
                    "peak mem (MiB)", "size (MiB)"]


def table_notes(table: dict[str, Any]) -> list[str]:
    """The paragraphs that go above the table (proxy label, what the columns mean)."""
    notes = []
    if table.get("split_scheme") == "proxy":
        notes.append("**PROXY split scheme**: not comparable to official WikiText-2 numbers.")
    notes.append(f"Seeds: {', '.join(map(str, table['seeds']))}. Mean ± half-width of the 95% "
                 "interval over seeds; Δ is the difference of test perplexity from the baseline "
                 "with its Welch interval, Welch's t-test p-value (two-sided) and that p-value "
                 "adjusted by Holm's method for all the rows compared with the one baseline "
                 f"(not significant at Holm p >= {SIGNIFICANCE}).")
    if table.get("timing_note"):
        notes.append(f"Note: {table['timing_note']}.")
    return notes


def table_rows(table: dict[str, Any]) -> list[list[str]]:
    """One list of cells per row, in the order of ABLATION_HEADERS."""
    rows = []
    for r in table["rows"]:
        d = r["delta_vs_baseline"]
        delta = f"{d['delta']:+.2f} ({100 * d['relative']:+.2f}%)"
        if d.get("ci_low") is not None:
            delta += f" [{d['ci_low']:+.2f}, {d['ci_high']:+.2f}]"
        test = (r.get("welch_vs_baseline") or {}).get("test_perplexity", {})
        p, p_holm = test.get("p_value"), test.get("p_holm")
        if p is not None:
            delta += f", p = {p:.3g}"
            judged = p   # tables written before the adjustment have no Holm p
            if p_holm is not None:
                delta += f", Holm p = {p_holm:.3g}"
                judged = p_holm
            delta += "" if judged < SIGNIFICANCE else " (not significant)"
        rows.append([
            r["row"], ", ".join(f.removeprefix("use_") for f in r["flags"]) or "none",
            _mean_ci(r["test_perplexity"], ".2f"), delta,
            f"{r['step_flops']['mean']:.3e}", _mean_ci(r["tokens_per_second"], ",.0f"),
            _mean_ci(r["peak_memory_mb"], ",.1f"), f"{r['model_size_mb']['mean']:.2f}"])
    return rows


def format_table(table: dict[str, Any]) -> str:
    """The ablation table as Markdown."""
    lines = ["# ResNet-BK ablation", ""]
    for note in table_notes(table):
        lines += [note, ""]
    lines += ["| " + " | ".join(ABLATION_HEADERS) + " |", "|" + "---|" * len(ABLATION_HEADERS)]
    lines += ["| " + " | ".join(cells) + " |" for cells in table_rows(table)]
    return "\n".join(lines) + "\n"


def load_ablation(results_dir: str | Path) -> dict[str, Any] | None:
    """The ablation table of a results folder, or None when there is none (or it is unreadable)."""
    try:
        data = json.loads((Path(results_dir) / ABLATION_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("rows"), list):
        return None
    return data


def plot_ablation(table: dict[str, Any], path: Path) -> Path:
    """Test perplexity difference from the baseline per row, with its interval when seeds allow."""
    import io

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = table["rows"]
    names = [r["row"] for r in rows]
    deltas = [r["delta_vs_baseline"]["delta"] for r in rows]
    errs = [[d - (r["delta_vs_baseline"]["ci_low"] if r["delta_vs_baseline"]["ci_low"] is not None else d)
             for d, r in zip(deltas, rows)],
            [(r["delta_vs_baseline"]["ci_high"] if r["delta_vs_baseline"]["ci_high"] is not None else d) - d
             for d, r in zip(deltas, rows)]]
    fig, ax = plt.subplots(figsize=(max(5, 0.8 * len(rows) + 2), 3.8))
    ax.bar(range(len(rows)), deltas, yerr=errs, capsize=4,
           color=["#7f7f7f"] + ["#1f77b4"] * (len(rows) - 1))
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(rows)), names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("test perplexity − baseline (lower is better)")
    ax.set_title("ResNet-BK ablation" + (" (PROXY data)" if table.get("split_scheme") == "proxy" else ""))
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return write_bytes_atomic(path, buf.getvalue())
