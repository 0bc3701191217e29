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

from . import __version__
from .config import (PRESETS, BenchmarkConfig, ConfigError, build_run_configs, config_keys,
                     load_yaml)
from .runs import check_can_write, renames_run
from .threads import threads_option
from .validation import (check_device, check_output_dir, check_settings_have_their_flags,
                         nonempty_path)

# torch and everything that imports it are imported by the commands that need them

EXIT_USAGE = 2
DEFAULT_OUTPUT_ROOT = Path("benchmark_results") / "wikitext2"

# options that have a dedicated flag with its own help below
_DEDICATED = {"data_dir", "split_scheme", "device"}
# run identity comes from --models / the config file's runs, not from per-field overrides;
# flag settings are options by their flat names (--koopman-weight), not as one mapping
_NOT_OPTIONS = {"model_name", "architecture", "flag_settings"}

_FIELD_HELP = {
    "d_model": "hidden size", "n_layers": "number of blocks", "n_seq": "context length (tokens)",
    "n_heads": "attention heads (Transformer)", "dropout": "dropout probability",
    "tie_weights": "tie the LM head to the token embedding",
    "num_experts": "MoE experts per layer (ResNet-BK)", "top_k": "experts per token (ResNet-BK)",
    "bk_heads": "BK-Core heads K per layer", "bk_mode": "causal or bidirectional (not a valid LM)",
    "v_max": "bound of the BK potential", "bk_h0": "free diagonal h0", "bk_t": "initial coupling t",
    "bk_energy": "initial energy E of z = E + i*eps", "bk_eps": "initial eps > 0 of z",
    "moe_balance_weight": "weight of the MoE load-balancing loss",
    "gla_chunk_size": "chunk length of GLA's chunkwise torch form (gla_baseline)",
    "gla_backend": "GLA kernels: auto (fla on CUDA if installed, else torch), torch, fla, naive",
    "batch_size": "training windows per step", "epochs": "training epochs",
    "max_steps": "stop after this many steps", "max_tokens": "stop after this many training tokens",
    "budget_flops": "equal compute: stop before the counted training FLOPs exceed this",
    "budget_seconds": "equal compute: stop once training time reaches this (s)",
    "lr": "peak learning rate (AdamW)", "weight_decay": "AdamW weight decay on matrices",
    "grad_clip": "gradient-norm clipping threshold", "warmup_steps": "linear warm-up steps",
    "min_lr_ratio": "final learning rate as a fraction of lr (cosine)", "seed": "random seed",
    "eval_batch_size": "evaluation windows per batch",
    "eval_stride": "sliding-window stride for evaluation (default: n_seq, no overlap)",
    "variant": "WikiText form: tokens or raw", "tokenizer": "word, byte or bpe:N (byte-level BPE)",
    "dataset": "wikitext-2, wikitext-103, ptb, enwik8, text8 or dir:PATH (docs/data.md)",
    "checkpoint_every": "checkpoint every N steps (0: only at epoch ends)",
    "keep_checkpoints": "checkpoints kept per run", "tensorboard": "write TensorBoard logs",
    "allow_noncausal": "train a model that fails the causality audit (perplexity marked invalid)",
}


def default_output_dir(dataset: str, preset: str) -> Path:
    """benchmark_results/<dataset>/<preset>; WikiText-2 keeps its folder ``wikitext2``."""
    from .corpora import dataset_slug
    if dataset == "wikitext-2":
        return DEFAULT_OUTPUT_ROOT / preset
    return DEFAULT_OUTPUT_ROOT.parent / dataset_slug(dataset) / preset


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


def _audit_field(name: str) -> bool:
    """The fields the causality audit reads: the model's (sizes, settings, flags) and the seed."""
    return renames_run(name) or name in ("seed", "dropout")


