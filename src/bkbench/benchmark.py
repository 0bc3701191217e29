"""The seed's API: ``WikiText2Benchmark(output_dir).run_benchmark(config) -> BenchmarkResults``.

Orchestrates one run end to end: data, model, causality audit, training, held-out evaluation,
cost measurements, and an atomically written results file. Files of a run:

- ``<output_dir>/<model_name>_results.json``   the results (complete or absent);
- ``<output_dir>/runs/<model_name>/train_log.jsonl``  one line per step and per epoch;
- ``<output_dir>/runs/<model_name>/checkpoints/``     resumable checkpoints;
- ``<output_dir>/runs/<model_name>/tensorboard/``     when ``tensorboard`` is on.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from .config import BenchmarkConfig
from .data import load_wikitext2
from .models import build_model
from .results import BenchmarkResults, environment
from .train import Trainer, resolve_device, seed_everything

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


class WikiText2Benchmark:
    def __init__(self, output_dir: str | Path = DEFAULT_OUTPUT_DIR, progress: bool = True):
        self.output_dir = Path(output_dir)
        self.progress = progress
        self._data_cache: dict[tuple, Any] = {}

    # --- paths -----------------------------------------------------------------------------

    def results_path(self, model_name: str) -> Path:
        return self.output_dir / f"{model_name}_results.json"

    def run_dir(self, model_name: str) -> Path:
        return self.output_dir / "runs" / model_name

    # --- data ------------------------------------------------------------------------------

    def load_data(self, config: BenchmarkConfig):
        key = (config.data_dir, config.variant, config.split_scheme, config.tokenizer)
        if key not in self._data_cache:
            self._data_cache[key] = load_wikitext2(
                data_dir=config.data_dir, variant=config.variant, scheme=config.split_scheme,
                tokenizer=config.tokenizer)
        return self._data_cache[key]

    def build(self, config: BenchmarkConfig, vocab_size: int) -> torch.nn.Module:
        seed_everything(config.seed)
        return build_model(config.architecture, vocab_size, **config.model_kwargs())

    # --- one run ---------------------------------------------------------------------------

    def run_benchmark(self, config: BenchmarkConfig, resume: bool = False) -> BenchmarkResults:
        config.validate()
        device = resolve_device(config.device)
        data = self.load_data(config)
        results_path = self.results_path(config.model_name)
        if resume and results_path.exists():
            try:
                done = BenchmarkResults.load(results_path)
            except (ValueError, KeyError, TypeError) as exc:
                log.warning("ignoring unreadable results file %s: %s", results_path, exc)
            else:
                if done.config == config.to_dict():
                    log.info("%s: complete results found at %s, skipping", config.model_name,
                             results_path)
                    return done

        model = self.build(config, len(data.vocab))
        is_main = not dist.is_initialized() or dist.get_rank() == 0
        if dist.is_initialized():  # distinct dropout masks per rank, same weights (seeded above)
            torch.manual_seed(config.seed + dist.get_rank())

        fingerprint = {"variant": config.variant, "scheme": config.split_scheme,
                       "tokenizer": config.tokenizer, "checksums": data.checksums}
        trainer = Trainer(config, model, data, device, run_dir=self.run_dir(config.model_name),
                          resume=resume, data_fingerprint=fingerprint,
                          progress=self.progress)
        outcome = trainer.fit()

        params = model.num_parameters()
        results = BenchmarkResults(
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
            num_parameters=params,
            parameter_breakdown=model.parameter_breakdown(),
            model_size_mb=model_size_bytes(model) / 2**20,
            data=data.to_dict(),
            seed=config.seed,
            environment=environment(device),
        )
        if is_main:
            results.save(results_path)
            log.info("%s: test perplexity %.2f (%d tokens), results in %s", config.model_name,
                     results.test_perplexity, results.test_tokens, results_path)
        return results

    def run_all(self, configs: list[BenchmarkConfig], resume: bool = False) -> list[BenchmarkResults]:
        return [self.run_benchmark(c, resume=resume) for c in configs]
