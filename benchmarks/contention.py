"""What two CPU-bound neighbours cost a smoke run, with and without the thread policy.

Usage::

    python benchmarks/contention.py --data-dir DIR            # 3 rounds, 40 steps
    python benchmarks/contention.py --data-dir DIR --rounds 1 --steps 10 --models transformer_baseline

Conditions, each a ``bkbench run --preset smoke --split-scheme proxy --max-steps STEPS`` of
one model in a fresh process, its training time read from the results file
(``training_time``: the timed steps, no evaluation, no start-up):

* **quiet**: nothing else started by this script, every CPU's thread (``--threads`` = CPUs);
* **busy**: NEIGHBOURS (default 2) CPU-bound processes (a Python busy loop each) beside it,
  threads still one per CPU, as before the policy;
* **busy + policy**: the same neighbours, ``--threads auto`` (:mod:`bkbench.threads`: the
  CPUs the neighbours leave, at least one, and ``OMP_WAIT_POLICY=PASSIVE`` below the CPUs).

The conditions are interleaved (quiet, busy, busy + policy, then again) so that a change in
the machine's own load hits each alike; each cell is the median over rounds, with the
smallest and largest round in brackets, and the slowdown against quiet. With two neighbours
on two CPUs the fair share is half the machine, so about 2x is what a well-behaved run pays.
A "quiet" measured on a machine that is already busy is not quiet: the load average at each
measurement is printed, so judge the numbers by it.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bkbench.results import cpu_model

CONDITIONS = ("quiet", "busy", "busy + policy")


def _spin() -> None:  # a CPU-bound neighbour
    while True:
        pass


def _machine() -> str:
    import torch

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (f"{cpu_model()}; {os.cpu_count()} CPUs on the machine, {cpus} available; "
            f"torch {torch.__version__}; Python {platform.python_version()}; "
            f"load average at start {os.getloadavg()[0]:.2f}")


def _train_seconds(model: str, threads: str, args, out: Path) -> tuple[float, dict]:
    cmd = [sys.executable, "-m", "bkbench", "run", "--preset", "smoke", "--models", model,
           "--data-dir", str(args.data_dir), "--split-scheme", "proxy",
           "--max-steps", str(args.steps), "--threads", threads, "--quiet",
           "--output-dir", str(out), "--overwrite"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    result = json.loads((out / f"{model}_results.json").read_text())
    return result["training_time"], result["environment"].get("thread_policy", {})


def measure(args) -> dict[tuple[str, str], list[tuple[float, float, int]]]:
    """(model, condition) -> [(training seconds, load average, threads)] per round."""
    cpus = str(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
               else os.cpu_count())
    runs: dict[tuple[str, str], list[tuple[float, float, int]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for model in args.models.split(","):
                for condition in CONDITIONS:
                    neighbours = [] if condition == "quiet" else [
                        mp.Process(target=_spin, daemon=True) for _ in range(args.neighbours)]
                    for n in neighbours:
                        n.start()
                    try:
                        time.sleep(args.settle if neighbours else 0.0)
                        threads = "auto" if condition == "busy + policy" else cpus
                        seconds, policy = _train_seconds(model, threads, args,
                                                         Path(tmp) / f"{model}-{r}")
                    finally:
                        for n in neighbours:
                            n.terminate()
                            n.join()
                    runs.setdefault((model, condition), []).append(
                        (seconds, os.getloadavg()[0], int(policy.get("threads", 0))))
                    print(f"  round {r + 1}: {model:<22} {condition:<14} {seconds:7.2f} s "
                          f"(threads {policy.get('threads')}, load {os.getloadavg()[0]:.2f})",
                          file=sys.stderr)
    return runs


def table(runs, models: list[str]) -> str:
    head = f"{'model':<22}" + "".join(f" {c:>26}" for c in CONDITIONS)
    lines = [head, "-" * len(head)]
    for model in models:
        quiet = statistics.median(s for s, _, _ in runs[(model, "quiet")])
        cells = []
        for c in CONDITIONS:
            secs = [s for s, _, _ in runs[(model, c)]]
            med = statistics.median(secs)
            cells.append(f"{med:6.2f} s [{min(secs):.2f}-{max(secs):.2f}] {med / quiet:4.1f}x")
        lines.append(f"{model:<22}" + "".join(f" {cell:>26}" for cell in cells))
    threads = {c: sorted({t for m in models for _, _, t in runs[(m, c)]}) for c in CONDITIONS}
    lines.append("threads used: " + "; ".join(f"{c} {threads[c]}" for c in CONDITIONS))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, default=os.environ.get("BKBENCH_DATA_DIR"),
                        help="WikiText-2 folder (default: $BKBENCH_DATA_DIR)")
    parser.add_argument("--models", default="transformer_baseline,resnet_bk_baseline")
    parser.add_argument("--steps", type=int, default=40, help="training steps per run")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--neighbours", type=int, default=2, help="CPU-bound processes")
    parser.add_argument("--settle", type=float, default=1.0,
                        help="seconds the neighbours run before a measurement starts")
    args = parser.parse_args()
    if args.data_dir is None:
        parser.error("give --data-dir DIR or set BKBENCH_DATA_DIR")
    print(_machine())
    print(f"smoke preset, {args.steps} steps, {args.neighbours} CPU-bound neighbours, "
          f"{args.rounds} interleaved rounds; training_time (timed steps) per run")
    runs = measure(args)
    print(table(runs, args.models.split(",")))


if __name__ == "__main__":
    main()
