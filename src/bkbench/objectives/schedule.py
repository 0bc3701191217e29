"""The warm-up of an auxiliary loss weight, shared by the objectives' flags.

An auxiliary term that acts at full weight from step 1 shapes states that carry no learned
structure yet (the embeddings and blocks are at their initialisation), so its gradient mostly
pulls against the language-modelling loss before that loss has formed the states the term is
meant to regularise. The ramp lets the LM loss lead and the term join it.
"""

from __future__ import annotations

import math


def warmup_steps(total_steps: int, warmup: float) -> int:
    """Steps of the ramp: ceil(warmup x total_steps) (0: none)."""
    return math.ceil(round(warmup * total_steps, 9)) if warmup > 0 else 0


def warmed_weight(weight: float, step: int, ramp_steps: int) -> float:
    """``weight`` x min(1, (step + 1) / ramp_steps) at 0-based ``step`` (linear from
    weight / ramp_steps at the first step to ``weight`` at step ramp_steps - 1 and after)."""
    if ramp_steps <= 0:
        return weight
    return weight * min(1.0, (step + 1) / ramp_steps)