def _add_config_fields(parser: argparse.ArgumentParser, exclude: frozenset[str] = frozenset()) -> None:
    # the registry's options as written out in flag_options: the flag modules import torch
    from . import flag_options
    group = parser.add_argument_group("config fields (override the preset and the config file)")
    for f in dataclasses.fields(BenchmarkConfig):
        if f.name in _DEDICATED or f.name in _NOT_OPTIONS or f.name in exclude:
            continue
        help_text = flag_options.FLAG_HELP.get(f.name, _FIELD_HELP.get(f.name))
        _add_option(group, f.name, _field_type(f), help_text)
    settings = parser.add_argument_group(
        "flag settings (used when the flag is on; see docs/flags.md)")
    kinds = {"bool": bool, "int": int, "float": float, "str": str}
    for name, (kind, help_text) in flag_options.SETTINGS.items():
        _add_option(settings, name, kinds[kind], help_text)


def _add_option(group, name: str, kind: type, help_text: str | None) -> None:
    flag = "--" + name.replace("_", "-")
    if kind is bool:
        group.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction,
                           default=argparse.SUPPRESS, help=help_text)
    else:
        group.add_argument(flag, dest=name, type=_parse_optional(kind),
                           default=argparse.SUPPRESS, metavar=kind.__name__.upper(),
                           help=help_text)


def _add_threads(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=threads_option, default="auto", metavar="auto|N",
                        help="torch threads per run: 'auto' uses the CPUs that other "
                             "processes leave free when the run starts (at least one), N "
                             "exactly N; recorded in the results (default: %(default)s)")


def _add_run_command(sub, add_config_fields) -> None:
    """``bkbench run``: train and evaluate the benchmark's runs."""
    run = sub.add_parser("run", help="train and evaluate the benchmark's models, write the report",
                         description="Train and evaluate each run of the benchmark "
                                     "(transformer_baseline, resnet_bk_baseline, resnet_bk_full) "
                                     "and write one results JSON per run.")
    run.add_argument("--preset", default="default", choices=sorted(PRESETS),
                     help="starting values: 'default' is the seed's sizes and 5 epochs, "
                          "'smoke' a tiny run for checking the set-up (default: %(default)s)")
    run.add_argument("--config", type=Path, metavar="FILE.yaml",
                     help="YAML file of config fields, optionally with a 'runs' mapping")
    run.add_argument("--models", metavar="A,B",
                     help="comma-separated runs to train (default: the three seed runs; "
                          "also gla_baseline, lstm_baseline; 'all' for all five)")
    run.add_argument("--data-dir", dest="data_dir", metavar="DIR",
                     help="folder with wiki.{train,valid,test}.{tokens,raw} "
                          "(default: $BKBENCH_DATA_DIR, then the cache, then a download)")
    run.add_argument("--split-scheme", dest="split_scheme", choices=["official", "proxy"],
                     help="official train/valid/test, or proxy for machines without the train "
                          "split (train=valid, valid/test=halves of test); written into results")
    run.add_argument("--device", dest="device", help="auto, cpu, cuda or cuda:N")
    run.add_argument("--output-dir", type=nonempty_path,
                     help=f"where results are written (default: {DEFAULT_OUTPUT_ROOT}/PRESET, "
                          "one folder per preset)")
    run.add_argument("--resume", action="store_true",
                     help="continue unfinished runs from their latest checkpoint and skip "
                          "runs whose results are complete")
    run.add_argument("--overwrite", action="store_true",
                     help="replace finished results and delete the checkpoints of runs of the "
                          "same name (without it, or --resume, existing runs stop the command)")
    run.add_argument("--run-suffix", metavar="SUFFIX",
                     help="name each run <run>-SUFFIX (default: a model-size or flag override "
                          "names it after the override, e.g. resnet_bk_full-d_model128)")
    run.add_argument("--quiet", action="store_true", help="no progress bar or progress lines")
    run.add_argument("--seeds", metavar="S,S,...",
                     help="repeat every run once per seed (runs named <run>-seed<S>); the report "
                          "adds means, 95%% intervals and Welch's t-test p-values "
                          "(or 'seeds:' in the config file)")
    run.add_argument("--progress-interval", type=float, default=30.0, metavar="SECONDS",
                     help="seconds between progress lines (step, loss, tokens/s, ETA) when "
                          "stderr is not a terminal (default: %(default)s)")
    _add_threads(run)
    add_config_fields("run", run)


