"""Per-step values of a flag (its loss term, shares, ...) averaged per epoch, checkpointed."""

from __future__ import annotations

from typing import Any


class EpochMeter:
    """Sums of named per-step values (numbers or per-layer lists) and the steps added.

    ``end_epoch`` appends ``{"epoch", <name>: mean, ..., "steps"}`` to ``epochs`` and starts
    the next epoch's sums; ``means`` reads the running means without ending anything.
    """

    def __init__(self, **zeros: float | list[float]):
        self._zeros = {k: (list(v) if isinstance(v, list) else v) for k, v in zeros.items()}
        self.epochs: list[dict[str, Any]] = []
        self._reset()

    def _reset(self) -> None:
        self.sums = {k: (list(v) if isinstance(v, list) else v) for k, v in self._zeros.items()}
        self.steps = 0

    def add(self, **values: float | list[float]) -> None:
        for name, value in values.items():
            if isinstance(value, list):
                acc = self.sums[name]
                for i, v in enumerate(value):
                    acc[i] += v
            else:
                self.sums[name] += value
        self.steps += 1

    def means(self) -> dict[str, float | list[float]]:
        n = max(1, self.steps)
        return {k: ([x / n for x in v] if isinstance(v, list) else v / n)
                for k, v in self.sums.items()}

    def end_epoch(self, epoch: int, **extra: Any) -> dict[str, Any]:
        """Close 0-based ``epoch``: its means (and ``extra``) become an entry of ``epochs``."""
        entry = {"epoch": epoch + 1, **self.means(), "steps": self.steps, **extra}
        self.epochs.append(entry)
        self._reset()
        return entry

    def state_dict(self) -> dict[str, Any]:
        return {"sums": {k: (list(v) if isinstance(v, list) else v) for k, v in self.sums.items()},
                "steps": self.steps, "epochs": [dict(e) for e in self.epochs]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sums = {k: (list(v) if isinstance(v, list) else v) for k, v in state["sums"].items()}
        self.steps = int(state["steps"])
        self.epochs = [dict(e) for e in state["epochs"]]


__all__ = ["EpochMeter"]
