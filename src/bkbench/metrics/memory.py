"""Peak memory of a stretch of work, on CUDA and on the CPU.

CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` -- bytes of live
tensors allocated by PyTorch's caching allocator on that device (parameters, gradients,
optimizer state, activations, workspaces); the allocator's cached-but-free blocks and the CUDA
context are not included.

CPU: the process's peak resident set size (``VmHWM`` in ``/proc/self/status``), reset at the
start with ``/proc/self/clear_refs`` (Linux >= 4.0), minus the resident size at the start.
The figure is everything the process touched above that baseline -- tensors, the allocator's
free lists, Python objects, library workspaces -- not just tensors. Because memory freed by
an earlier run may be reused rather than counted, and because allocators keep freed memory,
one run can only be isolated from another by running each in its own child process (the
benchmark does so): the baseline is then the child's idle footprint just before the model is
built. Where the peak cannot be reset, the figure is the peak since the process started, and
``method`` says so.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os
import resource
import sys
from pathlib import Path
from typing import Any

import torch

__all__ = ["rss_bytes", "peak_rss_bytes", "reset_peak_rss", "release_freed_memory", "PeakMemory"]

_STATUS = Path("/proc/self/status")


def _status_kib(field: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def _ru_maxrss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB elsewhere


def rss_bytes() -> int:
    """Current resident set size of this process, in bytes."""
    kib = _status_kib("VmRSS")
    if kib is not None:
        return kib * 1024
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return _ru_maxrss_bytes()  # no better figure available


def peak_rss_bytes() -> int:
    """Peak resident set size (high-water mark) of this process, in bytes.

    ``VmHWM`` (which :func:`reset_peak_rss` can reset); else ``getrusage``'s ``ru_maxrss``,
    the peak since the process started.
    """
    kib = _status_kib("VmHWM")
    if kib is not None:
        return kib * 1024
    return _ru_maxrss_bytes()


def reset_peak_rss() -> bool:
    """Reset the peak RSS to the current RSS (Linux: ``echo 5 > /proc/self/clear_refs``).

    Returns False where that is unsupported (the peak then stays the lifetime peak).
    """
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return _status_kib("VmHWM") is not None


def release_freed_memory() -> None:
    """Return freed heap memory to the OS so that a peak-RSS baseline means what it says."""
    gc.collect()
    libc_name = ctypes.util.find_library("c")
    if libc_name:
        try:
            ctypes.CDLL(libc_name).malloc_trim(0)
        except (OSError, AttributeError):  # not glibc
            pass


class PeakMemory:
    """Context manager measuring peak memory on ``device`` over its body.

    After exit: ``peak_bytes``, ``baseline_bytes`` (at entry, unless given: a window that
    continues an earlier one keeps that one's baseline), ``increase_bytes`` (peak above
    baseline) and ``method`` (what the numbers include). ``to_dict()`` gives them all.
    """

    def __init__(self, device: str | torch.device = "cpu", baseline_bytes: int | None = None):
        self.device = torch.device(device)
        self.peak_bytes: int | None = None
        self.baseline_bytes: int | None = baseline_bytes
        self._fixed_baseline = baseline_bytes is not None
        self.increase_bytes: int | None = None
        self.method: str = ""
        self.reset_supported: bool | None = None

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            if not self._fixed_baseline:
                self.baseline_bytes = torch.cuda.memory_allocated(self.device)
            self.reset_supported = True
            self.method = ("cuda max_memory_allocated: live PyTorch tensors on the device "
                           "(parameters, gradients, optimizer state, activations, workspaces); "
                           "allocator cache and CUDA context excluded; baseline = allocated at "
                           "the start")
        else:
            self.reset_supported = reset_peak_rss()
            if not self._fixed_baseline:
                self.baseline_bytes = rss_bytes()
            if self.reset_supported:
                self.method = ("cpu peak RSS (VmHWM, reset via /proc/self/clear_refs) above the "
                               "RSS at the start: all memory the process touched -- tensors, "
                               "allocator free lists, Python objects, library workspaces")
            else:
                self.method = ("cpu peak RSS since the process started (the peak could not be "
                               "reset on this system) above the RSS at the start: includes "
                               "anything that ran earlier in this process")
        if self._fixed_baseline:
            self.method += "; the baseline was taken by the caller before this window began"
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device)
        else:
            self.peak_bytes = max(peak_rss_bytes(), rss_bytes())
        self.increase_bytes = max(0, self.peak_bytes - (self.baseline_bytes or 0))

    def to_dict(self) -> dict[str, Any]:
        mib = (lambda b: None if b is None else b / 2**20)
        return {"device": str(self.device), "peak_bytes": self.peak_bytes,
                "baseline_bytes": self.baseline_bytes, "increase_bytes": self.increase_bytes,
                "peak_mb": mib(self.peak_bytes), "increase_mb": mib(self.increase_bytes),
                "reset_supported": self.reset_supported, "method": self.method}
