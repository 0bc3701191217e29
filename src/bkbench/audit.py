"""Causality audit: does any logit depend on a token that comes after it?

A language model's logits at position t may depend on tokens 0..t only (DESIGN.md section 1,
defect 1). The audit checks this by experiment, for any model mapping (B, T) token ids to
(B, T, V) logits: it feeds random sequences, changes the token at one position k at a time,
and measures the largest change of any logit at a position < k. For a causal model that change
is exactly zero, bit for bit, so the default threshold is 0.0.

Why zero and not "float rounding": both forwards run the same operations on tensors of the
same shapes, so every value at a position < k is computed from bit-identical inputs by the
same kernels in the same order. A causal model therefore reproduces those logits exactly; any
difference, however small, means some operation mixed in information from a later position
(possibly only through a shape- or value-dependent choice of kernel, which is still a
dependence on the future and worth knowing about).

The perturbations are batched: all changed sequences go through the model in one forward
per mode, and the unchanged sequences, repeated, in a second forward of exactly the same
shape, so every changed row is compared with its unchanged twin computed at the same row of a
same-shaped batch. Comparing against a base computed in a smaller batch would not do: the
kernels see other row counts (a (P*T, d) GEMM instead of (S*T, d)), CPU kernels are chosen by
shape, and the last bits could differ without any leak. In equal shapes the argument above
holds unchanged. (ResNet-BK's experts see row counts that depend on the routing of the whole
batch; their padding, see ``models/resnet_bk.py``, is what keeps a token's result independent
of them, batched or not, as it already had to between the sequences of one batch.)

For a :class:`~bkbench.models.common.LanguageModel` whose logits are
``lm_head(features(idx))`` (the base class's forward) with a finite ``nn.Linear`` head, the
audit compares the features and skips the head, which at a WikiText-2 vocabulary is nearly all
of a forward's work: a Linear maps each position on its own, and the two batches have the same
shape, so bit-identical features at positions < k give bit-identical logits there. Where the
features do differ, both sides go through the head (in equal shapes) and the leak is reported
in logits as before. The responsiveness check then asks whether the change reached the head's
input.

Both modes are checked. In train mode dropout is active, so the global RNG is reseeded to the
same value before the base forward and before every perturbed forward: dropout masks are drawn
for tensors of fixed shapes in a fixed order, so the masks match and the two forwards differ
only in the changed token. (A model that draws random numbers for tensors whose *size*
depends on the data would get different masks and fail the audit, which is then correct: its
earlier outputs really do depend on later tokens through the RNG stream.) The caller's RNG
state, the model's training flag and its buffers are restored afterwards.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Iterable, Sequence

import torch
import torch.nn as nn

from .models.common import LanguageModel

__all__ = ["CausalityAudit", "ModeAudit", "audit_causality", "format_audit", "default_positions"]


@dataclass
class ModeAudit:
    """Result of the audit in one mode ("eval" or "train")."""

    mode: str
    max_leak: float                 # largest |change| of a logit at a position < k
    worst_position: int | None      # the perturbed position k where max_leak was seen
    leak_by_position: dict[int, float]
    perturbations: int              # sequences x positions
    responsive: bool                # every perturbation changed some logit at a position >= k

    def to_dict(self) -> dict:
        d = asdict(self)
        d["leak_by_position"] = {str(k): v for k, v in self.leak_by_position.items()}
        return d


@dataclass
class CausalityAudit:
    """Outcome of :func:`audit_causality`.

    ``causal`` is True when, in every mode, no logit at a position before a changed token moved
    by more than ``threshold`` (0.0 by default: bit-for-bit equality) and all were finite.
    """

    causal: bool
    max_leak: float
    threshold: float
    seq_len: int
    num_sequences: int
    positions: list[int]
    seed: int
    modes: dict[str, ModeAudit] = field(default_factory=dict)

    @property
    def perturbations(self) -> int:
        return sum(m.perturbations for m in self.modes.values())

    def to_dict(self) -> dict:
        return {
            "causal": self.causal,
            "max_leak": self.max_leak,
            "threshold": self.threshold,
            "seq_len": self.seq_len,
            "num_sequences": self.num_sequences,
            "positions": list(self.positions),
            "seed": self.seed,
            "perturbations": self.perturbations,
            "modes": {name: m.to_dict() for name, m in self.modes.items()},
        }


def default_positions(seq_len: int) -> list[int]:
    """Positions to perturb: the second token, the last one, and quarters in between."""
    if seq_len < 2:
        raise ValueError("a causality audit needs sequences of at least 2 tokens")
    candidates = {1, seq_len // 4, seq_len // 2, (3 * seq_len) // 4, seq_len - 1}
    return sorted(p for p in candidates if 1 <= p < seq_len)


def _model_device(model: nn.Module) -> torch.device:
    for tensor in list(model.parameters()) + list(model.buffers()):
        return tensor.device
    return torch.device("cpu")


def _cuda_devices(device: torch.device) -> list[int]:
    if device.type == "cuda":
        return [device.index if device.index is not None else torch.cuda.current_device()]
    return []


def _leak(base: torch.Tensor, other: torch.Tensor) -> float:
    """Largest absolute difference; NaN if either side is not finite (a broken model)."""
    if base.numel() == 0:
        return 0.0
    if not (torch.isfinite(base).all() and torch.isfinite(other).all()):
        return math.nan
    if torch.equal(base, other):  # the causal case, without a float64 copy of the logits
        return 0.0
    return float((other.double() - base.double()).abs().max())


def _head_split(model: nn.Module) -> nn.Linear | None:
    """The LM head when the model's logits are ``lm_head(features(idx))`` with a finite Linear."""
    if not (isinstance(model, LanguageModel) and type(model).forward is LanguageModel.forward):
        return None
    head = getattr(model, "lm_head", None)
    if not isinstance(head, nn.Linear):
        return None
    if not all(bool(torch.isfinite(p).all()) for p in head.parameters()):
        return None  # let the logits themselves show the non-finite values
    return head


