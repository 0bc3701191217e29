"""Command line: a thin layer over the library API.

    bkbench run [--preset default|smoke] [--config FILE.yaml] [--models a,b] [--<field> VALUE ...]

Every :class:`~bkbench.config.BenchmarkConfig` field is an option (``--d-model 128``,
``--use-analytic-gradient``, ``--no-tie-weights``). Bad values stop the command with exit
code 2 and a one-line message before any work starts.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import typing
from pathlib import Path
from typing import Sequence

import torch.distributed as dist

from . import __version__
from .config import PRESETS, BenchmarkConfig, ConfigError, build_run_configs, load_yaml
from .data import DataError
from .train import (CheckpointMismatchError, TrainingDivergedError, TrainingInterrupted,
                    init_distributed)

EXIT_USAGE = 2

# options that have a dedicated flag with its own help below
_DEDICATED = {"data_dir", "split_scheme", "device"}
# run identity comes from --models / the config file's runs, not from per-field overrides
_NOT_OPTIONS = {"model_name", "architecture"}

_FIELD_HELP = {
    "d_model": "hidden size", "n_layers": "number of blocks", "n_seq": "context length (tokens)",
    "n_heads": "attention heads (Transformer)", "dropout": "dropout probability",
    "tie_weights": "tie the LM head to the token embedding",
    "num_experts": "MoE experts per layer (ResNet-BK)", "top_k": "experts per token (ResNet-BK)",
    "bk_heads": "BK-Core heads K per layer", "bk_mode": "causal or bidirectional (not a valid LM)",
    "v_max": "bound of the BK potential", "bk_h0": "free diagonal h0", "bk_t": "initial coupling t",
    "bk_energy": "initial energy E of z = E + i*eps", "bk_eps": "initial eps > 0 of z",
    "moe_balance_weight": "weight of the MoE load-balancing loss",
    "batch_size": "training windows per step", "epochs": "training epochs",
    "max_steps": "stop after this many steps", "max_tokens": "stop after this many training tokens",
    "lr": "peak learning rate (AdamW)", "weight_decay": "AdamW weight decay on matrices",
    "grad_clip": "gradient-norm clipping threshold", "warmup_steps": "linear warm-up steps",
    "min_lr_ratio": "final learning rate as a fraction of lr (cosine)", "seed": "random seed",
    "eval_batch_size": "evaluation windows per batch",
    "eval_stride": "sliding-window stride for evaluation (default: n_seq, no overlap)",
    "variant": "WikiText-2 form: tokens or raw", "tokenizer": "word or byte",
    "checkpoint_every": "checkpoint every N steps (0: only at epoch ends)",
    "keep_checkpoints": "checkpoints kept per run", "tensorboard": "write TensorBoard logs",
    "allow_noncausal": "train a model that fails the causality audit (perplexity marked invalid)",
}


def _field_type(f: dataclasses.Field) -> type:
    hint = typing.get_type_hints(BenchmarkConfig)[f.name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def _parse_optional(kind: type):
    def parse(text: str):
        if text.lower() in ("none", "null"):
            return None
        return kind(text)
    parse.__name__ = kind.__name__
    return parse


def _add_config_fields(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("config fields (override the preset and the config file)")
    for f in dataclasses.fields(BenchmarkConfig):
        if f.name in _DEDICATED or f.name in _NOT_OPTIONS:
            continue
        kind = _field_type(f)
        flag = "--" + f.name.replace("_", "-")
        help_text = _FIELD_HELP.get(f.name)
        if f.name.startswith("use_"):
            help_text = f"optimisation flag {f.name} (DESIGN.md section 4)"
        if kind is bool:
            group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction,
                               default=argparse.SUPPRESS, help=help_text)
        else:
            group.add_argument(flag, dest=f.name, type=_parse_optional(kind),
                               default=argparse.SUPPRESS, metavar=kind.__name__.upper(),
                               help=help_text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bkbench",
        description="Train and compare language models on WikiText-2: a causal Transformer "
                    "against ResNet-BK, with held-out perplexity and measured cost.")
    parser.add_argument("--version", action="version", version=f"bkbench {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="train and evaluate the benchmark's models",
                         description="Train and evaluate each run of the benchmark "
                                     "(transformer_baseline, resnet_bk_baseline, resnet_bk_full) "
                                     "and write one results JSON per run.")
    run.add_argument("--preset", default="default", choices=sorted(PRESETS),
                     help="starting values: 'default' is the seed's sizes and 5 epochs, "
                          "'smoke' a tiny run for checking the set-up (default: %(default)s)")
    run.add_argument("--config", type=Path, metavar="FILE.yaml",
                     help="YAML file of config fields, optionally with a 'runs' mapping")
    run.add_argument("--models", metavar="A,B",
                     help="comma-separated subset of the runs to train (default: all)")
    run.add_argument("--data-dir", dest="data_dir", metavar="DIR",
                     help="folder with wiki.{train,valid,test}.{tokens,raw} "
                          "(default: $BKBENCH_DATA_DIR, then the cache, then a download)")
    run.add_argument("--split-scheme", dest="split_scheme", choices=["official", "proxy"],
                     help="official train/valid/test, or proxy for machines without the train "
                          "split (train=valid, valid/test=halves of test); written into results")
    run.add_argument("--device", dest="device", help="auto, cpu, cuda or cuda:N")
    run.add_argument("--output-dir", type=Path, default=Path("benchmark_results/wikitext2"),
                     help="where results are written (default: %(default)s)")
    run.add_argument("--resume", action="store_true",
                     help="continue unfinished runs from their latest checkpoint and skip "
                          "runs whose results are complete")
    run.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_config_fields(run)
    return parser


def _cmd_run(args: argparse.Namespace) -> int:
    from .benchmark import WikiText2Benchmark

    file_values = load_yaml(args.config) if args.config else {}
    overrides = {k: v for k, v in vars(args).items()
                 if k in {f.name for f in dataclasses.fields(BenchmarkConfig)}}
    for name in _DEDICATED:  # dedicated options default to None: unset means "not overridden"
        if overrides.get(name) is None:
            overrides.pop(name, None)
    models = [m.strip() for m in args.models.split(",") if m.strip()] if args.models else None
    configs = build_run_configs(args.preset, file_values, overrides, models)

    distributed = init_distributed(configs[0].device)
    is_main = not distributed or dist.get_rank() == 0
    bench = WikiText2Benchmark(args.output_dir, progress=not args.quiet and is_main)
    # load the data before any training so that a data problem stops everything up front
    for config in configs:
        bench.load_data(config)
    try:
        results = bench.run_all(configs, resume=args.resume)
    except TrainingInterrupted as exc:
        print(f"bkbench: {exc}", file=sys.stderr)
        return 128 + exc.signum
    except TrainingDivergedError as exc:
        print(f"bkbench: error: {exc}", file=sys.stderr)
        return 1
    finally:
        if distributed:
            dist.destroy_process_group()
    if is_main:
        from .summary import print_summary
        print_summary(results)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "run":
            return _cmd_run(args)
    except (ConfigError, DataError, CheckpointMismatchError) as exc:
        parser.exit(EXIT_USAGE, f"bkbench: error: {exc}\n")
    parser.error(f"unknown command {args.command!r}")
    return EXIT_USAGE


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