def _add_audit_command(sub, add_config_fields) -> None:
    """``bkbench audit``: the causality check of each run's model."""
    audit = sub.add_parser(
        "audit", help="check that each model's logits depend on no later token",
        description="Build each run's model (no data, no training), change one token at a time "
                    "at several positions of random sequences, and report the largest change of "
                    "any logit at an earlier position, in eval and train mode. Exit code 1 if "
                    "any model is not causal.")
    audit.add_argument("--preset", default="default", choices=sorted(PRESETS),
                       help="starting values (default: %(default)s)")
    audit.add_argument("--config", type=Path, metavar="FILE.yaml", help="YAML config file")
    audit.add_argument("--models", metavar="A,B",
                       help="comma-separated runs (as for run; 'all' for all five)")
    audit.add_argument("--vocab-size", type=int, default=33278,
                       help="vocabulary of the audited models (default: %(default)s, WikiText-2)")
    audit.add_argument("--sequences", type=int, default=2,
                       help="random sequences per perturbed position (default: %(default)s)")
    add_config_fields("audit", audit, exclude=frozenset(f.name for f in dataclasses.fields(BenchmarkConfig)
                                                if not _audit_field(f.name)))


def _add_ablate_command(sub, add_config_fields) -> None:
    """``bkbench ablate``: the baseline, each flag alone, all flags."""
    ablate = sub.add_parser(
        "ablate", help="ResNet-BK baseline, each flag alone, all flags: one table",
        description="Train the ResNet-BK baseline, then each implemented optimization flag alone, "
                    "then all of them together, with the same setup and seeds, and write "
                    "ablation.json, ablation.md and ablation.png (test perplexity and its "
                    "difference from the baseline with a confidence interval, FLOPs per step, "
                    "tokens/s, peak memory, model size).")
    ablate.add_argument("--preset", default="default", choices=sorted(PRESETS),
                        help="starting values (default: %(default)s)")
    ablate.add_argument("--config", type=Path, metavar="FILE.yaml",
                        help="YAML file of shared config fields (and optionally 'seeds')")
    ablate.add_argument("--seeds", metavar="S,S,...",
                        help="repeat every row once per seed (intervals need two or more)")
    ablate.add_argument("--jobs", type=int, default=1,
                        help="rows trained at once (> 1 makes their timings contended; "
                             "default: %(default)s)")
    ablate.add_argument("--data-dir", dest="data_dir", metavar="DIR", help="WikiText-2 folder")
    ablate.add_argument("--split-scheme", dest="split_scheme", choices=["official", "proxy"])
    ablate.add_argument("--device", dest="device", help="auto, cpu, cuda or cuda:N")
    ablate.add_argument("--output-dir", type=Path,
                        help="where the rows' results and the table go (default: "
                             "benchmark_results/ablation/PRESET, one folder per preset)")
    ablate.add_argument("--resume", action="store_true",
                        help="continue unfinished rows and reuse complete ones")
    ablate.add_argument("--overwrite", action="store_true", help="redo an existing ablation")
    ablate.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_threads(ablate)
    add_config_fields("ablate", ablate, exclude=frozenset(f.name for f in dataclasses.fields(BenchmarkConfig)
                                                 if f.name.startswith("use_")))