def _audit_mode(model: nn.Module, mode: str, seqs: torch.Tensor, perturbed: dict[int, torch.Tensor],
                forward_seed: int) -> ModeAudit:
    model.train(mode == "train")
    head = _head_split(model)
    net = model if head is None else model.features

    def forward(idx: torch.Tensor) -> torch.Tensor:
        # the same seed before every forward: identical dropout masks in train mode
        torch.manual_seed(forward_seed)
        return net(idx)

    positions = list(perturbed)
    n = seqs.shape[0]
    changed = torch.cat([perturbed[k] for k in positions])        # (P, T), P = n * positions
    # the unchanged twins, in a batch of the same shape (see the module docstring)
    base = forward(seqs.repeat(len(positions), 1))
    if base.shape[:2] != changed.shape:
        raise ValueError(f"model returned shape {tuple(base.shape)} for input "
                         f"{tuple(changed.shape)}; expected (batch, seq, vocab)")
    out = forward(changed)
    leaks: dict[int, float] = {}
    responsive = True
    for j, k in enumerate(positions):
        rows = slice(j * n, (j + 1) * n)
        before, after = base[rows, :k], out[rows, :k]
        leak = _leak(before, after)
        if head is not None and leak != 0.0:
            # the features moved (or are not finite): measure what that does to the logits,
            # both sides through the head in the same shape
            leak = _leak(head(before), head(after))
        leaks[k] = leak
        # sanity: the change must be visible somewhere from position k on, else the trial is vacuous
        if torch.equal(base[rows, k:], out[rows, k:]):
            responsive = False
    worst, max_leak = None, 0.0
    for k, value in leaks.items():
        if math.isnan(value):  # a non-finite logit: report it, nothing is larger
            worst, max_leak = k, value
            break
        if worst is None or value > max_leak:
            worst, max_leak = k, value
    return ModeAudit(mode=mode, max_leak=max_leak, worst_position=worst, leak_by_position=leaks,
                     perturbations=changed.shape[0], responsive=responsive)


