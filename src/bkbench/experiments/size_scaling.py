"""Quality against model size: ``bkbench scale --train --d-model 64,128,256 [--seeds 0,1]``.

Every named model is trained at every size of the swept axis (``d_model`` or ``n_layers``), once
per seed, to the same budget of training tokens (``--max-tokens``) or counted FLOPs
(``--budget-flops``) on the chosen data (``--dataset``, ``--tokenizer`` ...), and evaluated on
the held-out test split.  Per model, the test loss is fitted against the parameter count and
against the counted training FLOPs by a power law with an irreducible term,

    loss(x) = E + A * x^(-alpha),

by least squares (``scipy.optimize.curve_fit``), with R^2 and the degrees of freedom left
(points - 3; a fit with none left passes through its points and says nothing about its form).
The gap of each model to the reference (the Transformer) is given per size with the Welch
interval over the seeds, and the verdict says whether it widens or narrows from the smallest to
the largest size only when the two intervals do not overlap.

Writes ``size_scaling.json``, ``size_scaling.png`` and the runs' own results into the output
folder; :func:`size_scaling_section` is the report section.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from .stats import summarize, welch_difference_ci

AXES = ("d_model", "n_layers")
SIZE_SCALING_FILE = "size_scaling.json"
REFERENCE = "transformer_baseline"
DEFAULT_MODELS = "transformer_baseline,resnet_bk_baseline,resnet_bk_full,gla_baseline"


@dataclass(frozen=True)
class SaturatingFit:
    """loss = irreducible + coefficient * x ** -exponent, fitted on ``points`` points."""

    irreducible: float
    coefficient: float
    exponent: float
    r2: float
    points: int
    dof: int

    def predict(self, x: float | np.ndarray) -> float | np.ndarray:
        return self.irreducible + self.coefficient * np.power(x, -self.exponent)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def fit_saturating_power_law(xs: Sequence[float], ys: Sequence[float]) -> SaturatingFit:
    """Least-squares fit of y = E + A x^-alpha with 0 <= E <= min(y), A >= 0, 0 <= alpha <= 10.

    x is divided by its geometric mean during the fit (x spans decades; the parameters would
    otherwise differ by as many orders of magnitude).  Needs three distinct positive x values.
    """
    from scipy.optimize import curve_fit

    x, y = np.asarray(xs, dtype=np.float64), np.asarray(ys, dtype=np.float64)
    if x.shape != y.shape or np.unique(x).size < 3:
        raise ValueError("a fit with an irreducible term needs points at 3 or more distinct x")
    if not (np.all(x > 0) and np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
        raise ValueError("the fit needs positive, finite x and finite y")
    scale = float(np.exp(np.log(x).mean()))
    u = x / scale

    def model(u, e, a, alpha):
        return e + a * np.power(u, -alpha)

    low = float(y.min())
    p0 = (0.5 * low if low > 0 else 0.0, max(float(y.mean() - 0.5 * low), 1e-6), 0.5)
    upper_e = low if low > 0 else 1e-12
    (e, a, alpha), _ = curve_fit(model, u, y, p0=p0, bounds=([0, 0, 0], [upper_e, np.inf, 10]),
                                 maxfev=20_000)
    residual = y - model(u, e, a, alpha)
    total = y - y.mean()
    ss_tot = float(total @ total)
    r2 = 1.0 - float(residual @ residual) / ss_tot if ss_tot > 0 else 1.0
    return SaturatingFit(float(e), float(a * scale ** alpha), float(alpha), r2, int(x.size),
                         int(x.size) - 3)


# --------------------------------------------------------------------------------------------
# The sweep
# --------------------------------------------------------------------------------------------

def sweep_configs(bases: Sequence[Any], axis: str, values: Sequence[int],
                  seeds: Sequence[int]) -> list[tuple[str, int, int, Any]]:
    """(model, size, seed, config) for every model, size and seed: the budget is the base
    config's max_tokens or budget_flops alone (epochs and max_steps are cleared)."""
    if axis not in AXES:
        raise ValueError(f"--train sweeps model size: --d-model or --n-layers, not {axis}")
    out = []
    for base in bases:
        if base.max_tokens is None and base.budget_flops is None:
            raise ValueError("scale --train trains every size to one budget: give --max-tokens "
                             "or --budget-flops")
        for v in values:
            for s in seeds:
                name = f"{base.model_name}-{axis}{v}-seed{s}"
                config = base.replace(**{axis: v}, seed=s, model_name=name, epochs=0,
                                      max_steps=None).validate()
                out.append((base.model_name, v, s, config))
    return out


