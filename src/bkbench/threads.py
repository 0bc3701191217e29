"""How many threads a run uses, chosen when it starts from how busy the machine is.

On a machine whose CPUs other processes already keep busy, torch's default (one intra-op
thread per CPU) makes our threads wait for each other at every parallel region while the
neighbours hold the CPUs: OpenMP workers spin at the barrier, the one still running waits for
a CPU, and a step costs several times its fair share (issue 28: smoke preset on 2 cores with
two CPU-bound neighbours, Transformer 4.7x and ResNet-BK 6.7x slower than quiet; with one
thread 1.7x and 1.8x, about the fair 2x).

Policy ``auto`` (the default): count the other processes that want a CPU, as the mean of the
kernel's count of runnable tasks (``procs_running`` in ``/proc/stat``, this process's sampling
thread taken off) over :data:`SAMPLE_SECONDS`; use the CPUs they leave, at least one:
``threads = clamp(round(cpus - others), 1, cpus)`` (others scaled to this process's share of
the machine's CPUs when its affinity allows fewer). When that is fewer than the CPUs, OpenMP
threads also sleep rather than spin while waiting (``OMP_WAIT_POLICY=PASSIVE``), which must be
in the environment before torch loads: it is set for the run's own process
(:meth:`ThreadPolicy.environ`). A number (``--threads N``) uses N threads whatever the load.
The choice is made once, at the start of each run, and written into the run's results
(``environment.thread_policy``).

Torch-free: the parent process decides before it starts a run's process.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from typing import Any

#: How long the runnable tasks are sampled before a run starts (the kernel's load average
#: lags by a minute, and a command's previous run would count in it).
SAMPLE_SECONDS = 0.5
_SAMPLES = 10


def cpus_available() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def _procs_running() -> int | None:
    try:
        with open("/proc/stat") as f:
            for line in f:
                if line.startswith("procs_running"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def other_runnable(seconds: float = SAMPLE_SECONDS) -> tuple[float, str]:
    """(mean number of other runnable tasks, how it was measured)."""
    counts = []
    for i in range(_SAMPLES):
        n = _procs_running()
        if n is None:
            break
        counts.append(n - 1)   # this process, running while it reads
        if i < _SAMPLES - 1:
            time.sleep(seconds / (_SAMPLES - 1))
    if counts:
        return sum(counts) / len(counts), f"/proc/stat procs_running, {len(counts)} samples"
    load = os.getloadavg()[0]   # pragma: no cover - not Linux: the lagging 1-minute load
    return load, "1-minute load average"


@dataclass(frozen=True)
class ThreadPolicy:
    requested: str               # "auto" or the number asked for
    threads: int                 # torch intra-op threads the run uses
    cpus_available: int
    others_runnable: float | None
    measured_by: str | None
    omp_wait_policy: str | None  # set for the run's process (None: left as it was)

    def environ(self) -> dict[str, str]:
        """Environment of a run's process: read by OpenMP and numba when torch loads."""
        env = {"OMP_NUM_THREADS": str(self.threads)}
        if self.omp_wait_policy is not None:
            env["OMP_WAIT_POLICY"] = self.omp_wait_policy
        return env

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def parse_threads(text: str) -> str:
    """``--threads`` value: 'auto' or a positive integer (ValueError otherwise)."""
    if text == "auto":
        return text
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"--threads must be 'auto' or a positive integer, got {text!r}")
    return str(int(text))


def threads_option(text: str) -> str:
    """:func:`parse_threads` as an argparse ``type``: a bad value is a usage error."""
    import argparse
    try:
        return parse_threads(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def choose(requested: str = "auto") -> ThreadPolicy:
    """The thread count for a run that starts now."""
    cpus = cpus_available()
    if requested != "auto":
        return ThreadPolicy(requested, int(requested), cpus, None, None,
                            os.environ.get("OMP_WAIT_POLICY"))
    others, how = other_runnable()
    # the count is the machine's; with fewer CPUs than the machine's (affinity, cpuset), take
    # this process's share of it, as if the others were spread over every CPU
    others *= cpus / max(cpus, os.cpu_count() or cpus)
    threads = max(1, min(cpus, round(cpus - others)))
    wait = "PASSIVE" if threads < cpus else os.environ.get("OMP_WAIT_POLICY")
    return ThreadPolicy("auto", threads, cpus, round(others, 2), how, wait)


__all__ = ["ThreadPolicy", "choose", "parse_threads", "threads_option", "cpus_available",
           "other_runnable", "SAMPLE_SECONDS"]
