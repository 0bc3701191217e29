"""The seed's API: ``WikiText2Benchmark(output_dir).run_benchmark(config) -> BenchmarkResults``.

Orchestrates one run end to end: data, model, causality audit, training, held-out evaluation,
cost measurements (FLOPs by counter, peak memory, size), and an atomically written results
file. ``run_all(..., isolate=True)`` runs each run in a child process of its own, so that its
peak memory and its state are not polluted by the runs before it. Files of a run:

- ``<output_dir>/<model_name>_results.json``   the results (complete or absent);
- ``<output_dir>/runs/<model_name>/train_log.jsonl``  one line per step and per epoch;
- ``<output_dir>/runs/<model_name>/checkpoints/``     resumable checkpoints;
- ``<output_dir>/runs/<model_name>/tensorboard/``     when ``tensorboard`` is on.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from .audit import CausalityAudit, audit_causality, format_audit
from .config import BenchmarkConfig
from .data import load_wikitext2
from .errors import ConfigError
from .metrics.flops import flops_result_fields, measure_forward_flops, measure_step_flops
from .flags import build_model
from .metrics.memory import PeakMemory, release_freed_memory
from .results import BenchmarkResults, environment
from . import runs
from .seeding import seed_everything
from .train import Trainer, TrainOutcome, resolve_device
from .warmup import WARM_UP_VOCAB, warm_up

log = logging.getLogger(__name__)

DEFAULT_OUTPUT_DIR = Path("benchmark_results") / "wikitext2"


def model_size_bytes(model: torch.nn.Module) -> int:
    """Bytes of parameters and buffers as stored (a tied weight counted once)."""
    seen: set[int] = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def eval_flop_windows(split: torch.Tensor, config: BenchmarkConfig) -> torch.Tensor:
    """(eval_batch_size, n_seq + 1) consecutive windows of held-out text from the split's
    start, on which evaluation FLOPs are counted (repeated if the split is shorter)."""
    need = config.eval_batch_size * config.n_seq + 1
    stream = split.repeat(-(-need // split.numel()))[:need]
    starts = torch.arange(config.eval_batch_size) * config.n_seq
    return stream[starts[:, None] + torch.arange(config.n_seq + 1)]


def _with_selection_flops(fields: dict, flag_records: dict) -> dict:
    """Add the data-selection flags' scoring passes (``selection_flops`` in their records) as
    ``flops.selection`` and into ``total_flops``: forwards the run paid for to choose its
    batches are training cost, even though no gradient flows through them."""
    by_flag = {name: int(rec["measured"]["selection_flops"]) for name, rec in flag_records.items()
               if "selection_flops" in rec.get("measured", {})}
    if by_flag:
        total = sum(by_flag.values())
        fields["flops"]["selection"] = {"total": total, "by_flag": by_flag,
                                        "note": "scoring forwards (eval mode, no gradient), "
                                                "counted FLOPs per pass x passes; in total_flops"}
        fields["total_flops"] = fields["total_flops"] + total
    return fields


class NonCausalModelError(ConfigError):
    """The model failed the causality audit and --allow-noncausal was not given."""


class RunFailedError(RuntimeError):
    """An isolated run's child process failed; ``exit_code`` is its exit status."""

    def __init__(self, model_name: str, exit_code: int):
        super().__init__(f"run {model_name} failed (exit code {exit_code}); see its messages above")
        self.model_name = model_name
        self.exit_code = exit_code


def _memory_fields(training: PeakMemory, setup: PeakMemory) -> dict[str, Any]:
    """The results' ``memory``: the training loop's peak (the headline ``peak_memory_mb``)
    and, labelled apart, the whole run's (build and causality audit included), both above the
    resident memory just before the model was built, after the warm-up."""
    fields = training.to_dict()
    fields["window"] = ("training loop (training steps, validation, test evaluation, "
                        "checkpoints); one-time set-up warmed up before the baseline")
    whole = max(training.peak_bytes or 0, setup.peak_bytes or 0)
    fields["whole_run"] = {"window": "model build, causality audit and training loop",
                           "peak_bytes": whole,
                           "increase_bytes": max(0, whole - (training.baseline_bytes or 0)),
                           "increase_mb": max(0, whole - (training.baseline_bytes or 0)) / 2**20}
    return fields


