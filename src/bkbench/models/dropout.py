"""Dropout whose masks are a function of (seed, step, site, sample), not of one RNG stream.

``nn.Dropout`` draws its masks from the process's RNG, so under DDP each rank draws masks that
one process training the same global batch would not, and the two runs train different
models. Here the mask of sample ``b`` at dropout site ``s`` is drawn from a generator seeded
with ``mix(seed, step, s, b)``, where ``b`` is the sample's position in the **global** batch:
one process and any number of ranks draw the same mask for the same sample, and a resumed run
draws the masks of the uninterrupted one without any saved RNG state. (The mask of a sample
depends on the device type's generator: CPU and CUDA runs draw different masks.)

The trainer sets the key around each training step (:func:`dropout_key`); outside it
(causality audit, FLOP counting) the key is seed 0, step 0, samples ``0..B-1``, so two
forward passes of equal shape see equal masks.

Other per-sample draws of a training step key themselves alike: :func:`batch_positions` gives
the current forward's samples as positions in the global batch, and the global batch's size
(early exit samples its loss positions over the global batch, then keeps this shard's), and
:func:`shard_weight` the weight of a mean over this shard's samples under DDP.
"""

from __future__ import annotations

import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn

_M64 = (1 << 64) - 1


def mix64(*values: int) -> int:
    """A 64-bit hash of a tuple of non-negative ints (splitmix64's finalizer, chained)."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (v & _M64)) * 0xBF58476D1CE4E5B9 & _M64
        h ^= h >> 31
        h = h * 0x94D049BB133111EB & _M64
        h ^= h >> 29
    return h >> 1  # torch generators take seeds below 2**63 on every backend


@dataclass(frozen=True)
class DropoutKey:
    seed: int = 0
    step: int = 0
    samples: Sequence[int] | None = None   # positions in the global batch; None: 0..B-1
    batch: int | None = None               # the global batch's size; None: B


_current = DropoutKey()


@contextmanager
def dropout_key(seed: int, step: int, samples: Sequence[int] | None,
                batch: int | None = None) -> Iterator[None]:
    """Masks drawn inside are those of ``step`` of a run seeded ``seed``, for the samples at
    positions ``samples`` of the global batch of ``batch`` samples."""
    global _current
    if samples is not None and batch is not None and not all(0 <= s < batch for s in samples):
        raise ValueError(f"dropout key: samples {tuple(samples)} are not positions in a batch "
                         f"of {batch}")
    previous, _current = _current, DropoutKey(seed, step, tuple(samples) if samples is not None
                                              else None, batch)
    try:
        yield
    finally:
        _current = previous


def keep_mask(shape: torch.Size, p: float, site: int, device: torch.device,
              key: DropoutKey | None = None) -> torch.Tensor:
    """Boolean keep-mask of ``shape`` (batch first) for the current (or the given) key."""
    key = key or _current
    samples = range(shape[0]) if key.samples is None else key.samples
    if len(samples) != shape[0]:
        raise ValueError(f"dropout key names {len(samples)} samples, the batch has {shape[0]}")
    generator = torch.Generator(device=device)
    u = torch.empty(shape, device=device)
    for row, sample in zip(u, samples):
        generator.manual_seed(mix64(key.seed, key.step, site, sample))
        row.uniform_(generator=generator)
    return u >= p


def batch_positions(rows: int) -> tuple[tuple[int, ...], int]:
    """(positions in the global batch of the current forward's ``rows`` samples, the global
    batch's size) under the current key; outside a training step: (0..rows-1, rows)."""
    key = _current
    if key.samples is None:
        return tuple(range(rows)), rows
    if len(key.samples) != rows or key.batch is None:
        raise ValueError(f"the batch key names {len(key.samples)} samples of a global batch of "
                         f"{key.batch}, the forward has {rows}: set both (dropout_key)")
    return tuple(key.samples), key.batch


def shard_weight(rows: int) -> float:
    """The factor of a mean over the current forward's ``rows`` samples that makes DDP's
    average of the ranks' means the global batch's mean: this shard's share of the global
    batch x the ranks. 1 with equal shards (exactly), without DDP and outside a training
    step; else the shards of a batch that does not divide by the ranks weigh by their size."""
    if _current.samples is None or not dist.is_initialized():
        return 1.0
    samples, batch = batch_positions(rows)
    return len(samples) * dist.get_world_size() / batch


class KeyedDropout(nn.Module):
    """Drop-in for ``nn.Dropout`` (batch-first inputs) with keyed masks; ``site`` is set from
    the module's name by :func:`assign_dropout_sites` (``build_model`` calls it)."""

    def __init__(self, p: float):
        super().__init__()
        if not 0 <= p < 1:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p = p
        self.site = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        mask = keep_mask(x.shape, self.p, self.site, x.device)
        return x * mask.to(x.dtype) * (1.0 / (1.0 - self.p))

    def extra_repr(self) -> str:
        return f"p={self.p}, site={self.site:#010x}"


def assign_dropout_sites(model: nn.Module) -> nn.Module:
    """Give every dropout site of ``model`` a mask stream of its own (crc32 of its name)."""
    for name, module in model.named_modules():
        if isinstance(module, KeyedDropout):
            module.site = zlib.crc32(name.encode())
    return model
