"""``bkbench scale``: how training cost grows with sequence length (or model size).

For each model and each point of one swept axis (``n_seq``, ``d_model`` or ``n_layers``), a
child process of its own builds the model, warms every code path up on a tiny copy (imports,
compiled kernels), then measures on the point's real size:

* training tokens/s: the median over ``steps`` timed steps of the trainer's own ``train_step``
  (the same objective, optimizer and clipping as ``bkbench run``), after ``warmup`` untimed
  steps;
* peak memory: CPU, the child's peak RSS above its footprint just before the model is built;
  CUDA, ``max_memory_allocated``. One process per point, so no point inherits another's heap;
* FLOPs per token, total and of the mixer alone, from the FLOP counter on one real step.

The batch holds a fixed number of tokens (``tokens_per_batch // n_seq`` windows), so a cost
per token that grows with N is the mixer's, not the batch's. The data are random token ids of
the run's vocabulary size: cost does not depend on which tokens they are (the MoE's routing
does, a little; the counter's per-step spread is in the FLOP notes).

Each metric is fitted as cost = c * x^p in log-log space (:func:`fit_power_law`), per model,
with R^2. ``scale.json`` holds every point and fit; ``scale_<metric>.png`` plots them.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from ..atomic import write_json_atomic
from ..config import BenchmarkConfig, ConfigError
from .stats import fit_power_law

log = logging.getLogger(__name__)

__all__ = ["ScalePoint", "SWEEP_AXES", "METRICS", "measure_point", "run_scale", "fit_scale",
           "scale_claims", "load_scale", "plot_scale", "preset_vocab_size", "ScaleInterrupted"]

SWEEP_AXES = ("n_seq", "d_model", "n_layers")
# metric -> (label, unit); all "lower is better"
METRICS: dict[str, tuple[str, str]] = {
    "seconds_per_token": ("training time per token", "s"),
    "peak_memory_mb": ("peak memory", "MiB"),
    "flops_per_token": ("training FLOPs per token", "FLOP"),
    "mixer_flops_per_token": ("mixer FLOPs per token", "FLOP"),
}
SCALE_FILE = "scale.json"


@dataclass
class ScalePoint:
    model_name: str
    axis: str
    value: int
    batch_size: int
    n_seq: int
    tokens_per_second: float
    seconds_per_token: float
    step_seconds: list[float]
    peak_memory_mb: float
    memory_method: str
    flops_per_token: float
    mixer_flops_per_token: float
    num_parameters: int
    # was the machine busy over the timed steps? (bkbench.metrics.contention, as a run's)
    contention: dict[str, Any] | None = None


class _RandomTokens:
    """The trainer's data interface over random token ids (timing needs no real text)."""

    def __init__(self, vocab_size: int, tokens: int, seed: int):
        import torch

        gen = torch.Generator().manual_seed(seed)
        self.train = torch.randint(0, vocab_size, (tokens,), generator=gen)
        self.valid = self.test = self.train[: min(tokens, 4096)]

        class _V:
            eos_id = 0

            def __len__(self):
                return vocab_size
        self.vocab = _V()


def _one_step_trainer(config: BenchmarkConfig, vocab_size: int, device):
    from ..flags import build_model
    from ..train import Trainer, seed_everything

    seed_everything(config.seed)
    model, flags = build_model(config, vocab_size)
    data = _RandomTokens(vocab_size, config.batch_size * config.n_seq + 1, config.seed)
    trainer = Trainer(config, model, data, device, run_dir=None, progress=False, flags=flags)
    return trainer


