"""Training-step throughput of GLA vs ResNet-BK vs the Transformer as the context grows.

Usage::

    python benchmarks/peers_seq_len.py                       # n_seq 128, 512, 2048; 5 repeats
    python benchmarks/peers_seq_len.py --repeats 2 --seq-lens 128,512
    python benchmarks/peers_seq_len.py --models transformer_baseline,gla_baseline,lstm_baseline

Each model is built as ``bkbench run`` builds it (the ``default`` preset's sizes, the run's
own settings) with ``n_seq`` set per column and ``batch_size = tokens // n_seq``, so every
step trains on the same number of tokens (default 4096 = the default preset's 32 x 128). A
step is ``Trainer.train_step``, what the run does: forward, the LM head fused with the
cross-entropy, the model's auxiliary loss and the flags' loss terms, backward, gradient
clipping, AdamW step, schedule, on random tokens of a vocabulary of ``--vocab``
(default 13,777, the proxy scheme's; the LM head's cost does not depend on n_seq).

The models are interleaved in one process -- repeat r times every (n_seq, model) once -- so
that a machine whose load drifts slows all of them alike; each figure is the median over the
repeats of tokens / step time, after ``--warmup`` untimed steps. CUDA is synchronized around
every step. With ``use_active_learning`` on (resnet_bk_full), the batch selection's scoring
passes are not part of ``train_step`` and so not in these figures; ``bkbench run`` counts them.
"""

from __future__ import annotations

import argparse
import statistics
import time
from types import SimpleNamespace

import torch

from bkbench.config import build_run_configs
from bkbench.flags import build_model
from bkbench.results import environment
from bkbench.train import Trainer, resolve_device, seed_everything


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="transformer_baseline,resnet_bk_full,gla_baseline")
    parser.add_argument("--seq-lens", default="128,512,2048")
    parser.add_argument("--tokens", type=int, default=4096, help="tokens per training step")
    parser.add_argument("--vocab", type=int, default=13777)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    seq_lens = [int(s) for s in args.seq_lens.split(",")]
    bad = [n for n in seq_lens if n < 1 or args.tokens % n]
    if bad:
        parser.error(f"--tokens {args.tokens} must be a multiple of every n_seq; not of {bad}")
    device = resolve_device(args.device)

    runs = {}   # (n_seq, name) -> (trainer, inputs, targets)
    for n in seq_lens:
        overrides = {"n_seq": n, "batch_size": args.tokens // n, "device": args.device,
                     "max_steps": 10 ** 9}
        gen = torch.Generator().manual_seed(n)
        stream = torch.randint(0, args.vocab, (max(4 * args.tokens, 4 * n + 1),), generator=gen)
        data = SimpleNamespace(train=stream, valid=stream[:n + 1], test=stream[:n + 1],
                               vocab=SimpleNamespace(eos_id=0))
        # in the order of `names`; a run's name gains an "-n_seq..." suffix, the key keeps it plain
        for name, config in zip(names, build_run_configs("default", overrides=overrides,
                                                         models=names)):
            seed_everything(config.seed)
            # with its flags applied, trained by the trainer's own step (flags' loss terms,
            # autocast, pruning's step hook), as `bkbench run` trains it
            model, flags = build_model(config, args.vocab)
            trainer = Trainer(config, model.to(device), data, device, progress=False, flags=flags)
            idx = torch.randint(0, args.vocab, (config.batch_size, n + 1), generator=gen).to(device)
            runs[n, name] = (trainer, idx[:, :-1], idx[:, 1:])

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for trainer, x, y in runs.values():
        for _ in range(args.warmup):
            trainer.train_step(x, y)
    times = {key: [] for key in runs}
    for _ in range(args.repeats):
        for key, (trainer, x, y) in runs.items():
            sync()
            start = time.perf_counter()
            trainer.train_step(x, y)
            sync()
            times[key].append(time.perf_counter() - start)

    env = environment(device)
    print(f"machine: {env['cpu_model']}; {env['cpu_count']} logical cores; torch threads "
          f"{env['torch_threads']}; torch {env['torch_version']}; device {env['device']}"
          + (f" ({env['cuda_device']})" if "cuda_device" in env else ""))
    print(f"training steps of {args.tokens} tokens (batch = {args.tokens} / n_seq), vocabulary "
          f"{args.vocab}, default preset sizes; median of {args.repeats} interleaved repeats "
          f"after {args.warmup} warm-up step(s)")
    print()
    header = ["model"] + [f"n_seq {n} tok/s" for n in seq_lens]
    rows = [header]
    for name in names:
        rows.append([name] + [f"{args.tokens / statistics.median(times[n, name]):,.0f}"
                              for n in seq_lens])
    if "transformer_baseline" in names:
        for name in names:
            if name == "transformer_baseline":
                continue
            rows.append([f"{name} / transformer"] + [
                f"{statistics.median(times[n, 'transformer_baseline']) / statistics.median(times[n, name]):.2f}x"
                for n in seq_lens])
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    for i, row in enumerate(rows):
        print("  ".join(c.ljust(widths[0]) if j == 0 else c.rjust(widths[j])
                        for j, c in enumerate(row)))
        if i == 0:
            print("  ".join("-" * w for w in widths))


if __name__ == "__main__":
    main()
