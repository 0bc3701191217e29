"""Counted FLOPs and step time of use_multi_scale and use_sparse_bk against the baseline.

Usage::

    python benchmarks/structural_flags.py                 # default-preset model, batch 8
    python benchmarks/structural_flags.py --vocab 256 --batch 32 --repeats 5

For each of baseline, multi_scale, sparse_bk and both (same seed, so the shared weights are
equal): the counted forward and backward FLOPs of one training step
(``measure_step_flops``, the mixer component beside the total), and the median wall time of
``--repeats`` training steps (forward, cross-entropy, backward; no optimizer step), after one
warm-up step. The sparse router is untrained (about half of the tokens routed), so its
numbers are those of a share near 1/2.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from bkbench.config import BenchmarkConfig
from bkbench.flags import build_model
from bkbench.metrics.flops import measure_step_flops
from bkbench.models.layers.sparse_bk import chain_routers, layer_stats


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--vocab", type=int, default=33278)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    variants = {"baseline": {}, "multi_scale": {"use_multi_scale": True},
                "sparse_bk": {"use_sparse_bk": True},
                "both": {"use_multi_scale": True, "use_sparse_bk": True}}
    print(f"d_model 64, 4 layers, N {args.seq}, batch {args.batch}, vocab {args.vocab}, "
          f"{torch.get_num_threads()} threads")
    print(f"{'variant':12} {'fwd FLOPs':>12} {'bwd FLOPs':>12} {'mixer fwd':>10} "
          f"{'ffn fwd':>11} {'step ms':>8}  share")
    for name, flags in variants.items():
        cfg = BenchmarkConfig.from_dict(dict(model_name="resnet_bk_bench", d_model=64,
                                             n_layers=4, n_seq=args.seq,
                                             batch_size=args.batch, seed=0, **flags)).validate()
        torch.manual_seed(0)
        model, _ = build_model(cfg, args.vocab)
        rep = measure_step_flops(model, args.batch, args.seq, args.vocab)
        x = torch.randint(0, args.vocab, (args.batch, args.seq + 1),
                          generator=torch.Generator().manual_seed(1))
        model.train()
        times = []
        for r in range(args.repeats + 1):
            start = time.perf_counter()
            logits = model(x[:, :-1])
            F.cross_entropy(logits.reshape(-1, args.vocab), x[:, 1:].reshape(-1)).backward()
            if r:
                times.append(time.perf_counter() - start)
            model.zero_grad(set_to_none=True)
        mixers = chain_routers(model)
        share = (f"{sum(s['share'] for s in layer_stats(mixers)) / len(mixers):.3f}"
                 if mixers else "-")
        print(f"{name:12} {rep.forward:12.4e} {rep.backward:12.4e} "
              f"{rep.forward_by_component['mixer']:10.4e} "
              f"{rep.forward_by_component['feed_forward']:11.4e} "
              f"{statistics.median(times) * 1e3:8.1f}  {share}")


if __name__ == "__main__":
    main()
