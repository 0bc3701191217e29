"""Training throughput with and without ``use_mixed_precision`` (bf16 autocast), per model.

Usage::

    python benchmarks/mixed_precision.py              # default-preset sizes, word-level vocabulary
    python benchmarks/mixed_precision.py --quick      # smoke-preset sizes (byte vocabulary)
    python benchmarks/mixed_precision.py --device cuda

For each architecture one model is built twice from the same seed, once with the flag and once
without (bkbench.flags.build_model, so the float32 BK mixers of the flag are included), and one
training step (the trainer's compute_loss, backward, optimizer step) is timed on random token
batches, the two settings interleaved, warm-up steps excluded. Prints the median tokens per
second of each and their ratio, with the CPU's bf16 support as /proc/cpuinfo reports it: on a
CPU without native bf16 matrix units (avx512_bf16 / amx_bf16) bf16 is emulated and slower.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from bkbench.config import PRESETS, BenchmarkConfig
from bkbench.flags import build_model
from bkbench.train import make_optimizer, resolve_device, seed_everything


def cpu_bf16_features() -> str:
    try:
        flags = next(l for l in Path("/proc/cpuinfo").read_text().splitlines()
                     if l.startswith("flags")).split()
    except (OSError, StopIteration):
        return "unknown"
    found = [f for f in ("avx512_bf16", "amx_bf16", "avx512f") if f in flags]
    return ", ".join(found) or "none of avx512_bf16 / amx_bf16"


def step_timer(config: BenchmarkConfig, vocab: int, device: torch.device):
    seed_everything(config.seed)
    model, flags = build_model(config, vocab)
    model.to(device).train()
    opt = make_optimizer(model, config)
    gen = torch.Generator().manual_seed(0)

    def step() -> float:
        idx = torch.randint(0, vocab, (config.batch_size, config.n_seq + 1), generator=gen).to(device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        with flags.autocast(device):
            logits = model(idx[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), idx[:, 1:].flatten())
        aux = model.auxiliary_loss()
        (loss + aux if aux is not None else loss).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start
    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke-preset sizes")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per setting")
    parser.add_argument("--vocab", type=int, default=None,
                        help="vocabulary size (default: 256 with --quick, else 13777, proxy word)")
    args = parser.parse_args()
    device = resolve_device(args.device)
    preset = PRESETS["smoke" if args.quick else "default"]
    vocab = args.vocab or (256 if args.quick else 13777)
    print(f"device {device}; torch {torch.__version__}; threads {torch.get_num_threads()}; "
          f"CPU bf16 features: {cpu_bf16_features()}")
    print(f"sizes: {'smoke' if args.quick else 'default'} preset, vocabulary {vocab}; "
          f"median of {args.steps} interleaved training steps after 2 warm-up steps\n")
    print(f"{'model':<12} {'float32 tok/s':>14} {'bf16 tok/s':>12} {'bf16 / fp32':>12}")
    for arch in ("transformer", "resnet_bk"):
        base = dict(preset, model_name=f"{arch}_bench", architecture=arch, device=str(device))
        timers = {on: step_timer(BenchmarkConfig.from_dict({**base, "use_mixed_precision": on})
                                 .validate(), vocab, device) for on in (False, True)}
        times = {False: [], True: []}
        for i in range(args.steps + 2):
            for on in (False, True):
                t = timers[on]()
                if i >= 2:
                    times[on].append(t)
        tokens = preset["batch_size"] * preset["n_seq"]
        tps = {on: tokens / statistics.median(ts) for on, ts in times.items()}
        print(f"{arch:<12} {tps[False]:>14,.0f} {tps[True]:>12,.0f} {tps[True] / tps[False]:>12.2f}")


if __name__ == "__main__":
    main()
