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

import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from .audit import audit_causality, format_audit
from .config import BenchmarkConfig
from .errors import ConfigError
from .eval import bits_per_byte, word_perplexity
from .token_cache import load_corpus
from .metrics.flops import flops_result_fields, measure_forward_flops, measure_step_flops
from .flags import build_model
from .metrics.memory import PeakMemory, release_freed_memory
from .results import BenchmarkResults, environment
from . import runs
from . import threads as threads_mod
from .atomic import write_json_atomic
from .progress import CommandProgress, Phases
from .seeding import seed_everything
from .threads import ThreadPolicy
from .train import Trainer, resolve_device
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


@dataclass
class _TrainedRun:
    model: torch.nn.Module
    flags: Any
    trainer: Trainer
    outcome: Any
    audit: Any
    memory: PeakMemory
    setup_memory: PeakMemory


def _policy_text(policy: ThreadPolicy) -> str:
    if policy.requested != "auto":
        return f"--threads {policy.requested}" if policy.requested != "unchanged" else \
            "torch's setting, left unchanged"
    return (f"auto: {policy.others_runnable} other runnable task(s) on "
            f"{policy.cpus_available} CPU(s)"
            + (f", OMP_WAIT_POLICY={policy.omp_wait_policy}" if policy.omp_wait_policy else ""))