def audit_causality(model: nn.Module, vocab_size: int, *, seq_len: int | None = None,
                    num_sequences: int = 2, positions: Sequence[int] | None = None, seed: int = 0,
                    modes: Iterable[str] = ("eval", "train"), device: torch.device | str | None = None,
                    threshold: float = 0.0) -> CausalityAudit:
    """Check by experiment that no logit depends on a later token.

    Draws ``num_sequences`` random sequences of ``seq_len`` tokens (default: the model's
    ``n_seq``), and for each position k in ``positions`` (default: :func:`default_positions`)
    replaces token k of every sequence by a different random token; the leak of that trial is
    the largest |change| of any logit at positions < k. The model is audited in each of
    ``modes`` ("eval", "train"; train mode with identically seeded dropout), under
    ``torch.no_grad()``. The model's mode, buffers and the global RNG state are restored.

    ``threshold`` is the largest leak still called causal; the default 0.0 demands bit-for-bit
    equality, which every causal model computed with fixed-shape operations achieves (see the
    module docstring). Raise it only with a reason you can state.
    """
    modes = tuple(modes)
    for mode in modes:
        if mode not in ("eval", "train"):
            raise ValueError(f"unknown audit mode {mode!r}; use 'eval' and/or 'train'")
    if not modes:
        raise ValueError("no audit mode given")
    if not isinstance(vocab_size, int) or vocab_size < 2:
        raise ValueError(f"vocab_size must be an integer >= 2 to change a token, got {vocab_size!r}")
    if not threshold >= 0:
        raise ValueError(f"threshold must be >= 0, got {threshold}")
    if seq_len is None:
        seq_len = getattr(model, "n_seq", None)
        if seq_len is None:
            raise ValueError("the model has no n_seq attribute: pass seq_len")
    seq_len = int(seq_len)
    positions = default_positions(seq_len) if positions is None else sorted(set(int(p) for p in positions))
    bad = [p for p in positions if not 1 <= p < seq_len]
    if bad:
        raise ValueError(f"positions {bad} out of range: a perturbed position needs an earlier "
                         f"position to check, so use 1 <= k < seq_len={seq_len}")
    if not positions:
        raise ValueError("no positions to perturb")
    device = _model_device(model) if device is None else torch.device(device)

    gen = torch.Generator().manual_seed(seed)
    seqs = torch.randint(0, vocab_size, (num_sequences, seq_len), generator=gen)
    perturbed: dict[int, torch.Tensor] = {}
    for k in positions:
        changed = seqs.clone()
        # adding 1..V-1 modulo V guarantees a different token
        offset = torch.randint(1, vocab_size, (num_sequences,), generator=gen)
        changed[:, k] = (changed[:, k] + offset) % vocab_size
        perturbed[k] = changed.to(device)
    seqs = seqs.to(device)
    forward_seed = seed + 1

    was_training = model.training
    saved_buffers = {name: buf.detach().clone() for name, buf in model.named_buffers()}
    results: dict[str, ModeAudit] = {}
    try:
        with torch.random.fork_rng(devices=_cuda_devices(device)), torch.no_grad():
            for mode in modes:
                results[mode] = _audit_mode(model, mode, seqs, perturbed, forward_seed)
                # train-mode forwards may update buffers (running statistics): undo that
                for name, buf in model.named_buffers():
                    buf.copy_(saved_buffers[name])
    finally:
        model.train(was_training)

    leaks = [r.max_leak for r in results.values()]
    max_leak = math.nan if any(math.isnan(x) for x in leaks) else max(leaks)
    causal = not math.isnan(max_leak) and max_leak <= threshold
    return CausalityAudit(causal=causal, max_leak=max_leak, threshold=threshold, seq_len=seq_len,
                          num_sequences=num_sequences, positions=list(positions), seed=seed,
                          modes=results)


def _fmt(x: float) -> str:
    return "0.0" if x == 0 else f"{x:.3g}"


def format_audit(audit: CausalityAudit) -> str:
    """One-line verdict, e.g. ``CAUSAL: max leak 0.0 over 20 perturbations at positions [...] (eval, train)``."""
    where = f"over {audit.perturbations} perturbations at positions {audit.positions}"
    modes = ", ".join(audit.modes)
    if audit.causal:
        line = f"CAUSAL: max leak {_fmt(audit.max_leak)} {where} ({modes})"
    else:
        if math.isnan(audit.max_leak):
            reason = "non-finite logits"
        else:
            reason = f"max leak {_fmt(audit.max_leak)} > threshold {_fmt(audit.threshold)}"
        per_mode = "; ".join(
            f"{m.mode}: {_fmt(m.max_leak)} when changing position {m.worst_position}"
            for m in audit.modes.values())
        line = f"NOT CAUSAL: {reason} {where} ({per_mode})"
    vacuous = [m.mode for m in audit.modes.values() if not m.responsive]
    if vacuous:
        line += (f" [warning: in {', '.join(vacuous)} mode some changed token moved no logit at "
                 "all, so those trials test nothing]")
    return line