def run_size_sweep(planned: Sequence[tuple[str, int, int, Any]], axis: str, output_dir: Path,
                   progress: bool = True, overwrite: bool = False,
                   threads: str = "auto") -> dict[str, Any]:
    """Train (or, with finished results of the same config, reuse) every planned run, then fit."""
    from ..atomic import write_json_atomic
    from ..benchmark import WikiText2Benchmark

    bench = WikiText2Benchmark(output_dir, progress=progress, threads=threads)
    points = []
    for model, v, seed, config in planned:
        started = (bench.results_path(config.model_name).exists()
                   or bench.run_dir(config.model_name).exists())
        r = bench.run_benchmark(config, resume=started and not overwrite, overwrite=overwrite)
        points.append({"model": model, "size": v, "seed": seed, "params": r.num_parameters,
                       "train_flops": r.total_flops, "train_tokens": r.total_tokens,
                       "test_loss": r.test_loss, "test_bits_per_byte": r.test_bits_per_byte})
    first = planned[0][3].to_dict()
    table = analyse(points, axis)
    table["setup"] = {k: first.get(k) for k in ("dataset", "tokenizer", "split_scheme",
                                                "max_tokens", "budget_flops", "n_seq",
                                                "batch_size")}
    write_json_atomic(Path(output_dir) / SIZE_SCALING_FILE, table)
    plot_size_scaling(table, Path(output_dir) / "size_scaling.png")
    return table


def _fit_or_reason(xs: list[float], ys: list[float]) -> dict[str, Any]:
    try:
        return fit_saturating_power_law(xs, ys).to_dict()
    except (ValueError, RuntimeError) as exc:   # too few sizes, or no convergence
        return {"error": str(exc)}


def analyse(points: list[dict[str, Any]], axis: str) -> dict[str, Any]:
    """Fits per model, loss summaries per size, and each model's gap to the reference."""
    models = list(dict.fromkeys(p["model"] for p in points))
    sizes = sorted({p["size"] for p in points})
    fits, losses = {}, {}
    for m in models:
        mine = [p for p in points if p["model"] == m]
        fits[m] = {"params": _fit_or_reason([p["params"] for p in mine],
                                            [p["test_loss"] for p in mine])}
        if all(p["train_flops"] for p in mine):
            fits[m]["train_flops"] = _fit_or_reason([p["train_flops"] for p in mine],
                                                    [p["test_loss"] for p in mine])
        losses[m] = {v: [p["test_loss"] for p in mine if p["size"] == v] for v in sizes}
    reference = REFERENCE if REFERENCE in models else models[0]
    gaps = {m: gap_by_size(losses[m], losses[reference], sizes) for m in models if m != reference}
    return {"axis": axis, "sizes": sizes, "reference": reference, "points": points, "fits": fits,
            "loss_by_size": {m: {str(v): summarize(ls).to_dict() for v, ls in by.items() if ls}
                             for m, by in losses.items()},
            "gaps": gaps}


def gap_by_size(mine: dict[int, list[float]], ref: dict[int, list[float]],
                sizes: list[int]) -> dict[str, Any]:
    """Mean test-loss difference to the reference per size (with its Welch 95% interval when
    both have two or more seeds), and whether it widens or narrows from the smallest size to
    the largest: decided only when those two intervals do not overlap."""
    rows = {}
    for v in sizes:
        if not mine.get(v) or not ref.get(v):
            continue
        ci = welch_difference_ci(mine[v], ref[v])
        diff = float(np.mean(mine[v]) - np.mean(ref[v]))
        rows[str(v)] = {"diff": diff, "low": ci[1] if ci else None, "high": ci[2] if ci else None}
    verdict = "fewer than two sizes"
    if len(rows) >= 2:
        a, b = rows[min(rows, key=int)], rows[max(rows, key=int)]
        direction = "widens" if abs(b["diff"]) > abs(a["diff"]) else "narrows"
        if a["low"] is None or b["low"] is None:
            verdict = f"{direction} (one seed: no spread to judge it by)"
        elif a["high"] < b["low"] or b["high"] < a["low"]:
            verdict = direction
        else:
            verdict = f"not resolved: the seeds' intervals overlap (mean {direction})"
    return {"by_size": rows, "verdict": verdict}


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------