class WikiText2Benchmark:
    def __init__(self, output_dir: str | Path = DEFAULT_OUTPUT_DIR, progress: bool = True,
                 progress_interval: float = 30.0):
        self.output_dir = Path(output_dir)
        self.progress = progress
        # seconds between progress lines when stderr is not a terminal (a tqdm bar when it is)
        self.progress_interval = progress_interval
        self._data_cache: dict[tuple, Any] = {}
        # descriptors the isolated workers inherit (the run folder's lock, see bkbench.runlock)
        self.worker_fds: tuple[int, ...] = ()

    # --- paths -----------------------------------------------------------------------------

    def results_path(self, model_name: str) -> Path:
        return runs.results_path(self.output_dir, model_name)

    def run_dir(self, model_name: str) -> Path:
        return runs.run_dir(self.output_dir, model_name)

    def check_can_write(self, config: BenchmarkConfig, resume: bool = False,
                        overwrite: bool = False) -> None:
        """ConfigError if running ``config`` would replace a finished result or delete
        checkpoints without ``overwrite`` (see :func:`bkbench.runs.check_can_write`)."""
        runs.check_can_write(self.output_dir, config.to_dict(), resume=resume,
                             overwrite=overwrite)

    # --- data ------------------------------------------------------------------------------

    def load_data(self, config: BenchmarkConfig):
        key = (config.data_dir, config.variant, config.split_scheme, config.tokenizer)
        if key not in self._data_cache:
            self._data_cache[key] = load_wikitext2(
                data_dir=config.data_dir, variant=config.variant, scheme=config.split_scheme,
                tokenizer=config.tokenizer)
        return self._data_cache[key]

    def build(self, config: BenchmarkConfig, vocab_size: int):
        """(the run's model with its flags applied, the flags' hooks)."""
        seed_everything(config.seed)
        return build_model(config, vocab_size)

    # --- one run ---------------------------------------------------------------------------

    def run_benchmark(self, config: BenchmarkConfig, resume: bool = False,
                      overwrite: bool = False) -> BenchmarkResults:
        """Train and evaluate one run. An existing result or checkpoints of this run name stop
        it with ConfigError, unless ``resume`` (continue; skip a complete run of the same
        config) or ``overwrite`` (replace them)."""
        config.validate()
        self.check_can_write(config, resume=resume, overwrite=overwrite)
        device = resolve_device(config.device)
        data = self.load_data(config)
        results_path = self.results_path(config.model_name)
        if resume and (done := self._complete_result(config, results_path)) is not None:
            return done

        is_main = not dist.is_initialized() or dist.get_rank() == 0
        if is_main:  # the resolved settings, at the head of the run's log
            for line in runs.settings_lines(config.to_dict(), data.to_dict()):
                log.info("%s", line)
            log.info("  output: %s, %s", results_path, self.run_dir(config.model_name))
        # one-time set-up (imports, compiled kernels) is paid here, before the baseline, on a
        # throwaway model of the run's architecture and flags
        warm_up(self.build(config, WARM_UP_VOCAB)[0], config, device)
        release_freed_memory()
        with PeakMemory(device) as setup_memory:   # build, audit, trainer set-up
            trainer, audit = self._audited_trainer(config, data, device, resume, is_main)
        # the measured window: the training loop, above the baseline taken before the build
        with PeakMemory(device, baseline_bytes=setup_memory.baseline_bytes) as memory:
            outcome = trainer.fit()
        results = self._results(config, data, trainer, outcome, audit,
                                _memory_fields(memory, setup_memory), memory.increase_bytes)
        if is_main:
            results.save(results_path)
            log.info("%s: test perplexity %.2f (%d tokens), results in %s", config.model_name,
                     results.test_perplexity, results.test_tokens, results_path)
        return results

    def _complete_result(self, config: BenchmarkConfig, path: Path) -> BenchmarkResults | None:
        """The finished results of this very config at ``path`` (resume skips the run)."""
        if not path.exists():
            return None
        try:
            done = BenchmarkResults.load(path)
        except (ValueError, KeyError, TypeError, OSError) as exc:
            log.warning("ignoring malformed results file %s (%s); training the run again",
                        path, exc)
            return None
        if runs.config_changes(done.config, config.to_dict()):
            return None
        log.info("%s: complete results found at %s, skipping", config.model_name, path)
        return done

    def _audited_trainer(self, config: BenchmarkConfig, data, device: torch.device,
                         resume: bool, is_main: bool) -> tuple[Trainer, CausalityAudit]:
        """The run's model built with its flags, audited for causality, in its trainer."""
        vocab_size = len(data.vocab)
        model, flags = self.build(config, vocab_size)
        model = model.to(device)
        with flags.autocast(device):  # the forward as training runs it
            audit = audit_causality(model, vocab_size, seq_len=config.n_seq, device=device)
        if is_main:
            log.info("%s causality audit: %s", config.model_name, format_audit(audit))
        if not audit.causal and not config.allow_noncausal:
            raise NonCausalModelError(
                f"{config.model_name}: the model is not causal (largest change of an earlier "
                f"logit: {audit.max_leak:.3g}); it is not a valid language model and will "
                "not be trained as one. Pass --allow-noncausal to train it anyway (its "
                "perplexities are then marked invalid).")
        fingerprint = {"variant": config.variant, "scheme": config.split_scheme,
                       "tokenizer": config.tokenizer, "checksums": data.checksums}
        trainer = Trainer(config, model, data, device,
                          run_dir=self.run_dir(config.model_name), resume=resume,
                          data_fingerprint=fingerprint, progress=self.progress,
                          progress_interval=self.progress_interval, flags=flags)
        return trainer, audit

    def _results(self, config: BenchmarkConfig, data, trainer: Trainer, outcome: TrainOutcome,
                 audit: CausalityAudit, memory: dict[str, Any],
                 peak_increase_bytes: int) -> BenchmarkResults:
        """The results of a finished run: its numbers, FLOPs, flags' records and set-up."""
        model, device, vocab_size = trainer.model, trainer.device, len(data.vocab)
        step_flops = measure_step_flops(model, config.batch_size, config.n_seq, vocab_size,
                                        device=device, optimizer=trainer.optimizer,
                                        compute_loss=trainer.compute_loss, seed=config.seed)
        evaluated = (outcome.valid.num_tokens * len(outcome.epoch_perplexities)
                     + outcome.test.num_tokens)
        flag_records = trainer.flags.record(trainer.context, outcome)
        # the model as evaluation runs it (early exits, integer layers), on validation text
        # (exits and routing depend on the tokens); after the records, which read the test
        # evaluation's exits
        eval_flops = measure_forward_flops(trainer.flags.prepare_for_eval(model),
                                           config.eval_batch_size, config.n_seq, vocab_size,
                                           device=device,
                                           windows=eval_flop_windows(data.valid, config))
        flops = flops_result_fields(step_flops, outcome.steps, eval_forward=eval_flops,
                                    eval_tokens=evaluated)
        return BenchmarkResults(
            model_name=config.model_name,
            config=config.to_dict(),
            final_loss=outcome.test.loss,
            final_perplexity=outcome.test.perplexity,
            best_perplexity=outcome.valid.perplexity,
            test_loss=outcome.test.loss,
            test_perplexity=outcome.test.perplexity,
            test_bits_per_token=outcome.test.bits_per_token,
            test_tokens=outcome.test.num_tokens,
            valid_loss=outcome.valid.loss,
            valid_perplexity=outcome.valid.perplexity,
            valid_bits_per_token=outcome.valid.bits_per_token,
            valid_tokens=outcome.valid.num_tokens,
            best_epoch=outcome.best_epoch,
            training_time=outcome.training_time,
            total_tokens=outcome.total_tokens,
            steps=outcome.steps,
            tokens_per_second=outcome.tokens_per_second,
            epoch_losses=outcome.epoch_losses,
            epoch_perplexities=outcome.epoch_perplexities,
            epoch_times=outcome.epoch_times,
            eval_time=outcome.eval_time,
            checkpoint_time=outcome.checkpoint_time,
            checkpoints_written=outcome.checkpoints_written,
            num_parameters=model.num_parameters(),
            parameter_breakdown=model.parameter_breakdown(),
            model_size_mb=model_size_bytes(model) / 2**20,
            data=data.to_dict(),
            peak_memory_mb=peak_increase_bytes / 2**20,
            memory=memory,
            contention=outcome.contention,
            causality=audit.to_dict(),
            perplexity_valid_for_lm=audit.causal,
            seed=config.seed,
            environment=environment(device),
            flags=flag_records,
            **_with_selection_flops(flops, flag_records),
        )

    def run_all(self, configs: list[BenchmarkConfig], resume: bool = False,
                isolate: bool = False, overwrite: bool = False) -> list[BenchmarkResults]:
        """Run each config; with ``isolate`` each in a child process of its own."""
        for c in configs:  # refuse before the first run starts, not between runs
            self.check_can_write(c, resume=resume, overwrite=overwrite)
        if not isolate:
            return [self.run_benchmark(c, resume=resume, overwrite=overwrite) for c in configs]
        return [self._run_isolated(c, resume, overwrite) for c in configs]

    def _run_isolated(self, config: BenchmarkConfig, resume: bool,
                      overwrite: bool = False) -> BenchmarkResults:
        payload = json.dumps({"config": config.to_dict(), "output_dir": str(self.output_dir),
                              "resume": resume, "overwrite": overwrite,
                              "progress": self.progress,
                              "progress_interval": self.progress_interval,
                              "parent_pid": os.getpid()})
        child = subprocess.Popen([sys.executable, "-m", "bkbench.worker", payload],
                                 pass_fds=self.worker_fds)
        # Ctrl-C reaches the child directly (same process group); forward SIGTERM so that the
        # child checkpoints, and wait for it either way
        forward = lambda signum, _frame: child.send_signal(signum)  # noqa: E731
        previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            code = child.wait()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        if code < 0:  # killed by a signal it did not handle: report it as a shell would
            code = 128 - code
        if code != 0:
            raise RunFailedError(config.model_name, code)
        return BenchmarkResults.load(self.results_path(config.model_name))