def measure_point(config: BenchmarkConfig, vocab_size: int, steps: int, warmup: int,
                  axis: str) -> dict[str, Any]:
    """Measure one point in this process (call it in a fresh child; see the module docstring)."""
    import torch

    from ..metrics.contention import ContentionMonitor
    from ..metrics.memory import release_freed_memory
    from ..metrics.flops import measure_step_flops
    from ..metrics.memory import PeakMemory
    from ..train import resolve_device

    device = resolve_device(config.device)
    # every code path once on a tiny copy, so that imports, numba/Triton compilation and
    # one-time allocations are outside the measured window
    tiny = config.replace(n_seq=min(config.n_seq, 16), batch_size=2, max_steps=1, epochs=0)
    warm = _one_step_trainer(tiny, vocab_size, device)
    warm.train_step(*warm.window_batch(torch.arange(2)))
    del warm
    release_freed_memory()

    with PeakMemory(device) as memory:
        trainer = _one_step_trainer(config, vocab_size, device)
        batch = trainer.window_batch(torch.arange(config.batch_size))
        times = []
        monitor = ContentionMonitor(device).start()
        for i in range(warmup + steps):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if i >= warmup:
                monitor.begin_step()
            start = time.perf_counter()
            trainer.train_step(*batch)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if i >= warmup:
                times.append(time.perf_counter() - start)
                monitor.end_step()
        contention = monitor.result()
    report = measure_step_flops(trainer.model, config.batch_size, config.n_seq, vocab_size,
                                device=device, optimizer=trainer.optimizer,
                                compute_loss=trainer.compute_loss, seed=config.seed)
    tokens = config.batch_size * config.n_seq
    mixer = (report.forward_by_component.get("mixer", 0)
             + report.backward_by_component.get("mixer", 0))
    median = statistics.median(times)
    return ScalePoint(
        model_name=config.model_name, axis=axis, value=int(getattr(config, axis)),
        batch_size=config.batch_size, n_seq=config.n_seq, tokens_per_second=tokens / median,
        seconds_per_token=median / tokens, step_seconds=times,
        peak_memory_mb=memory.increase_bytes / 2**20, memory_method=memory.method,
        flops_per_token=report.total / tokens, mixer_flops_per_token=mixer / tokens,
        num_parameters=trainer.model.num_parameters(), contention=contention).__dict__


def _child(queue, config_dict, vocab_size, steps, warmup, axis) -> None:
    import signal
    # Ctrl-C is the parent's to handle (it keeps the finished points and stops this child):
    # a traceback per child would bury its one-line message
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        queue.put(("ok", measure_point(BenchmarkConfig.from_dict(config_dict), vocab_size,
                                       steps, warmup, axis)))
    except Exception as exc:  # reported by the parent with the point it belongs to
        queue.put(("error", f"{type(exc).__name__}: {exc}"))


def _measure_isolated(config: BenchmarkConfig, vocab_size: int, steps: int, warmup: int,
                      axis: str) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(queue, config.to_dict(), vocab_size, steps,
                                            warmup, axis))
    proc.start()
    try:
        status, payload = queue.get()
    except BaseException:   # Ctrl-C while it measured: stop it, keep nothing of the point
        proc.terminate()
        proc.join()
        raise
    proc.join()
    if status != "ok":
        raise RuntimeError(f"{config.model_name} at {axis}={getattr(config, axis)}: {payload}")
    return payload


def sweep_configs(base: Sequence[BenchmarkConfig], axis: str, values: Sequence[int],
                  tokens_per_batch: int | None) -> list[BenchmarkConfig]:
    """One config per (run, value); along n_seq the batch keeps ``tokens_per_batch`` tokens
    (default: the run's batch_size x n_seq, or the longest swept n_seq if that is more, so
    that every point holds at least one window)."""
    if axis not in SWEEP_AXES:
        raise ConfigError(f"scale sweeps one of {', '.join(SWEEP_AXES)}, not {axis!r}")
    if len(values) < 2 or len(set(values)) != len(values):
        raise ConfigError(f"--{axis.replace('_', '-')} needs two or more distinct values to fit "
                          f"an exponent, got {list(values)}")
    configs = []
    for config in base:
        tpb = tokens_per_batch or config.batch_size * config.n_seq
        if tokens_per_batch is None and axis == "n_seq":
            tpb = max(tpb, max(values))
        for value in values:
            changes: dict[str, Any] = {axis: int(value)}
            if axis == "n_seq":
                if tpb < value:
                    raise ConfigError(f"tokens_per_batch ({tpb}) is smaller than n_seq={value}: "
                                      "raise --tokens-per-batch")
                changes["batch_size"] = tpb // value
            configs.append(config.replace(**changes).validate())
    return configs