def plot_size_scaling(table: dict[str, Any], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, label in ((axes[0], "params", "parameters"),
                           (axes[1], "train_flops", "training FLOPs (counted)")):
        for m in table["fits"]:
            pts = [p for p in table["points"] if p["model"] == m and p.get(key)]
            if not pts:
                continue
            xs = np.array([p[key] for p in pts], dtype=float)
            line = ax.plot(xs, [p["test_loss"] for p in pts], "o", label=m)[0]
            fit = table["fits"][m].get(key) or {}
            if "exponent" in fit:
                grid = np.geomspace(xs.min(), xs.max(), 50)
                ax.plot(grid, SaturatingFit(**fit).predict(grid), "-", color=line.get_color(),
                        label=f"{m}: alpha={fit['exponent']:.2f}")
        ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("test loss (nats/token)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"Test loss vs model size (swept: {table['axis']})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _fit_text(fit: dict[str, Any] | None) -> str:
    if not fit:
        return "n/a"
    if "error" in fit:
        return f"no fit ({fit['error']})"
    return (f"E={fit['irreducible']:.3f}, alpha={fit['exponent']:.3f}, R²={fit['r2']:.3f}, "
            f"dof={fit['dof']}")


def size_scaling_rows(table: dict[str, Any]) -> tuple[list[list[str]], list[list[str]]]:
    """(fit rows: model, fit vs params, fit vs FLOPs; gap rows: model, size, gap, verdict)."""
    fits = [[m, _fit_text(f.get("params")), _fit_text(f.get("train_flops"))]
            for m, f in table["fits"].items()]
    gaps = []
    for m, g in table["gaps"].items():
        largest = max(g["by_size"], key=int, default=None)
        for v, row in g["by_size"].items():
            ci = ("" if row["low"] is None else f" [{row['low']:+.3f}, {row['high']:+.3f}]")
            # the verdict compares the smallest size with the largest: said once, on the latter
            gaps.append([m, v, f"{row['diff']:+.3f}{ci}", g["verdict"] if v == largest else ""])
    return fits, gaps


def size_scaling_section(doc, table: dict[str, Any], image: str = "size_scaling.png") -> None:
    """The report section (``doc`` has the report document's h/p/table/image methods)."""
    fits, gaps = size_scaling_rows(table)
    setup = table.get("setup") or {}
    doc.h(2, "Quality against model size")
    doc.p(f"Each model trained at each {table['axis']} of {', '.join(map(str, table['sizes']))} "
          f"to the same budget ({_budget(setup)}) on {setup.get('dataset')} "
          f"({setup.get('tokenizer')} tokenizer, {setup.get('split_scheme')} split scheme), "
          "evaluated on the held-out test split. Fit: test loss = E + A·x^(−alpha); dof = points "
          "− 3 (with 0 the curve passes through its points and its form is not tested).")
    doc.table(["model", "vs parameters", "vs training FLOPs"], fits)
    doc.p(f"Gap of each model's test loss to {table['reference']} (nats/token; negative = "
          "lower loss), with the Welch 95% interval over the seeds, and whether it widens or "
          "narrows from the smallest to the largest size.")
    doc.table(["model", table["axis"], "gap", "verdict"], gaps)
    doc.image(image, "test loss against parameters and training FLOPs")


def _budget(setup: dict[str, Any]) -> str:
    if setup.get("max_tokens"):
        return f"{setup['max_tokens']:,} training tokens"
    return f"{setup.get('budget_flops'):.3g} counted FLOPs"


def format_size_scaling(table: dict[str, Any]) -> str:
    fits, gaps = size_scaling_rows(table)
    out = ["model fits (test loss = E + A x^-alpha):"]
    out += [f"  {m}: vs params {p}; vs FLOPs {f}" for m, p, f in fits]
    out.append(f"gap to {table['reference']} (test loss):")
    out += [f"  {m} {table['axis']}={v}: {gap}" + (f"  -> {verdict}" if verdict else "")
            for m, v, gap, verdict in gaps]
    return "\n".join(out)


def main_from_args(args, axis: str, values: list[int],
                   configs_from_args: Callable[[Any], list]) -> int:
    """``bkbench scale --train``: the CLI hook (cli._cmd_scale)."""
    from ..config import ConfigError
    from .seeds import parse_seeds

    seeds = parse_seeds(args.seeds) if args.seeds else None
    args.seeds = None
    if not args.models:
        args.models = DEFAULT_MODELS
    bases = configs_from_args(args)
    try:
        planned = sweep_configs(bases, axis, values, seeds or [bases[0].seed])
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    table = run_size_sweep(planned, axis, args.output_dir, progress=not args.quiet,
                           overwrite=args.overwrite, threads=args.threads or "auto")
    print(format_size_scaling(table))
    print(f"\nwritten: {args.output_dir / 'size_scaling.json'}, size_scaling.png")
    return 0
