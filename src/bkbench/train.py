"""The training engine: one run of one model, from a config to held-out numbers.

- AdamW with decoupled weight decay on matrices only, linear warm-up then cosine decay;
- training windows of ``n_seq`` targets cut from the training stream, in a seeded random order
  per epoch (the order of epoch e depends only on the seed and e, which makes resuming exact);
- gradient clipping, and a hard stop naming the step on a NaN/Inf loss or gradient norm;
- validation perplexity after every epoch, test perplexity at the end from the best-validation
  weights;
- checkpoints every ``checkpoint_every`` steps and at each epoch end, exact resume, a
  checkpoint on SIGTERM/SIGINT before exiting;
- DistributedDataParallel when launched under torchrun: each rank takes a disjoint shard of
  every global batch, the loss is normalised by the global token count so the gradient equals
  the single-process one, and only rank 0 writes files.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import signal
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from .checkpoint import (list_checkpoints, load_latest_checkpoint, remove_checkpoints,
                         save_checkpoint)
from .config import BenchmarkConfig
from .errors import ConfigError
from .eval import EvalResult, evaluate, target_nll
from .flags import FlagSet, build_model
from .hooks import RunContext
from .metrics.contention import ContentionMonitor
from .metrics.memory import release_freed_memory
from .models.dropout import dropout_key
from .seeding import seed_everything  # noqa: F401 (bkbench.train.seed_everything, as before)
from .progress import CommandProgress, Phases, bar_size, duration

log = logging.getLogger(__name__)

# config fields that must match for a checkpoint to be resumed (everything that changes the
# numbers); durability and logging settings may differ
_RESUME_IGNORED_FIELDS = {"checkpoint_every", "keep_checkpoints", "tensorboard", "device",
                          "data_dir", "eval_batch_size"}


class TrainingDivergedError(FloatingPointError):
    """The loss or the gradient became NaN/Inf; the message names the step."""


class TrainingInterrupted(RuntimeError):
    """SIGTERM/SIGINT arrived; a checkpoint was written and the run can be resumed."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


class CheckpointMismatchError(ValueError):
    """A checkpoint belongs to a different config."""


@dataclass
class TrainOutcome:
    epoch_losses: list[float]
    epoch_perplexities: list[float]
    epoch_times: list[float]
    step_losses: list[float]
    valid: EvalResult
    test: EvalResult
    best_epoch: int
    steps: int
    total_tokens: int
    training_time: float
    eval_time: float
    tokens_per_second: float
    checkpoint_time: float = 0.0
    checkpoints_written: int = 0
    resumed_from_step: int | None = None
    contention: dict[str, Any] | None = None   # bkbench.metrics.contention, over the timed steps


@dataclass
class _Progress:
    """Everything about where training is that a checkpoint must restore."""
    epoch: int = 0                 # epoch in progress (0-based)
    batch_in_epoch: int = 0        # batches of that epoch already done
    step: int = 0                  # optimizer steps done
    tokens: int = 0                # target tokens trained on
    training_time: float = 0.0
    timed_tokens: int = 0          # tokens and time after the timing warm-up
    timed_time: float = 0.0
    epoch_time: float = 0.0        # time spent so far in the epoch in progress
    epoch_loss_sum: float = 0.0
    epoch_loss_count: int = 0
    eval_time: float = 0.0
    checkpoint_time: float = 0.0   # seconds spent writing checkpoints (not in training_time)
    checkpoints_written: int = 0
    best_valid: dict[str, Any] | None = None   # EvalResult of the best epoch, as a dict
    best_epoch: int = -1
    epoch_losses: list[float] = field(default_factory=list)
    epoch_perplexities: list[float] = field(default_factory=list)
    epoch_times: list[float] = field(default_factory=list)
    step_losses: list[float] = field(default_factory=list)
    contention: dict[str, Any] = field(default_factory=dict)  # ContentionMonitor.state()


def _sum_over_ranks(t: torch.Tensor) -> torch.Tensor:
    dist.all_reduce(t)
    return t