def fit_scale(points: list[dict[str, Any]], axis: str) -> dict[str, dict[str, Any]]:
    """Per model and metric: the power-law fit over the swept axis (None if < 2 points)."""
    fits: dict[str, dict[str, Any]] = {}
    for name in dict.fromkeys(p["model_name"] for p in points):
        mine = sorted((p for p in points if p["model_name"] == name), key=lambda p: p["value"])
        fits[name] = {}
        for metric in METRICS:
            xs = [p["value"] for p in mine if p[metric] and p[metric] > 0]
            ys = [p[metric] for p in mine if p[metric] and p[metric] > 0]
            fits[name][metric] = fit_power_law(xs, ys).to_dict() if len(xs) >= 2 else None
    return fits


class ScaleInterrupted(KeyboardInterrupt):
    """Ctrl-C during a sweep; the message says which points were kept and how to go on."""


def preset_vocab_size(config: BenchmarkConfig) -> int:
    """The vocabulary a run of ``config`` trains with: 256 byte values with ``tokenizer=byte``
    (the smoke preset), else the word vocabulary of the split scheme's training split
    (WikiText-2 tokens form: 33,278 official, 13,777 proxy)."""
    if config.tokenizer == "byte":
        return 256
    return 13_777 if config.split_scheme == "proxy" else 33_278


def _sweep_key(result: dict[str, Any]) -> dict[str, Any]:
    """What must match for an existing sweep's points to be reused by --resume."""
    keys = ("axis", "values", "tokens_per_batch", "steps", "warmup", "vocab_size", "configs")
    return {k: result.get(k) for k in keys}


def _resumed_points(path: Path, head: dict[str, Any], resume: bool,
                    overwrite: bool) -> list[dict[str, Any]]:
    if not path.exists() or overwrite:
        return []
    if not resume:
        raise ConfigError(f"{path} exists; pass --resume to measure only its missing points, "
                          "--overwrite to replace it, or choose another --output-dir")
    import json
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path} is unreadable ({exc}); pass --overwrite to replace it") from None
    if _sweep_key(old) != json.loads(json.dumps(_sweep_key(head))):
        raise ConfigError(f"{path} holds a sweep with other settings; --resume continues the "
                          "same command only (pass --overwrite to replace it)")
    return list(old.get("points") or [])


def run_scale(base: Sequence[BenchmarkConfig], axis: str, values: Sequence[int], vocab_size: int,
              output_dir: str | Path, *, tokens_per_batch: int | None = None, steps: int = 5,
              warmup: int = 2, overwrite: bool = False, progress: bool = True,
              resume: bool = False) -> dict[str, Any]:
    """Measure every point in its own process, fit, write ``scale.json`` and the plots.

    ``scale.json`` is rewritten after every point (``complete: false`` until the last), so
    that Ctrl-C (:class:`ScaleInterrupted`) keeps the finished points and ``resume``
    measures only the others. The output folder is locked throughout (bkbench.runlock)."""
    from ..runlock import FolderLock
    with FolderLock(output_dir) as folder:
        return _run_scale(base, axis, values, vocab_size, Path(output_dir), folder,
                          tokens_per_batch, steps, warmup, overwrite, progress, resume)


