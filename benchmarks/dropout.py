"""Cost of keyed dropout (bkbench.models.dropout) against the RNG-stream dropout it replaces.

    python benchmarks/dropout.py [--device cpu|cuda] [--repeats 20]

Prints, for the shapes of the default preset (batch 32, context 128, d_model 64, 4 heads), the
median time of one training step (forward + backward) of the Transformer with the keyed
masks and with ``nn.Dropout`` + SDPA's built-in attention dropout, interleaved A/B in one
process, and the time of the mask alone per dropout site.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from bkbench.models import build_model
from bkbench.models.dropout import KeyedDropout, keep_mask
from bkbench.models.transformer import CausalSelfAttention


def stream_variant(model: nn.Module) -> nn.Module:
    """The same model with the RNG-stream dropout of before (nn.Dropout, SDPA dropout_p)."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, KeyedDropout):
                setattr(module, name, nn.Dropout(child.p))

    def attention(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (u.view(B, T, self.n_heads, C // self.n_heads).transpose(1, 2) for u in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.resid_dropout(self.proj(y.transpose(1, 2).contiguous().view(B, T, C)))

    for module in model.modules():
        if isinstance(module, CausalSelfAttention):
            module.forward = attention.__get__(module)
    return model


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_time(model, idx, device) -> float:
    sync(device)
    start = time.perf_counter()
    logits = model(idx)
    F.cross_entropy(logits.flatten(0, 1), idx.flatten()).backward()
    sync(device)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--vocab-size", type=int, default=13777)
    args = parser.parse_args()
    device = torch.device(args.device)
    kw = dict(d_model=64, n_layers=4, n_heads=4, n_seq=128, dropout=0.1)
    torch.manual_seed(0)
    keyed = build_model("transformer", args.vocab_size, **kw).to(device).train()
    torch.manual_seed(0)
    stream = stream_variant(build_model("transformer", args.vocab_size, **kw)).to(device).train()
    idx = torch.randint(0, args.vocab_size, (32, 128), device=device)
    times = {"keyed": [], "stream": []}
    for _ in range(2):  # warm-up
        step_time(keyed, idx, device), step_time(stream, idx, device)
    for _ in range(args.repeats):  # interleaved A/B
        times["keyed"].append(step_time(keyed, idx, device))
        times["stream"].append(step_time(stream, idx, device))
    masks = {"residual (32, 128, 64)": (32, 128, 64), "attention (32, 4, 128, 128)": (32, 4, 128, 128)}
    print(f"device {device}, Transformer d_model 64, 4 layers, batch 32 x 128, dropout 0.1")
    print(f"{'what':<34} {'keyed ms':>9} {'stream ms':>10} {'ratio':>6}")
    k, s = statistics.median(times["keyed"]) * 1e3, statistics.median(times["stream"]) * 1e3
    print(f"{'train step (fwd + bwd)':<34} {k:9.2f} {s:10.2f} {k / s:6.2f}")
    for label, shape in masks.items():
        x = torch.randn(shape, device=device)
        kt, st = [], []
        for _ in range(args.repeats):
            sync(device)
            t0 = time.perf_counter()
            keep_mask(torch.Size(shape), 0.1, 1, device)
            sync(device)
            t1 = time.perf_counter()
            F.dropout(x, 0.1, True)
            sync(device)
            kt.append(t1 - t0)
            st.append(time.perf_counter() - t1)
        k, s = statistics.median(kt) * 1e3, statistics.median(st) * 1e3
        print(f"{'mask ' + label:<34} {k:9.2f} {s:10.2f} {k / s:6.2f}")


if __name__ == "__main__":
    main()
