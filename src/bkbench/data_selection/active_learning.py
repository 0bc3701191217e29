"""Active learning's mechanism: the latest known loss of every training window, and the
top-loss choice of training windows from a candidate pool.

The flag that draws the pools, keeps the table up to date from the training steps' own
forwards and feeds the chosen windows, and its documentation, is
:mod:`bkbench.flags.active_learning`.
"""

from __future__ import annotations

import torch


class LatestLosses:
    """The latest mean NLL measured for each training window, and the step that measured it.

    A window never trained on has no loss yet: its priority is +inf, so that it is chosen
    before any window whose loss is known (every window gets measured once, as the epoch
    order of the plain trainer would; after that the highest latest losses lead).
    """

    def __init__(self, num_windows: int):
        self.loss = torch.full((num_windows,), float("nan"), dtype=torch.float64)
        self.step = torch.full((num_windows,), -1, dtype=torch.long)

    def update(self, windows: torch.Tensor, losses: torch.Tensor, step: int) -> None:
        self.loss[windows] = losses.detach().double().cpu()
        self.step[windows] = step

    def priority(self, windows: torch.Tensor) -> torch.Tensor:
        loss = self.loss[windows]
        return torch.where(torch.isnan(loss), torch.full_like(loss, float("inf")), loss)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"loss": self.loss.clone(), "step": self.step.clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.loss, self.step = state["loss"].clone(), state["step"].clone()


def top_loss_selection(losses: torch.Tensor, want: int, random_share: float,
                       generator: torch.Generator) -> torch.Tensor:
    """Indices of ``want`` pool entries: the highest ``losses``, except ``random_share`` of
    the slots drawn uniformly from the rest; shuffled (seeded by ``generator``)."""
    n_random = round(random_share * want)
    # stable sort, descending: ties keep pool order, so the choice is reproducible
    ranked = torch.sort(losses, descending=True, stable=True).indices
    top, rest = ranked[:want - n_random], ranked[want - n_random:]
    extra = rest[torch.randperm(rest.numel(), generator=generator)[:n_random]]
    chosen = torch.cat([top, extra])
    return chosen[torch.randperm(chosen.numel(), generator=generator)]
