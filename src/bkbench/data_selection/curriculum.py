"""The curriculum's mechanism: difficulty scores of the training windows under an add-one n-gram
of the training split, and Platanios et al.'s square-root competence schedule.

The flag that paces the windows by them, and its documentation, is
:mod:`bkbench.flags.curriculum`.
"""

from __future__ import annotations

import math

import torch


def competence(step: int, c0: float, full_steps: float) -> float:
    """Platanios et al.'s square-root competence at 0-based ``step``."""
    return min(1.0, math.sqrt(step * (1 - c0 ** 2) / full_steps + c0 ** 2))


def difficulty_scores(train: torch.Tensor, n_seq: int, vocab_size: int,
                      kind: str = "bigram") -> torch.Tensor:
    """Mean NLL (nats per target) of each training window under an add-one n-gram of ``train``.

    Window i has targets ``train[i*n_seq + 1 : (i+1)*n_seq + 1]`` (as ``Trainer.batch``); the
    n-gram is fitted on ``train`` and nothing else is read.
    """
    train = train.long()
    num_windows = (train.numel() - 1) // n_seq
    used = train[:num_windows * n_seq + 1]
    targets = used[1:]
    unigram = torch.bincount(train, minlength=vocab_size).double()
    if kind == "unigram":
        nll = -torch.log((unigram[targets] + 1) / (unigram.sum() + vocab_size))
    elif kind == "bigram":
        prev, nxt = train[:-1], train[1:]
        # pair counts as a sorted table of pair ids: a V x V matrix would be 33k^2 entries
        pairs, counts = torch.unique(prev * vocab_size + nxt, return_counts=True)
        query = used[:-1] * vocab_size + targets
        pos = torch.searchsorted(pairs, query).clamp(max=pairs.numel() - 1)
        pair_count = torch.where(pairs[pos] == query, counts[pos], torch.zeros_like(query)).double()
        context = torch.bincount(prev, minlength=vocab_size).double()
        nll = -torch.log((pair_count + 1) / (context[used[:-1]] + vocab_size))
    else:
        raise ValueError(f"unknown difficulty score {kind!r}")
    return nll.view(num_windows, n_seq).mean(dim=1).float()
