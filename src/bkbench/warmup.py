"""One-time set-up paid before a run's memory baseline, not inside it.

The first call of a code path costs memory that has nothing to do with the model: imports
(the BK-Core's custom ops pull in hundreds of modules on first use), numba loading and
compiling its kernels, the optimizer's foreach kernels. Charged to a run, that set-up made
ResNet-BK's peak memory look ~100 MiB larger than it is. :func:`warm_up` runs every path a
training run takes -- a training step with the run's optimizer and gradient clipping, then
an evaluation -- once on a throwaway model of the same architecture and flags but a tiny
vocabulary, so that the run's baseline is taken after all of it.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .config import BenchmarkConfig
from .eval import evaluate, target_nll
from .train import make_optimizer

__all__ = ["warm_up", "WARM_UP_VOCAB"]

#: vocabulary of the throwaway model: the LM head and embedding stay small
WARM_UP_VOCAB = 16


def warm_up(model: nn.Module, config: BenchmarkConfig, device: torch.device | str) -> None:
    """One training step (loss, auxiliary loss, backward, clipping, the run's AdamW) and one
    evaluation of ``model``, a throwaway of the run's architecture (its weights change).

    It draws random numbers (tokens, dropout): seed the run's RNGs after it, as the
    benchmark does when it builds the run's model.
    """
    device = torch.device(device)
    model.to(device).train()
    idx = torch.randint(0, WARM_UP_VOCAB, (2, config.n_seq + 1)).to(device)
    optimizer = make_optimizer(model, config)
    # the loss as training computes it (the fused LM head + NLL where the model allows it)
    loss = target_nll(model, idx[:, :-1], idx[:, 1:]) / idx[:, 1:].numel()
    aux = model.auxiliary_loss() if hasattr(model, "auxiliary_loss") else None
    if aux is not None:
        loss = loss + aux
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
    optimizer.step()
    evaluate(model, idx.reshape(-1), config.n_seq, 2, device=device)