def _run_scale(base: Sequence[BenchmarkConfig], axis: str, values: Sequence[int],
               vocab_size: int, output_dir: Path, folder, tokens_per_batch: int | None,
               steps: int, warmup: int, overwrite: bool, progress: bool,
               resume: bool) -> dict[str, Any]:
    from ..progress import Phases, bar_size, duration
    from ..results import environment
    from ..train import resolve_device

    path = output_dir / SCALE_FILE
    if steps < 1 or warmup < 0:
        raise ConfigError(f"steps must be >= 1 and warmup >= 0, got {steps} and {warmup}")
    configs = sweep_configs(base, axis, values, tokens_per_batch)
    result = {
        "kind": "bkbench scale sweep", "axis": axis, "values": list(values),
        "tokens_per_batch": tokens_per_batch, "steps": steps, "warmup": warmup,
        "vocab_size": vocab_size, "data": "random token ids (cost does not depend on them)",
        "configs": {c.model_name: c.to_dict() for c in base},
        "environment": environment(resolve_device(base[0].device)),
    }
    done = {(p["model_name"], p["value"]): p
            for p in _resumed_points(path, result, resume, overwrite)}
    todo = [c for c in configs if (c.model_name, int(getattr(c, axis))) not in done]
    folder.hold()   # from here until scale.json is written no other command may write here
    output_dir.mkdir(parents=True, exist_ok=True)

    def save(complete: bool) -> None:
        points = [done[k] for k in ((c.model_name, int(getattr(c, axis))) for c in configs)
                  if k in done]
        result.update(points=points, fits=fit_scale(points, axis), complete=complete)
        write_json_atomic(path, result)

    from tqdm.auto import tqdm
    phases = Phases(f"scale {axis}", enabled=progress)
    bar = tqdm(total=len(configs), initial=len(configs) - len(todo), desc=f"scale {axis}",
               unit="point", disable=not progress or None, **bar_size())
    started, measured = time.monotonic(), 0
    try:
        for config in todo:
            value = int(getattr(config, axis))
            k = len(done) + 1
            with phases(f"point {k} of {len(configs)}: {config.model_name} {axis}={value}"):
                point = _measure_isolated(config, vocab_size, steps, warmup, axis)
            done[(config.model_name, value)] = point
            measured += 1
            save(complete=False)
            bar.update(1)
            eta = (time.monotonic() - started) / measured * (len(todo) - measured)
            log.info("%s %s=%d: %.0f tokens/s, %.1f MiB, %.3g FLOPs/token%s; point %d of %d, "
                     "ETA %s", config.model_name, axis, value, point["tokens_per_second"],
                     point["peak_memory_mb"], point["flops_per_token"],
                     " (contended)" if (point["contention"] or {}).get("contended") else "",
                     k, len(configs), duration(eta))
    except KeyboardInterrupt:
        raise ScaleInterrupted(
            f"interrupted after {len(done)} of {len(configs)} points; they are kept in {path}. "
            "Run the same command with --resume to measure the rest.") from None
    finally:
        bar.close()
    save(complete=True)
    plot_scale(result, output_dir)
    return result


def load_scale(results_dir: str | Path) -> dict[str, Any] | None:
    """The scale sweep of a results folder, or None when there is none (or it is unreadable)."""
    import json
    path = Path(results_dir) / SCALE_FILE
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("points"), list):
        return None
    if data.get("complete") is False:   # an interrupted sweep: finish it with --resume
        return None
    return data


def plot_scale(result: dict[str, Any], output_dir: str | Path) -> list[Path]:
    """One log-log plot per metric: measured points and the fitted line of each model."""
    import matplotlib
    matplotlib.use("Agg")
    import io

    import matplotlib.pyplot as plt

    from ..atomic import write_bytes_atomic

    axis, paths = result["axis"], []
    for metric, (label, unit) in METRICS.items():
        fig, ax = plt.subplots(figsize=(6, 4))
        for name, fits in result["fits"].items():
            pts = sorted((p for p in result["points"] if p["model_name"] == name),
                         key=lambda p: p["value"])
            xs = [p["value"] for p in pts if p[metric] > 0]
            ys = [p[metric] for p in pts if p[metric] > 0]
            if not xs:
                continue
            line, = ax.plot(xs, ys, "o", label=name)
            fit = fits.get(metric)
            if fit:
                grid = [xs[0] * (xs[-1] / xs[0]) ** (i / 20) for i in range(21)]
                ax.plot(grid, [fit["coefficient"] * g ** fit["exponent"] for g in grid], "-",
                        color=line.get_color(), alpha=0.7,
                        label=f"{name}: ∝ {axis}^{fit['exponent']:.2f} (R²={fit['r_squared']:.3f})")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(axis)
        ax.set_ylabel(f"{label} ({unit})")
        ax.set_title(f"{label} vs {axis}")
        ax.legend(fontsize=7)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110)
        plt.close(fig)
        path = Path(output_dir) / f"scale_{metric}.png"
        write_bytes_atomic(path, buf.getvalue())
        paths.append(path)
    return paths