def _add_scale_command(sub, add_config_fields) -> None:
    """``bkbench scale``: cost (or, with --train, quality) along one swept axis."""
    scale = sub.add_parser(
        "scale", help="sweep sequence length (or model size) and fit cost exponents",
        description="For each model, measure training tokens/s, peak memory and FLOPs per token "
                    "at each value of one swept axis (each point in its own process), fit "
                    "cost = c * x^p per model and metric, and write scale.json and plots.")
    scale.add_argument("--preset", default="default", choices=sorted(PRESETS),
                       help="starting values (default: %(default)s)")
    scale.add_argument("--config", type=Path, metavar="FILE.yaml", help="YAML config file")
    scale.add_argument("--models", metavar="A,B",
                       help="comma-separated runs to sweep (default: transformer_baseline,"
                            "resnet_bk_full)")
    sweep = scale.add_mutually_exclusive_group(required=True)
    for axis in ("n_seq", "d_model", "n_layers"):
        sweep.add_argument("--" + axis.replace("_", "-"), dest="sweep_" + axis, metavar="N,N,...",
                           help=f"values of {axis} to sweep (comma-separated)")
    scale.add_argument("--tokens-per-batch", type=int, metavar="T",
                       help="tokens per training batch along an n_seq sweep (batch = T // n_seq; "
                            "default: the preset's batch_size x n_seq, or the longest n_seq swept "
                            "if that is more)")
    scale.add_argument("--vocab-size", type=int,
                       help="vocabulary of the measured models (default: the preset's: 256 "
                            "bytes with tokenizer=byte, as smoke; else the WikiText-2 word "
                            "vocabulary, 33,278, or 13,777 with --split-scheme proxy)")
    scale.add_argument("--split-scheme", dest="split_scheme", choices=["official", "proxy"],
                       help="whose word vocabulary the models get (no data is read); with "
                            "--train, the split scheme of the data (WikiText-2 only)")
    scale.add_argument("--steps", type=int, default=5, help="timed steps per point (median)")
    scale.add_argument("--warmup", type=int, default=2, help="untimed steps before them")
    scale.add_argument("--device", dest="device", help="auto, cpu, cuda or cuda:N")
    scale.add_argument("--output-dir", type=Path, default=Path("benchmark_results/scale"),
                       help="where scale.json and the plots go (default: %(default)s)")
    scale.add_argument("--overwrite", action="store_true", help="replace an existing scale.json")
    scale.add_argument("--train", action="store_true",
                       help="train every model at every --d-model/--n-layers size to the budget "
                            "of --max-tokens or --budget-flops on the data, and fit held-out "
                            "test loss against parameters and FLOPs (docs/experiments.md)")
    scale.add_argument("--seeds", metavar="S,S,...", help="with --train: seeds per size")
    scale.add_argument("--data-dir", dest="data_dir", metavar="DIR",
                       help="with --train: the dataset's folder (docs/data.md)")
    scale.add_argument("--resume", action="store_true",
                       help="measure only the points an interrupted sweep's scale.json lacks")
    scale.add_argument("--quiet", action="store_true", help="no progress bar")
    scale.add_argument("--threads", type=threads_option, default=None, metavar="auto|N",
                       help="with --train: torch threads per run, as `bkbench run --threads` "
                            "(default: auto)")
    add_config_fields("scale", scale, exclude=frozenset({"n_seq", "d_model", "n_layers"}))


def _add_report_command(sub, add_config_fields) -> None:
    """``bkbench report``: the report of a results folder."""
    report = sub.add_parser("report", help="rebuild report.md/html and plots from a results folder",
                            description="Rebuild the plots, report.md, report.html and the claims "
                                        "audit from the JSON files of a results folder alone.")
    report.add_argument("results_dir", type=Path, metavar="RESULTS_DIR")


