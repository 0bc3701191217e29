"""Benchmark results: the seed's field names, honest definitions, atomic JSON files.

Field meanings (the seed used some of these names for training-set numbers; here they are
held-out numbers, and the training-set ones are named as such):

- ``final_loss`` / ``final_perplexity``: test split, from the best-validation weights.
- ``best_perplexity``: best validation perplexity over the epochs (the model-selection number).
- ``epoch_losses``: mean *training* loss per epoch (cross-entropy only, dropout on).
- ``epoch_perplexities``: validation perplexity after each epoch (eval mode, whole split).
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import subprocess
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .atomic import write_json_atomic

SCHEMA_VERSION = 1
MAX_RESULTS_BYTES = 64 << 20  # a results file is tens of kilobytes


@dataclass
class BenchmarkResults:
    model_name: str
    config: dict[str, Any]

    # held-out numbers (see module docstring)
    final_loss: float
    final_perplexity: float
    best_perplexity: float
    test_loss: float
    test_perplexity: float
    test_bits_per_token: float
    test_tokens: int
    valid_loss: float
    valid_perplexity: float
    valid_bits_per_token: float
    valid_tokens: int
    best_epoch: int

    # training
    training_time: float                    # seconds in training steps, evaluation excluded
    total_tokens: int                       # target tokens trained on
    steps: int
    tokens_per_second: float                # training throughput, warm-up steps excluded
    epoch_losses: list[float]
    epoch_perplexities: list[float]
    epoch_times: list[float]
    eval_time: float

    # model
    num_parameters: int
    parameter_breakdown: dict[str, int]
    model_size_mb: float

    # data
    data: dict[str, Any]

    # cost measurements (filled by bkbench.metrics; null when not measured)
    forward_flops: int | None = None
    backward_flops: int | None = None
    optimizer_flops: int | None = None
    total_flops: int | None = None
    flops: dict[str, Any] | None = None
    peak_memory_mb: float | None = None
    memory: dict[str, Any] | None = None
    # was the machine busy over the timed steps? (bkbench.metrics.contention; null: unknown)
    contention: dict[str, Any] | None = None
    # held-out NLL in bits per byte of the split's UTF-8 text: comparable across tokenizers
    test_bits_per_byte: float | None = None
    valid_bits_per_byte: float | None = None
    # test perplexity per word (words + <eos> per line) whatever the tokenizer (eval.word_perplexity)
    test_word_perplexity: float | None = None

    # wall seconds of the run's phases (bkbench.progress.Phases): warm-up, build and causality
    # audit, training and evaluation (the evaluations also apart), FLOPs count, each flag's
    # record, and the whole run; null in results written before they were kept
    phase_seconds: dict[str, float] | None = None

    # durability: seconds spent writing checkpoints (excluded from training_time)
    checkpoint_time: float | None = None
    checkpoints_written: int | None = None

    # causality audit of the model as built (bkbench.audit); null when not audited
    causality: dict[str, Any] | None = None
    perplexity_valid_for_lm: bool = True

    # {flag: {"settings": {...}, "measured": {...}}} for every optimisation flag that was on
    flags: dict[str, Any] = field(default_factory=dict)

    seed: int = 0
    environment: dict[str, Any] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "BenchmarkResults":
        """The results in ``values``; ValueError naming the field if anything is malformed."""
        if not isinstance(values, dict):
            raise ValueError(f"results must be a JSON object, not a {type(values).__name__}")
        if values.get("schema_version") != SCHEMA_VERSION:
            raise ValueError(f"results schema_version {values.get('schema_version')!r} is not "
                             f"{SCHEMA_VERSION}; rerun the benchmark with this bkbench version")
        hints = typing.get_type_hints(cls)
        fields = {f.name: f for f in dataclasses.fields(cls)}
        missing = [name for name, f in fields.items() if name not in values
                   and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        if missing:
            raise ValueError(f"missing field(s) {', '.join(missing[:5])}")
        for name, value in values.items():
            if name in fields and not _matches(value, hints[name]):
                raise ValueError(f"field {name!r} is {json.dumps(value)[:60]}, not of type "
                                 f"{getattr(hints[name], '__name__', str(hints[name]))}")
        return cls(**{k: v for k, v in values.items() if k in fields})

    def save(self, path: str | Path) -> Path:
        return write_json_atomic(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> "BenchmarkResults":
        """Read a results file; ValueError (or OSError) for anything that is not one."""
        path = Path(path)
        if path.stat().st_size > MAX_RESULTS_BYTES:
            raise ValueError(f"{path.stat().st_size} bytes, more than a results file can hold")
        try:
            values = json.loads(path.read_bytes().decode("utf-8"))
        except (UnicodeDecodeError, RecursionError) as exc:
            raise ValueError(f"not a JSON text ({type(exc).__name__})") from None
        return cls.from_dict(values)


def _matches(value: Any, hint: Any) -> bool:
    """Whether a JSON value fits a field's type hint (int counts as float, bool as neither)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin is list:
        return isinstance(value, list) and all(_matches(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict) and all(_matches(v, args[1]) for v in value.values())
    return isinstance(value, origin or hint)


def cpu_model() -> str:
    """The processor's name, as the results' environment records it."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> str | None:
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True,
                             text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def environment(device: torch.device) -> dict[str, Any]:
    """Where the numbers came from: versions, hardware, commit."""
    from . import __version__
    env = {
        "bkbench_version": __version__,
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "platform": platform.platform(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "git_commit": _git_commit(),
    }
    if device.type == "cuda":
        env["cuda_device"] = torch.cuda.get_device_name(device)
        env["cuda_version"] = torch.version.cuda
    return env