def scale_claims(scale: dict[str, Any], baseline: str, candidate: str) -> dict[str, Any] | None:
    """What a sweep over n_seq says about the time and memory claims: the ratio baseline /
    candidate at the longest N both models ran, and both exponents. None if it cannot say."""
    from ..metrics.contention import contended_reason

    if scale.get("axis") != "n_seq":
        return None
    pts = {(p["model_name"], p["value"]): p for p in scale.get("points", [])}
    common = sorted({n for (m, n) in pts if m == baseline} & {n for (m, n) in pts if m == candidate})
    if not common:
        return None
    n = common[-1]
    tf, bk = pts[(baseline, n)], pts[(candidate, n)]
    fits = scale.get("fits", {})

    def exponent(model, metric):
        fit = (fits.get(model) or {}).get(metric)
        return fit["exponent"] if fit else None

    return {
        "n_seq": n,
        "speedup": tf["seconds_per_token"] / bk["seconds_per_token"],
        "memory_saving": (1 - bk["peak_memory_mb"] / tf["peak_memory_mb"]
                          if tf["peak_memory_mb"] > 0 else None),
        "time_exponents": {baseline: exponent(baseline, "seconds_per_token"),
                           candidate: exponent(candidate, "seconds_per_token")},
        "memory_exponents": {baseline: exponent(baseline, "peak_memory_mb"),
                             candidate: exponent(candidate, "peak_memory_mb")},
        "same_setup": _same_sweep_setup(scale, baseline, candidate),
        # why the two points' timings are contended (empty: neither was); memory is unaffected
        "contended": [w for p in (tf, bk) if (w := contended_reason(
            f"{p['model_name']} at n_seq = {n}", p.get("contention")))],
    }


def _same_sweep_setup(scale: dict[str, Any], a: str, b: str) -> list[str]:
    """Shared-setup fields in which the two models' sweep configs differ (empty: none)."""
    ca, cb = scale.get("configs", {}).get(a, {}), scale.get("configs", {}).get(b, {})
    keys = ("d_model", "n_layers", "batch_size", "n_seq", "device", "seed")
    return [k for k in keys if ca.get(k) != cb.get(k)]


def parse_int_list(text: str, name: str) -> list[int]:
    """``"128,512,2048"`` -> [128, 512, 2048], or a ConfigError naming the option."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"{name} takes comma-separated positive integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise ConfigError(f"{name} takes comma-separated positive integers, got {text!r}")
    return values


def format_scale(result: dict[str, Any]) -> str:
    """A plain-text table of the points and the fitted exponents."""
    axis = result["axis"]
    lines = [f"scale sweep over {axis}: {result['values']}"]
    header = f"{'model':<24} {axis:>7} {'tokens/s':>10} {'peak MiB':>9} {'FLOP/token':>11} {'mixer FLOP/tok':>14}"
    lines += [header, "-" * len(header)]
    for p in result["points"]:
        busy = "  contended" if (p.get("contention") or {}).get("contended") else ""
        lines.append(f"{p['model_name']:<24} {p['value']:>7} {p['tokens_per_second']:>10,.0f} "
                     f"{p['peak_memory_mb']:>9.1f} {p['flops_per_token']:>11.3e} "
                     f"{p['mixer_flops_per_token']:>14.3e}{busy}")
    lines.append("")
    lines.append(f"fitted exponents p (cost ∝ {axis}^p, R² in brackets)")
    for name, fits in result["fits"].items():
        parts = []
        for metric in METRICS:
            f = fits.get(metric)
            parts.append(f"{metric}: " + ("n/a" if f is None else
                                          f"{f['exponent']:.2f} ({f['r_squared']:.3f})"))
        lines.append(f"  {name}: " + "; ".join(parts))
    return "\n".join(lines)