def init_distributed(device_name: str = "auto") -> bool:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1); True if distributed.

    gloo on CPU, nccl on CUDA, with the rendezvous torchrun sets up in the environment.
    """
    if dist.is_initialized():
        return True
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    use_cuda = device_name != "cpu" and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return True


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available; use --device cpu")
    return device


def _rng_state() -> dict[str, Any]:
    # plain values and tensors only, so that the checkpoint loads with weights_only=True
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    numpy_state = {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                   "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def cosine_schedule(total_steps: int, warmup_steps: int, min_ratio: float):
    def factor(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        span = max(1, total_steps - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / span)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


def make_optimizer(model: nn.Module, config: BenchmarkConfig) -> torch.optim.AdamW:
    # decay matrices (linear and embedding weights), not biases, norms or scalar BK parameters
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    # torch's fused AdamW (one kernel per tensor instead of ~10 ops) where the parameters'
    # device has it (CPU and CUDA in torch >= 2.4): the same update, and on CPU, where torch's
    # default is a per-tensor loop, ~4x faster (benchmarks/train_step.py, "AdamW step")
    try:
        return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.95), fused=True)
    except RuntimeError:   # no fused kernel for this device or dtype
        return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.95))


@contextmanager
def _stop_requests() -> Iterator[dict[str, Any]]:
    """Turn SIGTERM/SIGINT into a flag checked between steps (main thread only); once
    ``flag["raise"]`` is set, a signal calls it instead (it raises where the code is)."""
    flag: dict[str, Any] = {"signal": None, "raise": None}

    def handler(signum, _frame):
        flag["signal"] = signum
        if flag["raise"] is not None:
            act, flag["raise"] = flag["raise"], None  # once: a second signal must not interrupt it
            act(signum)

    installed = {}
    try:
        for sig in (signal.SIGTERM, signal.SIGINT):
            installed[sig] = signal.signal(sig, handler)
    except ValueError:  # not the main thread: no handlers, training just runs
        pass
    try:
        yield flag
    finally:
        for sig, previous in installed.items():
            signal.signal(sig, previous)


def steps_per_epoch(config: BenchmarkConfig, num_train_tokens: int) -> int:
    """Full batches of ``n_seq``-token windows in the training split; ConfigError if none."""
    steps = (num_train_tokens - 1) // config.n_seq // config.batch_size
    if steps == 0:
        raise ConfigError(
            f"{config.model_name}: the training split has {num_train_tokens} tokens, fewer than "
            f"one batch of {config.batch_size} windows of n_seq={config.n_seq} tokens; lower "
            "batch_size or n_seq")
    return steps


def config_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    keys = (set(saved) | set(current)) - _RESUME_IGNORED_FIELDS
    return [f"{k}: checkpoint has {saved.get(k)!r}, this run has {current.get(k)!r}"
            for k in sorted(keys) if saved.get(k) != current.get(k)]


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


class ProgressLines:
    """Progress as log lines, for a log file where a tqdm bar would be one endless line: the
    first step, then the first step at least ``interval`` seconds after the previous line.
    The ETA assumes the remaining steps take as long as this session's steps so far,
    evaluations between epochs included."""

    def __init__(self, name: str, total_steps: int, start_step: int, interval: float,
                 clock=time.monotonic, command: CommandProgress | None = None):
        self.name, self.total, self.start_step, self.interval = name, total_steps, start_step, interval
        self.clock = clock
        self.command = command  # run k of n of the command, for the command's ETA
        self.start = clock()
        self.last: float | None = None

    def step(self, step: int, epoch: int, epochs: int, loss: float, tokens_per_second: float) -> bool:
        now = self.clock()
        if self.last is not None and now - self.last < self.interval:
            return False
        self.last = now
        elapsed = now - self.start
        eta = elapsed / (step - self.start_step) * (self.total - step)
        log.info("%s: step %d/%d (epoch %d/%d), loss %.4f, %s tokens/s, elapsed %s, ETA %s%s",
                 self.name, step, self.total, epoch + 1, epochs, loss,
                 f"{tokens_per_second:,.0f}", _duration(elapsed), _duration(eta),
                 f"; {self.command.suffix(eta)}" if self.command else "")
        return True


class Trainer:
    """Trains ``model`` on ``data.train``, validates on ``data.valid``, tests on ``data.test``."""

    def __init__(self, config: BenchmarkConfig, model: nn.Module, data, device: torch.device,
                 run_dir: Path | None = None, resume: bool = False,
                 data_fingerprint: dict[str, Any] | None = None, progress: bool = True,
                 progress_interval: float = 30.0, flags: FlagSet | None = None,
                 phases: Phases | None = None):
        self.config = config
        if flags is None:
            if config.enabled_flags():
                raise ValueError(f"{config.model_name} has flags on ({', '.join(config.enabled_flags())}); "
                                 "build the model with bkbench.flags.build_model and pass its flags=")
            flags = FlagSet({})
        self.flags = flags  # the optimisation flags' hooks (bkbench.flags.base)
        self.progress = _Progress()
        self.device = device
        self.data = data
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.resume = resume
        self.data_fingerprint = data_fingerprint or {}
        self.show_progress = progress
        self.progress_interval = progress_interval
        self.distributed = dist.is_initialized()
        self.rank = dist.get_rank() if self.distributed else 0
        self.world = dist.get_world_size() if self.distributed else 1
        self.is_main = self.rank == 0
        # evaluations are phases: named in the log, with a line every interval while they run
        self.phases = phases or Phases(config.model_name, progress_interval,
                                       enabled=progress and self.is_main)

        self.model = model.to(device)
        self.ddp_model: nn.Module = self.model
        if self.distributed:
            self.ddp_model = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[device.index] if device.type == "cuda" else None)

        n = config.n_seq
        self.steps_per_epoch = steps_per_epoch(config, data.train.numel())
        self.num_windows = (data.train.numel() - 1) // n
        if config.batch_size < self.world:
            raise ConfigError(f"batch_size ({config.batch_size}) must be at least the number of "
                             f"processes ({self.world})")
        budgets = []
        if config.epochs:
            budgets.append(config.epochs * self.steps_per_epoch)
        if config.max_steps:
            budgets.append(config.max_steps)
        if config.max_tokens:
            budgets.append(math.ceil(config.max_tokens / (config.batch_size * n)))
        self.optimizer = make_optimizer(self.model, config)
        self.budget_step_flops: int | None = None
        if config.budget_flops is not None:
            budgets.append(self._steps_in_flop_budget(config.budget_flops))
        self.total_steps = min(budgets)
        self.num_epochs = math.ceil(self.total_steps / self.steps_per_epoch)

        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, cosine_schedule(self.total_steps, config.warmup_steps, config.min_lr_ratio))
        self.progress = _Progress()
        self.best_state: dict[str, torch.Tensor] | None = None
        self.resumed_from_step: int | None = None
        self._log_file = None
        self._tb = None
        self._contention: ContentionMonitor | None = None
        self._last_terms: dict[str, float] = {}
        self.context = self._run_context()

    def _run_context(self) -> RunContext:
        """What the flags' hooks see of this run (bkbench.hooks)."""
        return RunContext(
            model=self.model, optimizer=self.optimizer, device=self.device, data=self.data,
            progress=self.progress, total_steps=self.total_steps,
            steps_per_epoch=self.steps_per_epoch, num_windows=self.num_windows, world=self.world,
            evaluate=self.evaluate, sync=self._sync, compute_loss=self.compute_loss,
            autocast=lambda: self.flags.autocast(self.device),
            structure_changed=self.model_structure_changed,
            build_model=lambda: build_model(self.config, self._vocab_size()))

    def _steps_in_flop_budget(self, budget: float) -> int:
        """Whole steps whose counted FLOPs (one real step of this model, optimizer included)
        fit in ``budget``; the step cost is constant (see FlopReport.varies_per_step)."""
        from .metrics.flops import measure_step_flops
        report = measure_step_flops(self.model, self.config.batch_size, self.config.n_seq,
                                    self._vocab_size(), device=self.device,
                                    optimizer=self.optimizer, compute_loss=self.compute_loss,
                                    seed=self.config.seed)
        self.budget_step_flops = report.total
        steps = int(budget // report.total)
        if steps < 1:
            raise ConfigError(f"{self.config.model_name}: budget_flops ({budget:.3g}) is less than "
                              f"one training step ({report.total:.3g} counted FLOPs); raise it")
        return steps

    def _vocab_size(self) -> int:
        return len(self.data.vocab)

    def _time_budget_spent(self) -> bool:
        """Whether budget_seconds of training time are used up (agreed across DDP ranks)."""
        if self.config.budget_seconds is None:
            return False
        spent = self.progress.training_time >= self.config.budget_seconds
        if self.distributed:
            flag = torch.tensor([1 if spent else 0], device=self.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            spent = bool(flag.item())
        return spent

    def _budget_spent(self) -> str | None:
        """Why no further step may start (a budget is used up), or None.

        The FLOP budget counts the training steps and the data-selection flags' scoring passes
        (active learning), as the results' ``total_flops`` does: the step plan divides the
        budget by one step's FLOPs, and a run whose selection passes eat into the budget
        stops before the step (with the scoring passes its batch needs) that would overrun it
        (the learning-rate schedule keeps the plan, as with ``budget_seconds``). Selection FLOPs
        are the same on every rank."""
        if self._time_budget_spent():
            return f"time budget of {self.config.budget_seconds:.1f} s reached"
        if self.config.budget_flops is not None:
            p = self.progress
            spent = p.step * self.budget_step_flops + self.flags.selection_flops()
            upcoming = self.budget_step_flops + self.flags.next_selection_flops(p.epoch,
                                                                                 p.batch_in_epoch)
            if spent + upcoming > self.config.budget_flops:
                return (f"FLOP budget of {self.config.budget_flops:.3g} reached ({spent:.3g} "
                        "counted FLOPs spent, data selection included)")
        return None

    # --- data ----------------------------------------------------------------------------

    def epoch_order(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.config.seed * 100_003 + epoch)
        return self.flags.select_windows(self.context, epoch, torch.randperm(self.num_windows, generator=g))

    def batch(self, order: torch.Tensor, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's shard of global batch ``index`` of an epoch: (inputs, targets)."""
        bs = self.config.batch_size
        chosen = self.flags.batch_windows(self.context, self.progress.epoch, order, index)
        return self.window_batch(order[index * bs:(index + 1) * bs] if chosen is None else chosen)

    def window_batch(self, windows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's shard of the training windows ``windows``: (inputs, targets). No flag
        is consulted, so a measurement after training (a flag's record) can take a batch
        without starting a data-selection round."""
        n = self.config.n_seq
        windows = windows[self.rank::self.world]
        offsets = torch.arange(n + 1)
        chunk = self.data.train[windows[:, None] * n + offsets]
        return chunk[:, :-1].to(self.device), chunk[:, 1:].to(self.device)

    def model_structure_changed(self, reset_model_selection: bool) -> None:
        """A flag removed parameters (e.g. pruned experts): rewrap DDP, and with
        ``reset_model_selection`` forget the best epoch, whose weights no longer fit."""
        if self.distributed:
            self.ddp_model = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if reset_model_selection:
            self.progress.best_valid = None
            self.progress.best_epoch = -1
            self.best_state = None
        release_freed_memory()

    # --- checkpoints and logs ------------------------------------------------------------

    @property
    def checkpoint_dir(self) -> Path | None:
        return self.run_dir / "checkpoints" if self.run_dir is not None else None

    def _checkpoint_state(self) -> dict[str, Any]:
        if self._contention is not None:
            self.progress.contention = self._contention.state()
        return {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": _rng_state(),
            "progress": self.progress.__dict__.copy(),
            "config": self.config.to_dict(),
            "data": self.data_fingerprint,
            "world_size": self.world,
            "flags": self.flags.state_dict(),
        }

    def save_checkpoint(self) -> Path | None:
        if self.checkpoint_dir is None or not self.is_main:
            return None
        start = time.perf_counter()
        self.progress.checkpoints_written += 1
        path, size = save_checkpoint(self.checkpoint_dir, self.progress.step,
                                     self.model.state_dict(), self.best_state,
                                     self._checkpoint_state(), keep=self.config.keep_checkpoints)
        elapsed = time.perf_counter() - start
        self.progress.checkpoint_time += elapsed
        self._log("checkpoint", self.progress.step, seconds=elapsed, bytes=size)
        return path

    def _try_resume(self) -> None:
        if self.checkpoint_dir is None:
            return
        if not self.resume:
            # a fresh run replaces the previous run of this name: its checkpoints must neither
            # be resumed later nor crowd this run's out of the keep-last-K window
            if self.is_main and (removed := remove_checkpoints(self.checkpoint_dir)):
                log.info("%s: fresh run, removed %d checkpoint(s) of an earlier run in %s",
                         self.config.model_name, removed, self.checkpoint_dir)
            return
        ckpt = load_latest_checkpoint(self.checkpoint_dir)
        if ckpt is None:
            if self.is_main:
                found = len(list_checkpoints(self.checkpoint_dir))
                why = (f"all {found} checkpoint(s) there failed verification (see above)" if found
                       else "there is none")
                log.warning("--resume: no usable checkpoint of %s in %s (%s); TRAINING STARTS "
                            "FROM STEP 0", self.config.model_name, self.checkpoint_dir, why)
            return
        diffs = config_differences(ckpt.state["config"], self.config.to_dict())
        if ckpt.state.get("data") != self.data_fingerprint:
            diffs.append(f"data: checkpoint has {ckpt.state.get('data')}, this run has "
                         f"{self.data_fingerprint}")
        if ckpt.state.get("world_size", 1) != self.world:
            diffs.append(f"world size: checkpoint has {ckpt.state.get('world_size')}, "
                         f"this run has {self.world}")
        if diffs:
            raise CheckpointMismatchError(
                f"checkpoint {ckpt.path} belongs to a different run; differences: "
                + "; ".join(diffs) + ". Use another --output-dir or delete the checkpoint.")
        # before the weights: a flag that changed the model's structure rebuilds it first
        self.flags.load_state_dict(ckpt.state["flags"], self.context)
        self.model.load_state_dict(ckpt.model)
        self.best_state = ckpt.best_model
        self.optimizer.load_state_dict(ckpt.state["optimizer"])
        self.scheduler.load_state_dict(ckpt.state["scheduler"])
        _set_rng_state(ckpt.state["rng"])
        self.progress = _Progress(**ckpt.state["progress"])
        self.context.progress = self.progress
        self.resumed_from_step = self.progress.step
        log.info("resumed %s from %s (step %d)", self.config.model_name, ckpt.path,
                 self.progress.step)

    def _open_logs(self) -> None:
        if self.run_dir is None or not self.is_main:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        path = self.run_dir / "train_log.jsonl"
        if self.resumed_from_step is None:
            self._log_file = open(path, "w")
        else:  # keep the lines up to the checkpoint, drop those of the lost steps after it
            kept = []
            if path.exists():
                for line in path.read_text().splitlines():
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError:
                        continue  # a line cut off by the kill
                    if rec.get("step", 0) <= self.resumed_from_step:
                        kept.append(line)
            self._log_file = open(path, "w")
            self._log_file.write("".join(l + "\n" for l in kept))
        if self.config.tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self._tb = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"),
                                     purge_step=self.resumed_from_step)

    def _log(self, kind: str, step: int, **scalars: float) -> None:
        if self._log_file is not None:
            self._log_file.write(json.dumps({"kind": kind, "step": step, **scalars}) + "\n")
            self._log_file.flush()
        if self._tb is not None:
            for name, value in scalars.items():
                self._tb.add_scalar(f"{kind}/{name}", value, step)

    def _close_logs(self) -> None:
        if self._log_file is not None:
            self._log_file.close()
        if self._tb is not None:
            self._tb.close()

    # --- the loop ------------------------------------------------------------------------

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def compute_loss(self, inputs: torch.Tensor,
                     targets: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The training objective of one batch: (loss to backpropagate, named terms).

        ``cross_entropy_sum`` is the summed NLL of this rank's targets; the loss scales it by
        world / global tokens because DDP averages gradients over ranks, so the average is the
        global mean. The MoE balance loss is that of the global batch (its routing counts are
        summed over the ranks). The flags' loss terms are added as each rank computes them on
        its shard, each flag making its term's DDP average the global batch's: a mean over the
        shard weighs by the shard's size (``shard_weight``: batches that do not divide by the
        ranks), what is not such a mean all-reduces its statistics (early exit, sparse_bk).
        The FLOP measurement calls this same function (on every rank).
        """
        global_tokens = self.config.batch_size * self.config.n_seq
        with self.flags.autocast(self.device):
            # the LM head runs fused with the cross-entropy, chunk by chunk (ops.lm_loss)
            ce_sum, ce_rows = target_nll(self.model, inputs, targets, call=self.ddp_model,
                                         with_rows=True)
        # each window's mean NLL, a by-product of the same pass (no gradient): what a
        # data-selection flag may reuse (active learning's latest losses)
        terms = {"cross_entropy_sum": ce_sum, "cross_entropy_per_window": ce_rows.mean(dim=1)}
        loss = ce_sum * (self.world / global_tokens)
        aux = (self.model.auxiliary_loss(_sum_over_ranks, self.world) if self.distributed
               else self.model.auxiliary_loss())
        if aux is not None:
            terms["moe_balance"] = aux
            loss = loss + aux
        for name, term in self.flags.loss_terms(self.model, inputs, targets,
                                                self.progress.step).items():
            terms[name] = term
            loss = loss + term
        return loss, terms

    def train_step(self, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[float, float]:
        """One optimizer step; returns (global mean cross-entropy, gradient norm)."""
        step = self.progress.step + 1  # numbered from 1, as in train_log.jsonl
        global_tokens = self.config.batch_size * self.config.n_seq
        self.ddp_model.train()
        # dropout masks keyed by (seed, step, position in the global batch): the same masks
        # for one process and for any number of ranks (models/dropout.py)
        positions = range(self.config.batch_size)[self.rank::self.world]
        with dropout_key(self.config.seed, self.progress.step, positions,
                         self.config.batch_size):
            loss, terms = self.compute_loss(inputs, targets)
        ce_sum = terms["cross_entropy_sum"]
        if not torch.isfinite(loss):
            raise TrainingDivergedError(
                f"{self.config.model_name}: loss is {loss.item()} at step {step} "
                f"(epoch {self.progress.epoch + 1}, batch {self.progress.batch_in_epoch + 1}); stopping")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        if not torch.isfinite(grad_norm):
            bad = [n for n, p in self.model.named_parameters()
                   if p.grad is not None and not torch.isfinite(p.grad).all()]
            raise TrainingDivergedError(
                f"{self.config.model_name}: gradient norm is {grad_norm.item()} at step {step} "
                f"(non-finite gradients in {', '.join(bad[:5]) or 'none found'}); stopping")
        self.optimizer.step()
        self.scheduler.step()
        self.flags.after_optimizer_step(self.context, terms)
        self._last_terms = {k: v.detach().item() for k, v in terms.items()
                            if k != "cross_entropy_sum" and v.dim() == 0}
        ce = ce_sum.detach()
        if self.distributed:
            dist.all_reduce(ce)
        return ce.item() / global_tokens, grad_norm.item()

    def _validate(self, split: torch.Tensor) -> EvalResult:
        self._sync()
        start = time.perf_counter()
        phase = ("test evaluation" if split is self.data.test
                 else f"validation after epoch {self.progress.epoch + 1}")
        with self.phases(phase):
            result = self.evaluate(self.flags.prepare_for_eval(self.model), split)
        self._sync()
        self.progress.eval_time += time.perf_counter() - start
        return result

    def evaluate(self, model: nn.Module, split: torch.Tensor) -> EvalResult:
        """Held-out perplexity of ``model`` on ``split`` as the run evaluates (flags' autocast)."""
        return evaluate(model, split, self.config.n_seq, self.config.eval_batch_size,
                        stride=self.config.eval_stride, bos_id=self.data.vocab.eos_id,
                        device=self.device, autocast_dtype=self.flags.autocast_dtype(self.device))

    def fit(self) -> TrainOutcome:
        self._try_resume()
        self._open_logs()
        try:
            with _stop_requests() as stop:
                self._loop(stop)
                if self._stop_agreed(stop):  # arrived during the last validation
                    self._interrupted(stop["signal"] or signal.SIGTERM)
                # the last checkpoint is complete: from here on a signal stops at once, with
                # the same message, and --resume redoes only the test evaluation
                stop["raise"] = lambda signum: self._interrupted(signum, save=False)
                return self._finish()
        finally:
            self._close_logs()

    def _loop(self, stop: dict[str, int | None]) -> None:
        p, cfg = self.progress, self.config
        tokens_per_step = cfg.batch_size * cfg.n_seq
        timing_warmup = min(3, max(0, self.total_steps // 10))
        bar = lines = None
        self._contention = ContentionMonitor(self.device, state=p.contention).start()
        if self.show_progress and self.is_main:
            if sys.stderr.isatty():
                from tqdm.auto import tqdm
                command = self.phases.command
                desc = f"{cfg.model_name} [{command.label()}]" if command else cfg.model_name
                bar = tqdm(total=self.total_steps, initial=p.step, desc=desc, unit="step",
                           **bar_size(sys.stderr))
            else:  # a batch job's log: a line every progress_interval seconds instead
                lines = ProgressLines(cfg.model_name, self.total_steps, p.step,
                                      self.progress_interval, command=self.phases.command)
        try:
            while p.step < self.total_steps:
                if (why := self._budget_spent()) is not None:
                    log.info("%s: %s at step %d", cfg.model_name, why, p.step)
                    break
                order = self.epoch_order(p.epoch)
                steps_this_epoch = min(self.steps_per_epoch,
                                       self.total_steps - p.epoch * self.steps_per_epoch)
                while p.batch_in_epoch < steps_this_epoch:
                    if self._budget_spent() is not None:
                        break
                    if self._stop_agreed(stop):
                        self._interrupted(stop["signal"] or signal.SIGTERM)
                    timed = p.step >= timing_warmup
                    self._sync()
                    if timed:
                        self._contention.begin_step()
                    # the batch is fetched inside the timed step: a data-selection flag's
                    # scoring passes (active learning) run there and belong to training time
                    start = time.perf_counter()
                    inputs, targets = self.batch(order, p.batch_in_epoch)
                    loss, grad_norm = self.train_step(inputs, targets)
                    self._sync()
                    elapsed = time.perf_counter() - start
                    if timed:
                        self._contention.end_step()
                    p.step += 1
                    p.batch_in_epoch += 1
                    p.tokens += tokens_per_step
                    p.training_time += elapsed
                    p.epoch_time += elapsed
                    if timed:
                        p.timed_tokens += tokens_per_step
                        p.timed_time += elapsed
                    p.epoch_loss_sum += loss
                    p.epoch_loss_count += 1
                    p.step_losses.append(loss)
                    lr = self.scheduler.get_last_lr()[0]
                    tok_s = tokens_per_step / elapsed
                    self._log("train", p.step, loss=loss, lr=lr, grad_norm=grad_norm,
                              tokens_per_second=tok_s,
                              **{f"term_{k}": v for k, v in self._last_terms.items()})
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tok_s:,.0f}",
                                        **self._command_eta(bar))
                    if lines is not None:
                        lines.step(p.step, p.epoch, self.num_epochs, loss, tok_s)
                    if (cfg.checkpoint_every and p.step % cfg.checkpoint_every == 0
                            and p.batch_in_epoch < steps_this_epoch):
                        self.save_checkpoint()
                self._end_epoch()
                self.save_checkpoint()
        finally:
            self._contention.stop()
            if bar is not None:
                bar.close()

    def _command_eta(self, bar) -> dict[str, str]:
        command = self.phases.command
        rate = bar.format_dict.get("rate")
        if command is None or not rate:
            return {}
        return {"command_ETA": duration(command.eta((self.total_steps - bar.n) / rate))}

    def _end_epoch(self) -> None:
        p = self.progress
        self.flags.on_epoch_end(self.context)
        valid = self._validate(self.data.valid)
        p.epoch_losses.append(p.epoch_loss_sum / max(1, p.epoch_loss_count))
        p.epoch_perplexities.append(valid.perplexity)
        p.epoch_times.append(p.epoch_time)
        if p.best_valid is None or valid.loss < p.best_valid["loss"]:
            p.best_valid = valid.to_dict()
            p.best_epoch = p.epoch
            self.best_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self._log("epoch", p.step, epoch=p.epoch + 1, train_loss=p.epoch_losses[-1],
                  valid_loss=valid.loss, valid_perplexity=valid.perplexity,
                  epoch_time=p.epoch_time)
        if self.is_main:
            log.info("%s epoch %d: train loss %.4f, valid ppl %.2f, %.1f s",
                     self.config.model_name, p.epoch + 1, p.epoch_losses[-1], valid.perplexity,
                     p.epoch_time)
        p.epoch += 1
        p.batch_in_epoch = 0
        p.epoch_time = 0.0
        p.epoch_loss_sum = 0.0
        p.epoch_loss_count = 0

    def _stop_agreed(self, stop: dict[str, int | None]) -> bool:
        """Whether to stop now; under DDP every rank stops at the same step or none does."""
        requested = stop["signal"] is not None
        if not self.distributed:
            return requested
        flag = torch.tensor([1 if requested else 0], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def _interrupted(self, signum: int, save: bool = True) -> None:
        path = self.save_checkpoint() if save else self._latest_checkpoint()
        name = signal.Signals(signum).name
        if path is None:
            where = "no checkpoint directory configured"
        elif save:
            where = f"checkpoint written to {path}"
        else:
            where = f"training was complete, its checkpoint is {path}"
        raise TrainingInterrupted(
            f"{name} received at step {self.progress.step} of {self.config.model_name}; {where}. "
            "Run the same command with --resume to continue.", signum)

    def _latest_checkpoint(self) -> Path | None:
        if self.checkpoint_dir is None or not self.is_main:
            return None
        found = list_checkpoints(self.checkpoint_dir)
        return found[-1] if found else None

    def _finish(self) -> TrainOutcome:
        p = self.progress
        self.model.load_state_dict(self.best_state)
        valid = EvalResult(**{k: p.best_valid[k] for k in
                              ("loss", "num_tokens", "total_nll", "seq_len", "stride")})
        test = self._validate(self.data.test)
        tps = p.timed_tokens / p.timed_time if p.timed_time > 0 else p.tokens / max(p.training_time, 1e-9)
        return TrainOutcome(
            epoch_losses=p.epoch_losses, epoch_perplexities=p.epoch_perplexities,
            epoch_times=p.epoch_times, step_losses=p.step_losses, valid=valid, test=test,
            best_epoch=p.best_epoch + 1, steps=p.step, total_tokens=p.tokens,
            training_time=p.training_time, eval_time=p.eval_time, tokens_per_second=tps,
            checkpoint_time=p.checkpoint_time, checkpoints_written=p.checkpoints_written,
            resumed_from_step=self.resumed_from_step,
            contention=self._contention.result() if self._contention is not None else None)