def build_parser(command: str | None = "all") -> argparse.ArgumentParser:
    """The parser; the config-field options (which need the flag registry, hence torch) are
    added to ``command``'s subparser only ("all": every one; None: none, for ``--help``)."""

    def add_config_fields(name, subparser, **kw):
        if command in ("all", name):
            _add_config_fields(subparser, **kw)

    parser = argparse.ArgumentParser(
        prog="bkbench",
        description="Train and compare language models on WikiText-2: a causal Transformer "
                    "against ResNet-BK, with held-out perplexity and measured cost.")
    parser.add_argument("--version", action="version", version=f"bkbench {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    _add_run_command(sub, add_config_fields)
    _add_audit_command(sub, add_config_fields)
    _add_ablate_command(sub, add_config_fields)
    _add_scale_command(sub, add_config_fields)
    _add_report_command(sub, add_config_fields)
    return parser


def failure_exit_code(exc: BaseException) -> int | None:
    """Print the one-line message for an expected failure and return its exit code.

    Bad input (config, data, checkpoint of another run, a non-causal model): 2. A diverged
    run: 1. An interrupted run (checkpoint written): 128 + the signal. None: not expected.
    """
    if isinstance(exc, ConfigError):  # before importing torch: --help and bad options stay fast
        print(f"bkbench: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    from .data import DataError
    from .train import CheckpointMismatchError, TrainingDivergedError, TrainingInterrupted

    if isinstance(exc, (DataError, CheckpointMismatchError)):
        print(f"bkbench: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if isinstance(exc, TrainingDivergedError):
        print(f"bkbench: error: {exc}", file=sys.stderr)
        return 1
    if isinstance(exc, TrainingInterrupted):
        print(f"bkbench: {exc}", file=sys.stderr)
        return 128 + exc.signum
    return None


def _configs_from_args(args: argparse.Namespace,
                       allow_seeds: bool = False) -> list[BenchmarkConfig]:
    file_values = load_yaml(args.config) if args.config else {}
    if "seeds" in file_values and not allow_seeds:
        raise ConfigError(f"'seeds' in {args.config} applies to `bkbench run` and "
                          f"`bkbench ablate` only, not to `bkbench {args.command}`")
    overrides = {k: v for k, v in vars(args).items() if k in config_keys()}
    for name in _DEDICATED:  # dedicated options default to None: unset means "not overridden"
        if overrides.get(name) is None:
            overrides.pop(name, None)
    models = None
    if args.models is not None:
        models = [m.strip() for m in args.models.split(",") if m.strip()]
        if not models:
            raise ConfigError(f"--models {args.models!r} names no run; give comma-separated run "
                              "names or leave --models out for all")
    # the command line wins over the file; an empty --seeds '' is an error, not "no seeds"
    file_seeds = file_values.pop("seeds", None)
    seeds = file_seeds if getattr(args, "seeds", None) is None else args.seeds
    configs = build_run_configs(args.preset, file_values, overrides, models,
                                run_suffix=getattr(args, "run_suffix", None))
    run_values = [v for v in (file_values.get("runs") or {}).values() if v]
    for given in (file_values, overrides, *run_values):
        check_settings_have_their_flags(given, configs)
    if seeds is None:
        return configs
    from .experiments.seeds import expand_seeds, parse_seeds
    if "seed" in overrides:
        raise ConfigError("give either --seed or --seeds, not both")
    return expand_seeds(configs, parse_seeds(seeds))


def _cmd_run(args: argparse.Namespace) -> int:
    configs = _configs_from_args(args, allow_seeds=True)
    if not args.progress_interval > 0:
        raise ConfigError(f"--progress-interval must be > 0 seconds, got {args.progress_interval}")
    if args.overwrite and args.resume:
        raise ConfigError("--overwrite and --resume contradict each other; pass one of them")
    output_dir = args.output_dir or default_output_dir(configs[0].dataset, args.preset)
    for config in configs:  # before any work: never replace a finished run by accident
        check_can_write(output_dir, config.to_dict(), resume=args.resume, overwrite=args.overwrite)

    import torch.distributed as dist

    from .benchmark import RunFailedError, WikiText2Benchmark
    from .report import report_main
    from .runlock import RunLock
    from .summary import print_summary
    from .train import (TrainingDivergedError, TrainingInterrupted, init_distributed,
                        resolve_device, steps_per_epoch)
    from .validation import check_model_size, check_selection_pool

    for device in {c.device for c in configs}:
        check_device(device)
    distributed = init_distributed(configs[0].device)
    is_main = not distributed or dist.get_rank() == 0
    lock = None
    if is_main:  # one run per folder (bkbench.runlock); the isolated workers inherit the lock
        check_output_dir(output_dir)
        if output_dir.is_dir():
            lock = RunLock(output_dir).acquire()
    try:
        bench = WikiText2Benchmark(output_dir, progress=not args.quiet and is_main,
                                   progress_interval=args.progress_interval,
                                   threads=args.threads)
        # load the data and size the training and the model before any work, so that bad
        # input stops everything
        for config in configs:
            data = bench.load_data(config)
            steps_per_epoch(config, data.train.numel())
            check_selection_pool(config, (data.train.numel() - 1) // config.n_seq)
            check_model_size(config, len(data.vocab), resolve_device(config.device))
        if is_main and lock is None:
            output_dir.mkdir(parents=True, exist_ok=True)
            lock = RunLock(output_dir).acquire()
        bench.worker_fds = (lock.fd,) if lock is not None else ()
        try:
            # one child process per run isolates its peak memory; under torchrun, run in place
            results = bench.run_all(configs, resume=args.resume, overwrite=args.overwrite,
                                    isolate=not distributed)
            if distributed:
                # a rank that tears gloo down while a peer is still in a collective aborts
                # ("terminate called without an active exception", seen 4 times in 9 runs)
                dist.barrier()
        except RunFailedError as exc:
            return _report_what_finished(output_dir, exc.exit_code, is_main)
        except (TrainingInterrupted, TrainingDivergedError) as exc:
            return _report_what_finished(output_dir, failure_exit_code(exc), is_main)
        finally:
            if distributed:
                dist.destroy_process_group()
        if is_main:
            print_summary(results)
            # comparisons, plots and report over every complete run in the folder, so that
            # rerunning a subset of the runs refreshes everything derived from it
            print()
            return report_main(str(output_dir))
        return 0
    finally:
        if lock is not None:
            lock.release()


def _report_what_finished(output_dir: Path, exit_code: int, is_main: bool) -> int:
    """After an interrupted or failed run: the report of the runs that finished, then the
    run's exit code (the report's own is not the command's)."""
    if is_main and any(output_dir.glob("*_results.json")):
        from .report import report_main
        print(f"\nbkbench: writing the report of the runs that finished in {output_dir}",
              file=sys.stderr)
        try:
            report_main(str(output_dir))
        except KeyboardInterrupt:   # a second Ctrl-C: stop, the results are on disk
            print("bkbench: report interrupted; rebuild it with bkbench report "
                  f"{output_dir}", file=sys.stderr)
    return exit_code


def _cmd_audit(args: argparse.Namespace) -> int:
    import torch

    from .audit import audit_causality, format_audit
    from .flags import build_model
    from .train import seed_everything

    if args.vocab_size < 2 or args.sequences < 1:
        raise ConfigError(f"audit needs --vocab-size >= 2 and --sequences >= 1, got "
                          f"{args.vocab_size} and {args.sequences}")
    configs = _configs_from_args(args)
    all_causal = True
    for config in configs:
        seed_everything(config.seed)
        model, flags = build_model(config, args.vocab_size)
        with flags.autocast(torch.device("cpu")):  # the forward as training runs it
            audit = audit_causality(model, args.vocab_size, seq_len=config.n_seq,
                                    num_sequences=args.sequences, seed=config.seed)
        all_causal &= audit.causal
        print(f"{config.model_name}: {format_audit(audit)}")
    return 0 if all_causal else 1


def _cmd_ablate(args: argparse.Namespace) -> int:
    from .benchmark import RunFailedError
    from .experiments.ablate import format_table, run_ablation
    from .experiments.seeds import parse_seeds

    file_values = load_yaml(args.config) if args.config else {}
    if "runs" in file_values:
        raise ConfigError(f"'runs' in {args.config} does not apply to `bkbench ablate`: its rows "
                          "are the baseline, each flag alone and all flags")
    file_seeds = file_values.pop("seeds", None)
    seeds = file_seeds if args.seeds is None else args.seeds
    overrides = {k: v for k, v in vars(args).items()
                 if k in {f.name for f in dataclasses.fields(BenchmarkConfig)} and v is not None}
    if seeds is not None and "seed" in overrides:
        raise ConfigError("give either --seed or --seeds, not both")
    base = build_run_configs(args.preset, file_values, overrides, ["resnet_bk_baseline"])[0]
    output_dir = args.output_dir or Path("benchmark_results") / "ablation" / args.preset
    try:
        table = run_ablation(base, output_dir,
                             seeds=parse_seeds(seeds) if seeds is not None else None,
                             jobs=args.jobs, resume=args.resume, overwrite=args.overwrite,
                             progress=not args.quiet, threads=args.threads)
    except RunFailedError as exc:
        return exc.exit_code
    print(format_table(table))
    print(f"written: {output_dir / 'ablation.json'}, ablation.md, ablation.png")
    return 0


def _cmd_scale(args: argparse.Namespace) -> int:
    from .experiments.scale import (ScaleInterrupted, format_scale, parse_int_list,
                                    preset_vocab_size, run_scale)

    axis = next(a for a in ("n_seq", "d_model", "n_layers")
                if getattr(args, "sweep_" + a) is not None)
    values = parse_int_list(getattr(args, "sweep_" + axis), "--" + axis.replace("_", "-"))
    if args.train:
        from .experiments.size_scaling import main_from_args
        return main_from_args(args, axis, values, _configs_from_args)
    if args.seeds:
        raise ConfigError("--seeds applies to `bkbench scale --train` only")
    if args.threads is not None:
        raise ConfigError("--threads applies to `bkbench scale --train` only (each cost point "
                          "is measured at torch's default threads)")
    if args.vocab_size is not None and args.vocab_size < 2:
        raise ConfigError(f"--vocab-size must be at least 2, got {args.vocab_size}")
    if args.overwrite and args.resume:
        raise ConfigError("--overwrite and --resume contradict each other; pass one of them")
    if args.tokens_per_batch is not None and args.tokens_per_batch < 1:
        raise ConfigError(f"--tokens-per-batch must be positive, got {args.tokens_per_batch}")
    if not args.models:
        args.models = "transformer_baseline,resnet_bk_full"
    configs = _configs_from_args(args)
    vocab_size = args.vocab_size or preset_vocab_size(configs[0])
    try:
        result = run_scale(configs, axis, values, vocab_size, args.output_dir,
                           tokens_per_batch=args.tokens_per_batch, steps=args.steps,
                           warmup=args.warmup, overwrite=args.overwrite,
                           progress=not args.quiet, resume=args.resume)
    except ScaleInterrupted as exc:
        print(f"bkbench scale: {exc}", file=sys.stderr)
        return 128 + 2
    print(format_scale(result))
    print(f"\nwritten: {args.output_dir / 'scale.json'}")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from .report import report_main
    from .runlock import FolderLock
    with FolderLock(args.results_dir):   # not while a run, ablate or scale writes there
        return report_main(str(args.results_dir))


def _command_of(argv: Sequence[str]) -> str | None:
    # the first word that is not an option: the top-level options take no value
    return next((a for a in argv if not a.startswith("-")), None)


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(_command_of(argv))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    commands = {"run": _cmd_run, "audit": _cmd_audit, "ablate": _cmd_ablate,
                "scale": _cmd_scale,
                "report": _cmd_report}
    try:
        return commands[args.command](args)
    except KeyboardInterrupt:  # Ctrl-C outside training (which checkpoints): no traceback
        print("bkbench: interrupted", file=sys.stderr)
        return 128 + 2
    except Exception as exc:  # the expected failures: a one-line message and their exit code
        code = failure_exit_code(exc)
        if code is None:
            raise
        return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
