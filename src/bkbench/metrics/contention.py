"""Was the machine busy while the steps were timed? Contention recorded beside every timing.

A training time says something about a model only if the process had the CPUs it asked for.
Perplexities do not care (the same run on a loaded machine gives the same numbers); times and
tokens/s do, by any factor. So every training run records, next to its timings:

* the machine's load: ``os.getloadavg()`` at the start and end of training, and sampled every
  :data:`SAMPLE_INTERVAL_S` seconds by a background thread (it sleeps in between);
* the CPUs available to the process (``os.sched_getaffinity``), the machine's CPUs and
  torch's intra-op threads;
* over the timed steps only (warm-up, evaluation and checkpoints excluded): wall time, the
  process's CPU time (all its threads), and, on Linux, the time its threads spent runnable but
  waiting for a CPU (``/proc/self/task/*/schedstat``, the run-queue delay);
* on CUDA, the GPU's utilization and its other processes, where ``pynvml`` or ``nvidia-smi``
  can tell (else the reason they cannot).

:func:`classify` marks the timings ``contended`` (with the reasons) when

1. the mean sampled 1-minute load average exceeds ``max_load_per_cpu`` (1.25) times the
   machine's CPUs. Not 1.0: the load counts this process's own threads, which by design fill
   the CPUs, so a quiet machine running us sits at about 1.0 per CPU; 1.25 means that on
   average a quarter of the machine's CPUs more was demanded than exists; or
2. the process's threads waited for a CPU, summed over threads, more than
   ``max_runqueue_wait`` (0.25) of the timed wall time, i.e. on average a quarter of a
   thread was ready to run and not running. This is the direct measure and reacts at once
   (the load average lags by a minute, so it misses short runs); where it is unavailable
   (not Linux), the fallback is
3. CPU time / wall time below ``min_cpu_per_thread`` (0.7) times the threads used
   (``min(torch threads, CPUs available)``). It is only a fallback because a model that
   does not keep all threads busy (small kernels, Python between them) falls below it on a
   quiet machine too; the run-queue delay has no such false alarm;
4. on CUDA, other processes were using the GPU at the end of training.

Comparisons and the claims audit do not judge time claims from contended runs: they say
UNTESTABLE, with these reasons. The thresholds are recorded in every result.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch

__all__ = ["ContentionMonitor", "Thresholds", "THRESHOLDS", "classify", "contention_reasons",
           "contended_reason", "TIME_METRICS", "SAMPLE_INTERVAL_S"]

#: Result fields that are timings (judged only from uncontended runs).
TIME_METRICS = ("training_time", "tokens_per_second")

#: Seconds between load-average samples (the kernel updates the load every 5 s).
SAMPLE_INTERVAL_S = 2.0


@dataclass(frozen=True)
class Thresholds:
    max_load_per_cpu: float = 1.25
    max_runqueue_wait: float = 0.25
    min_cpu_per_thread: float = 0.7


THRESHOLDS = Thresholds()


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 3) for x in os.getloadavg()]
    except OSError:  # pragma: no cover - platforms without a load average
        return None


def _cpus_available() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def _runqueue_wait_ns() -> dict[str, int] | None:
    """Run-queue delay so far of each of this process's threads, by thread id (Linux)."""
    out = {}
    try:
        tids = os.listdir("/proc/self/task")
    except OSError:
        return None
    for tid in tids:
        try:
            with open(f"/proc/self/task/{tid}/schedstat") as f:
                out[tid] = int(f.read().split()[1])
        except (OSError, IndexError, ValueError):
            continue  # a thread that ended meanwhile
    return out or None


def _gpu_state(device: torch.device) -> dict[str, Any]:
    """Utilization and the other processes of the GPU, or why they are unknown."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    me = os.getpid()
    try:
        import pynvml  # optional
        pynvml.nvmlInit()
        try:
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            util = pynvml.nvmlDeviceGetUtilizationRates(handle).gpu
            procs = pynvml.nvmlDeviceGetComputeRunningProcesses(handle)
            others = [{"pid": p.pid, "used_memory_mb": (p.usedGpuMemory or 0) / 2**20}
                      for p in procs if p.pid != me]
            return {"source": "pynvml", "utilization_percent": util, "other_processes": others}
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # noqa: BLE001 - absent or failing pynvml: try nvidia-smi
        pass
    if shutil.which("nvidia-smi") is None:
        return {"source": None, "reason": "neither pynvml nor nvidia-smi is available"}
    try:
        util = subprocess.run(
            ["nvidia-smi", f"--id={index}", "--query-gpu=utilization.gpu",
             "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=10)
        apps = subprocess.run(
            ["nvidia-smi", f"--id={index}", "--query-compute-apps=pid,used_memory",
             "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=10)
        others = []
        for line in apps.stdout.splitlines():
            pid, _, mem = line.partition(",")
            if pid.strip().isdigit() and int(pid) != me:
                others.append({"pid": int(pid), "used_memory_mb": float(mem or 0)})
        return {"source": "nvidia-smi", "utilization_percent": float(util.stdout.strip()),
                "other_processes": others}
    except (OSError, subprocess.SubprocessError, ValueError) as exc:
        return {"source": None, "reason": f"nvidia-smi failed: {exc}"}


def contention_reasons(record: dict[str, Any], thresholds: Thresholds = THRESHOLDS) -> list[str]:
    """Why the timings of ``record`` (a :meth:`ContentionMonitor.result`) are contended; [] if not."""
    reasons = []
    machine = record.get("machine_cpus") or 1
    load = record.get("load_mean")
    if load is not None and load > thresholds.max_load_per_cpu * machine:
        reasons.append(f"mean load average {load:.2f} > {thresholds.max_load_per_cpu:g} x "
                       f"{machine} CPUs")
    wait = record.get("runqueue_wait_per_wall")
    if wait is not None:
        if wait > thresholds.max_runqueue_wait:
            reasons.append(f"threads waited for a CPU {wait:.2f} x the timed wall time "
                           f"(> {thresholds.max_runqueue_wait:g})")
    else:
        ratio, threads = record.get("cpu_per_wall"), record.get("threads_used") or 1
        if ratio is not None and ratio < thresholds.min_cpu_per_thread * threads:
            reasons.append(f"CPU time / wall time {ratio:.2f} < {thresholds.min_cpu_per_thread:g}"
                           f" x {threads} threads")
    gpu = record.get("gpu_end") or {}
    if gpu.get("other_processes"):
        reasons.append(f"{len(gpu['other_processes'])} other process(es) on the GPU")
    return reasons


def contended_reason(name: str, record: dict[str, Any] | None) -> str | None:
    """``"<name>'s timings were contended: <reasons>"`` for a contended run's record, else None."""
    if not record or not record.get("contended"):
        return None
    return f"{name}'s timings were contended: " + "; ".join(record.get("reasons") or ["unknown"])