class WikiText2Benchmark:
    def __init__(self, output_dir: str | Path = DEFAULT_OUTPUT_DIR, progress: bool = True,
                 progress_interval: float = 30.0, threads: str | None = "auto"):
        self.output_dir = Path(output_dir)
        # torch's intra-op threads per run, as the command line's --threads: "auto" (chosen
        # from the machine's load when the run starts, bkbench.threads), a number, or None
        # (torch's setting, left as it is). The count changes results in their last bits.
        self.threads = threads
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
        key = (config.dataset, config.data_dir, config.variant, config.split_scheme,
               config.tokenizer)
        if key not in self._data_cache:
            self._data_cache[key] = load_corpus(
                config.dataset, config.variant, config.split_scheme, config.tokenizer,
                data_dir=config.data_dir, progress=self.progress)
        return self._data_cache[key]

    def build(self, config: BenchmarkConfig, vocab_size: int):
        """(the run's model with its flags applied, the flags' hooks)."""
        seed_everything(config.seed)
        return build_model(config, vocab_size)

    # --- one run ---------------------------------------------------------------------------

    def run_benchmark(self, config: BenchmarkConfig, resume: bool = False,
                      overwrite: bool = False, command: CommandProgress | None = None,
                      thread_policy: ThreadPolicy | None = None) -> BenchmarkResults:
        """Train and evaluate one run. An existing result or checkpoints of this run name stop
        it with ConfigError, unless ``resume`` (continue; skip a complete run of the same
        config) or ``overwrite`` (replace them). ``command``: where the run stands in its
        command (run k of n, for the progress lines); ``thread_policy``: the threads it uses
        (default: chosen now by ``self.threads``, see :mod:`bkbench.threads`)."""
        config.validate()
        self.check_can_write(config, resume=resume, overwrite=overwrite)
        device = resolve_device(config.device)
        data = self.load_data(config)
        results_path = self.results_path(config.model_name)
        if resume and (done := self.finished_result(config)) is not None:
            return done
        policy = self._apply_threads(thread_policy)
        is_main = not dist.is_initialized() or dist.get_rank() == 0
        phases = Phases(config.model_name, self.progress_interval,
                        enabled=self.progress and is_main, command=command)
        started = time.monotonic()
        if is_main:  # the resolved settings, at the head of the run's log
            for line in runs.settings_lines(config.to_dict(), data.to_dict()):
                log.info("%s", line)
            log.info("  output: %s, %s", results_path, self.run_dir(config.model_name))
            log.info("  threads: %d (%s)", policy.threads, _policy_text(policy))
        run = self._train(config, data, device, resume, phases, is_main)
        with phases("FLOPs count"):
            step_flops = measure_step_flops(
                run.model, config.batch_size, config.n_seq, len(data.vocab), device=device,
                optimizer=run.trainer.optimizer, compute_loss=run.trainer.compute_loss,
                seed=config.seed)
        flag_records = self._record_flags(config, run, phases, resume)
        # the model as evaluation runs it (early exits, integer layers), on validation text
        # (exits and routing depend on the tokens); after the records, which read the test
        # evaluation's exits
        with phases("evaluation FLOPs count"):
            eval_flops = measure_forward_flops(
                run.flags.prepare_for_eval(run.model), config.eval_batch_size, config.n_seq,
                len(data.vocab), device=device, windows=eval_flop_windows(data.valid, config))
        phases.seconds["run"] = time.monotonic() - started
        results = self._results(config, data, device, run, step_flops, eval_flops, flag_records)
        results.environment["thread_policy"] = policy.to_dict()
        results.phase_seconds = {k: round(v, 3) for k, v in phases.seconds.items()}
        if is_main:
            results.save(results_path)
            log.info("%s: test perplexity %.2f (%d tokens), results in %s", config.model_name,
                     results.test_perplexity, results.test_tokens, results_path)
        return results

    def finished_result(self, config: BenchmarkConfig) -> BenchmarkResults | None:
        """The finished result of ``config`` in this folder, if its settings are the same
        (what ``--resume`` keeps; None: train the run)."""
        path = self.results_path(config.model_name)
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

    def _apply_threads(self, policy: ThreadPolicy | None) -> ThreadPolicy:
        if policy is None:
            if self.threads is None:   # leave torch's setting (the library's default)
                return ThreadPolicy("unchanged", torch.get_num_threads(),
                                    threads_mod.cpus_available(), None, None,
                                    os.environ.get("OMP_WAIT_POLICY"))
            # in this process OpenMP has started: its wait policy is what it already is
            policy = dataclasses.replace(threads_mod.choose(self.threads),
                                         omp_wait_policy=os.environ.get("OMP_WAIT_POLICY"))
        torch.set_num_threads(policy.threads)
        return policy

    def _train(self, config, data, device, resume: bool, phases: Phases,
               is_main: bool) -> "_TrainedRun":
        vocab_size = len(data.vocab)
        # one-time set-up (imports, compiled kernels) is paid here, before the baseline, on a
        # throwaway model of the run's architecture and flags
        with phases("warm-up"):
            warm_up(self.build(config, WARM_UP_VOCAB)[0], config, device)
        release_freed_memory()
        with PeakMemory(device) as setup_memory, phases("build and causality audit"):
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
                              progress_interval=self.progress_interval, flags=flags,
                              phases=phases)
        # the measured window: the training loop, above the baseline taken before the build
        start = time.monotonic()
        with PeakMemory(device, baseline_bytes=setup_memory.baseline_bytes) as memory:
            outcome = trainer.fit()
        phases.seconds["training and evaluation"] = time.monotonic() - start
        return _TrainedRun(model, flags, trainer, outcome, audit, memory, setup_memory)

    def _record_flags(self, config: BenchmarkConfig, run: "_TrainedRun", phases: Phases,
                      resume: bool) -> dict[str, Any]:
        """Each flag's record, a phase of its own. Finished records are kept in the run's
        folder as they come, so that ``--resume`` after an interruption here redoes only the
        records that had not finished (of the same config and the same final step)."""
        kept_path = self.run_dir(config.model_name) / "flag_records.json"
        key = json.loads(json.dumps({"config": config.to_dict(), "steps": run.outcome.steps}))
        kept: dict[str, Any] = {"key": key, "records": {}, "seconds": {}}
        if not resume:
            kept_path.unlink(missing_ok=True)
        elif kept_path.is_file():
            try:
                saved = json.loads(kept_path.read_text())
                if saved.get("key") == key:
                    kept.update(records=dict(saved["records"]), seconds=dict(saved["seconds"]))
            except (ValueError, KeyError, TypeError, OSError):
                pass   # unreadable: measure every record again

        def record_one(name: str, measure) -> dict[str, Any]:
            phase = f"{name} record"
            if name in kept["records"]:
                log.info("%s: %s kept from the interrupted run", config.model_name, phase)
                phases.seconds[phase] = kept["seconds"].get(name, 0.0)
                return kept["records"][name]
            seed_everything(config.seed)   # each record's draws do not depend on the others'
            with phases(phase):
                measured = measure()
            kept["records"][name] = measured
            kept["seconds"][name] = phases.seconds[phase]
            write_json_atomic(kept_path, kept)
            return measured

        return run.flags.record(run.trainer.context, run.outcome, run_one=record_one)

    @staticmethod
    def _results(config, data, device, run: "_TrainedRun", step_flops, eval_flops,
                 flag_records: dict[str, Any]) -> BenchmarkResults:
        outcome, model = run.outcome, run.model
        evaluated = (outcome.valid.num_tokens * len(outcome.epoch_perplexities)
                     + outcome.test.num_tokens)
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
            test_bits_per_byte=bits_per_byte(outcome.test.total_nll, data.num_bytes["test"]),
            valid_bits_per_byte=bits_per_byte(outcome.valid.total_nll, data.num_bytes["valid"]),
            test_word_perplexity=word_perplexity(outcome.test.total_nll,
                                                 (data.num_words or {}).get("test")),
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
            peak_memory_mb=run.memory.increase_bytes / 2**20,
            memory=_memory_fields(run.memory, run.setup_memory),
            contention=outcome.contention,
            causality=run.audit.to_dict(),
            perplexity_valid_for_lm=run.audit.causal,
            seed=config.seed,
            environment=environment(device),
            flags=flag_records,
            **_with_selection_flops(flops_result_fields(step_flops, outcome.steps,
                                                        eval_forward=eval_flops,
                                                        eval_tokens=evaluated), flag_records),
        )

    def run_all(self, configs: list[BenchmarkConfig], resume: bool = False,
                isolate: bool = False, overwrite: bool = False,
                unit: str = "run") -> list[BenchmarkResults]:
        """Run each config; with ``isolate`` each in a child process of its own. Progress says
        "run k of n" (``unit`` k of n) and the command's ETA, estimated from the runs finished
        so far."""
        for c in configs:  # refuse before the first run starts, not between runs
            self.check_can_write(c, resume=resume, overwrite=overwrite)
        kept, to_train = self.split_finished(configs, resume, unit)
        trained, finished = {}, []
        for index, config in enumerate(to_train, 1):
            command = CommandProgress(index, len(to_train), list(finished), unit=unit)
            if isolate:
                trained[config.model_name] = self._run_isolated(config, resume, overwrite, command)
            else:
                trained[config.model_name] = self.run_benchmark(
                    config, resume=resume, overwrite=overwrite, command=command)
            finished.append(time.time() - command.run_started)
        return [kept[c.model_name] if c.model_name in kept else trained[c.model_name]
                for c in configs]

    def split_finished(self, configs: list[BenchmarkConfig], resume: bool, unit: str = "run"
                       ) -> tuple[dict[str, BenchmarkResults], list[BenchmarkConfig]]:
        """With ``resume``: the finished results that ``--resume`` keeps, by run name, and the
        configs left to train. Kept runs start no process and do not count in "run k of n" or
        the command's ETA, which would otherwise be the mean of seconds-long reuses."""
        kept = {c.model_name: done for c in configs
                if resume and (done := self.finished_result(c)) is not None}
        if kept:
            log.info("--resume: %d of %d %ss already finished with these settings and are kept; "
                     "%d to train", len(kept), len(configs), unit, len(configs) - len(kept))
        return kept, [c for c in configs if c.model_name not in kept]

    def _run_isolated(self, config: BenchmarkConfig, resume: bool, overwrite: bool = False,
                      command: CommandProgress | None = None) -> BenchmarkResults:
        # threads chosen here, before the run's process starts: OpenMP reads its settings
        # from the environment when torch loads
        policy = threads_mod.choose(self.threads) if self.threads is not None else None
        payload = json.dumps({"config": config.to_dict(), "output_dir": str(self.output_dir),
                              "resume": resume, "overwrite": overwrite,
                              "progress": self.progress,
                              "progress_interval": self.progress_interval,
                              "command": command.to_dict() if command else None,
                              "thread_policy": policy.to_dict() if policy else None,
                              "parent_pid": os.getpid()})
        env = {**os.environ, **(policy.environ() if policy else {})}
        child = subprocess.Popen([sys.executable, "-m", "bkbench.worker", payload],
                                 pass_fds=self.worker_fds, env=env)
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
