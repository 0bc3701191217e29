"""One bkbench command per output folder, and no worker outliving its ``bkbench run``.

- :class:`RunLock`: an exclusive ``flock`` on ``<output_dir>/.bkbench.lock`` holding the PID of
  the process that took it. Every command that writes into a folder (run, ablate, scale,
  report) holds it while it does (:class:`FolderLock`); a second one on the same folder fails
  at once naming that PID.
  The lock belongs to the open file, so a killed holder releases it; the isolated worker
  inherits the descriptor, so the folder stays locked until the worker is gone too.
- :func:`die_with_parent`: called first thing in a worker process. On Linux the kernel sends
  the worker SIGTERM when its parent dies (``PR_SET_PDEATHSIG``); everywhere a watcher thread
  also polls the parent's PID. SIGTERM takes the training's checkpoint-and-exit path, so a
  later ``--resume`` continues where the worker stopped.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import fcntl
import os
import signal
import sys
import threading
import time
from pathlib import Path

from .config import ConfigError

LOCK_NAME = ".bkbench.lock"
_PR_SET_PDEATHSIG = 1


class RunLock:
    def __init__(self, output_dir: str | Path):
        self.path = Path(output_dir) / LOCK_NAME
        self.fd: int | None = None

    def acquire(self) -> "RunLock":
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise ConfigError(
                f"output folder {str(self.path.parent)[:200]!r} is in use by another bkbench "
                f"command (PID {holder}); wait for it to finish, stop it, or choose another "
                "--output-dir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing drops the flock; the file stays, harmlessly
            self.fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


class FolderLock:
    """The :class:`RunLock` of a command's output folder, held from ``with`` to its end:
    taken on entry when the folder exists (a busy folder stops the command before any work),
    else by :meth:`hold`, which creates the folder once the command's checks have passed (bad
    input creates nothing)."""

    def __init__(self, output_dir: str | Path):
        self.output_dir = Path(output_dir)
        self.lock: RunLock | None = None

    def __enter__(self) -> "FolderLock":
        if self.output_dir.is_dir():
            self.lock = RunLock(self.output_dir).acquire()
        return self

    def hold(self) -> int:
        """Create and lock the folder if not yet done; the lock's descriptor (for workers)."""
        if self.lock is None:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            self.lock = RunLock(self.output_dir).acquire()
        return self.lock.fd

    def __exit__(self, *exc) -> None:
        if self.lock is not None:
            self.lock.release()


def die_with_parent(parent_pid: int, poll_seconds: float = 0.5) -> None:
    """SIGTERM this process when ``parent_pid`` is no longer its parent."""
    if sys.platform.startswith("linux"):
        libc_name = ctypes.util.find_library("c")
        if libc_name:
            try:
                ctypes.CDLL(libc_name, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
            except (OSError, AttributeError):
                pass
    # the parent may have died before prctl took effect; the watcher covers that and non-Linux
    if os.getppid() != parent_pid:
        os.kill(os.getpid(), signal.SIGTERM)

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(poll_seconds)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="bkbench-parent-watch", daemon=True).start()