def classify(record: dict[str, Any], thresholds: Thresholds = THRESHOLDS) -> dict[str, Any]:
    """``record`` with ``contended``, ``reasons`` and ``thresholds`` filled in."""
    reasons = contention_reasons(record, thresholds)
    return {**record, "contended": bool(reasons), "reasons": reasons,
            "thresholds": asdict(thresholds)}


class ContentionMonitor:
    """Samples the load in a background thread; accumulates CPU, wall and wait over timed steps.

    ``start()`` before training, ``begin_step()``/``end_step()`` around each timed step,
    ``result()`` at the end. ``state()``/``ContentionMonitor(state=...)`` carry the
    accumulated numbers through a checkpoint, so a resumed run reports all its timed steps.
    """

    def __init__(self, device: torch.device | None = None, interval: float = SAMPLE_INTERVAL_S,
                 state: dict[str, Any] | None = None):
        self.device = device if device is not None else torch.device("cpu")
        self.interval = interval
        s = dict(state or {})
        self.wall = float(s.get("timed_wall_s", 0.0))
        self.cpu = float(s.get("timed_cpu_s", 0.0))
        self.wait = s.get("runqueue_wait_s", 0.0)
        self.samples: list[list[float]] = [list(x) for x in s.get("load_samples", [])]
        self.load_start = s.get("load_start")
        self.gpu_start = s.get("gpu_start")
        self.segments = int(s.get("segments", 0))
        self._offset = self.samples[-1][0] if self.samples else 0.0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._t0 = 0.0
        self._step: tuple[float, float, dict[str, int] | None] | None = None

    # --- background sampling -------------------------------------------------------------
    def start(self) -> "ContentionMonitor":
        self.segments += 1
        if self.load_start is None:
            self.load_start = _loadavg()
        if self.gpu_start is None and self.device.type == "cuda":
            self.gpu_start = _gpu_state(self.device)
        self._t0 = time.perf_counter()
        self._stop.clear()
        self._thread = threading.Thread(target=self._sample_loop, name="bkbench-load",
                                        daemon=True)
        self._thread.start()
        return self

    def _sample_loop(self) -> None:
        while not self._stop.wait(self.interval):
            load = _loadavg()
            if load is not None:
                with self._lock:
                    self.samples.append([round(self._offset + time.perf_counter() - self._t0, 3),
                                         load[0]])

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    # --- timed steps ---------------------------------------------------------------------
    def begin_step(self) -> None:
        self._step = (time.perf_counter(), time.process_time(), _runqueue_wait_ns())

    def end_step(self) -> None:
        if self._step is None:
            return
        wall0, cpu0, wait0 = self._step
        wait1 = _runqueue_wait_ns()
        self.wall += time.perf_counter() - wall0
        self.cpu += time.process_time() - cpu0
        if wait0 is None or wait1 is None or self.wait is None:
            self.wait = None
        else:  # threads started during the step count from 0, ended ones are lost
            self.wait += sum(max(0, w - wait0.get(tid, 0)) for tid, w in wait1.items()) / 1e9
        self._step = None

    # --- results -------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        with self._lock:
            samples = [list(x) for x in self.samples]
        return {"timed_wall_s": self.wall, "timed_cpu_s": self.cpu, "runqueue_wait_s": self.wait,
                "load_samples": samples, "load_start": self.load_start,
                "gpu_start": self.gpu_start, "segments": self.segments}

    def result(self, thresholds: Thresholds = THRESHOLDS) -> dict[str, Any]:
        """Everything recorded, classified (see the module docstring); stops the sampler."""
        self.stop()
        state = self.state()
        load_end = _loadavg()
        loads = [x[1] for x in state["load_samples"]]
        # too short a run for a sample: the start and end readings are all there is
        if not loads:
            loads = [x[0] for x in (state["load_start"], load_end) if x is not None]
        threads = torch.get_num_threads()
        cpus = _cpus_available()
        wall = state["timed_wall_s"]
        record = {
            **state,
            "load_end": load_end,
            "load_mean": round(sum(loads) / len(loads), 3) if loads else None,
            "load_max": max(loads) if loads else None,
            "machine_cpus": os.cpu_count(),
            "cpus_available": cpus,
            "torch_threads": threads,
            "threads_used": min(threads, cpus),
            "cpu_per_wall": state["timed_cpu_s"] / wall if wall > 0 else None,
            "runqueue_wait_per_wall": (state["runqueue_wait_s"] / wall
                                       if wall > 0 and state["runqueue_wait_s"] is not None
                                       else None),
            "gpu_end": _gpu_state(self.device) if self.device.type == "cuda" else None,
        }
        return classify(record, thresholds)
