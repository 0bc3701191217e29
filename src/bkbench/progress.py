"""What a user watching a run sees between training steps: which run of the command this is,
the command's ETA, and which phase is running.

Training has its own progress (a tqdm bar in a terminal, :class:`bkbench.train.ProgressLines`
in a log). The phases around it (evaluations, FLOPs counts, each flag's record, an audit, a
sweep) can run for minutes: :class:`Phases` names each when it starts and, while it runs,
says every ``interval`` seconds that it still does, so no phase is silent for longer.

Torch-free: the command line builds these before any model exists.
"""

from __future__ import annotations

import logging
import os
import shutil
import statistics
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator

log = logging.getLogger(__name__)


def duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


@dataclass
class CommandProgress:
    """Run ``index`` (from 1) of ``count`` in one command, and how long the runs before it took.

    The command's ETA is this run's remaining time plus, for each later run, the mean wall
    time of the finished runs (or, before any run has finished, this run's projected total):
    an estimate from measured figures, which the runs' different sizes make rough.
    """

    index: int
    count: int
    finished_seconds: list[float] = field(default_factory=list)
    run_started: float = field(default_factory=time.time)   # wall clock: crosses processes
    unit: str = "run"   # what the command calls one of its runs (an ablation's "row")

    def label(self) -> str:
        return f"{self.unit} {self.index} of {self.count}"

    def eta(self, run_remaining: float, now: float | None = None) -> float:
        later = self.count - self.index
        if self.finished_seconds:
            per_run = statistics.fmean(self.finished_seconds)
        else:
            per_run = ((now or time.time()) - self.run_started) + run_remaining
        return run_remaining + later * per_run

    def suffix(self, run_remaining: float) -> str:
        return f"{self.label()}, command ETA {duration(self.eta(run_remaining))}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Phases:
    """``with phases("test evaluation"): ...`` logs the phase's start, a line every
    ``interval`` seconds while it runs, and its end with the time it took (kept in
    :attr:`seconds`, for the results)."""

    def __init__(self, name: str, interval: float = 30.0, enabled: bool = True,
                 command: CommandProgress | None = None):
        self.name, self.interval, self.enabled, self.command = name, interval, enabled, command
        self.seconds: dict[str, float] = {}

    def _who(self) -> str:
        return f"{self.name} ({self.command.label()})" if self.command else self.name

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        start = time.monotonic()
        stop = threading.Event()
        beat = None
        if self.enabled:
            log.info("%s: %s ...", self._who(), phase)

            def heartbeat():
                # at least a second apart: a tiny interval (tests) must not flood the log
                while not stop.wait(max(self.interval, 1.0)):
                    log.info("%s: %s still running, %s so far", self._who(), phase,
                             duration(time.monotonic() - start))

            beat = threading.Thread(target=heartbeat, name=f"phase {phase}", daemon=True)
            beat.start()
        try:
            yield
        finally:
            stop.set()
            if beat is not None:
                beat.join()
            elapsed = time.monotonic() - start
            self.seconds[phase] = self.seconds.get(phase, 0.0) + elapsed
            if self.enabled:
                log.info("%s: %s done in %s", self._who(), phase, duration(elapsed))


def bar_size(stream=None) -> dict[str, Any]:
    """tqdm's size arguments for ``stream`` (stderr): its own when the terminal reports one.

    A pseudo-terminal that reports 0 x 0 (``script -qfc``, many CI runners, a pty opened
    without a size) makes tqdm hide its bar (every row counts as overflow), so the bar never
    appeared there; such terminals get $COLUMNS x $LINES, else 80 x 24, instead."""
    stream = stream or sys.stderr
    try:
        size = os.get_terminal_size(stream.fileno())
    except (AttributeError, OSError, ValueError):
        size = os.terminal_size((0, 0))
    if size.columns > 0 and size.lines > 0:
        return {"dynamic_ncols": True}
    fallback = shutil.get_terminal_size((80, 24))
    return {"ncols": fallback.columns or 80, "nrows": fallback.lines or 24}


__all__ = ["CommandProgress", "Phases", "bar_size", "duration"]
