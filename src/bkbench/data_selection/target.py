"""Time to a target validation perplexity: the measure by which a data-side flag pays off.

A data-selection flag does not change the model; what it can change is how fast training gets
to a given held-out quality. Validation runs once per epoch, so the time to target is known at
epoch granularity: the first epoch whose validation perplexity is at or below the target, with
the steps, target tokens and training seconds (``epoch_times``, evaluation excluded, selection
passes included) spent up to the end of that epoch. ``None`` where the target was never reached.

Which target: the report compares a flagged run with the baseline run of the same
architecture in the same output directory and uses that baseline's best validation perplexity
(what the flag must match). Without a baseline, the flag's ``target_perplexity`` setting is
used; with neither, no time to target is claimed.
"""

from __future__ import annotations

from typing import Any, Sequence


def validation_curve(epoch_perplexities: Sequence[float], epoch_times: Sequence[float],
                     steps_per_epoch: int, total_steps: int, tokens_per_step: int) -> list[dict[str, Any]]:
    """Per epoch: cumulative steps, tokens and training seconds at its end, and its valid ppl."""
    out, seconds = [], 0.0
    for e, (ppl, t) in enumerate(zip(epoch_perplexities, epoch_times)):
        seconds += t
        steps = min((e + 1) * steps_per_epoch, total_steps)
        out.append({"epoch": e + 1, "steps": steps, "tokens": steps * tokens_per_step,
                    "seconds": seconds, "valid_perplexity": ppl})
    return out


def time_to_target(curve: Sequence[dict[str, Any]], target: float | None) -> dict[str, Any] | None:
    """The first point of ``curve`` at or below ``target``: {target, reached, epoch, steps,
    tokens, seconds}; ``reached`` False (and the rest None) if no epoch got there."""
    if target is None or not target > 0:
        return None
    for point in curve:
        if point["valid_perplexity"] <= target:
            return {"target": target, "reached": True,
                    **{k: point[k] for k in ("epoch", "steps", "tokens", "seconds")}}
    return {"target": target, "reached": False, "epoch": None, "steps": None, "tokens": None,
            "seconds": None}


def curve_of(outcome: Any, steps_per_epoch: int, tokens_per_step: int) -> list[dict[str, Any]]:
    """The validation curve of a finished training run (its ``TrainOutcome``)."""
    return validation_curve(outcome.epoch_perplexities, outcome.epoch_times, steps_per_epoch,
                            outcome.steps, tokens_per_step)
