"""Held-out evaluation: every target token of a split scored exactly once.

The split ``tokens`` is a 1-D stream. A leading beginning-of-sequence token is placed before
it so that the split's first token is a target too; the default is the split's own last token,
which for WikiText is ``<eos>`` (every line ends with one; for the byte tokenizer it is the
newline), i.e. the first token is predicted as if it followed a line break.

Without ``stride`` the stream is cut into consecutive windows of ``seq_len`` inputs, each
target scored with the context inside its window. With ``stride = s`` a window advances by
``s`` targets and scores only its last ``s`` positions, so each target is still scored once,
with up to ``seq_len - s`` extra tokens of left context.

Under ``torch.distributed`` the windows are sharded across ranks and the sums all-reduced,
so every rank returns the same numbers as a single process.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from .ops.lm_loss.head import Head


@dataclass(frozen=True)
class EvalResult:
    loss: float            # mean NLL in nats per target token
    num_tokens: int        # number of target tokens scored (= the split's token count)
    total_nll: float       # summed NLL in nats
    seq_len: int
    stride: int | None

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss)

    @property
    def bits_per_token(self) -> float:
        return self.loss / math.log(2)

    def to_dict(self) -> dict:
        return {**asdict(self), "perplexity": self.perplexity, "bits_per_token": self.bits_per_token}


def _windows(num_targets: int, seq_len: int, stride: int) -> list[tuple[int, int, int]]:
    """(input_start, input_end, first_scored) over the bos-prefixed stream.

    Position j of the prefixed stream predicts target j (the split's token j); a window
    [start, end) scores targets first_scored..end-1.
    """
    windows = []
    scored_until = 0
    while scored_until < num_targets:
        end = min(scored_until + stride, num_targets)
        start = max(0, scored_until - (seq_len - stride))
        windows.append((start, end, scored_until))
        scored_until = end
    return windows


def fused_head(model: nn.Module) -> Head | None:
    """The model's LM head as the fused loss takes it (``effective_head()``, the head protocol
    of :mod:`bkbench.ops.lm_loss.head`), or None for a model that only returns logits."""
    effective_head = getattr(model, "effective_head", None)
    return effective_head() if callable(effective_head) else None


def target_nll(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor,
               reduction: str = "sum", *, call: nn.Module | None = None,
               with_rows: bool = False):
    """NLL of ``targets`` (summed, or per target with ``reduction="none"``) in float32.

    A bkbench language model runs its LM head fused with the NLL, chunk by chunk
    (:mod:`bkbench.ops.lm_loss`: the logits never exist in full); any other module's logits go
    through ``F.cross_entropy``. ``call``: the module to run (e.g. a DDP wrapper of ``model``).
    ``with_rows`` (``reduction="sum"``): ``(summed NLL, per-target NLL without gradient)``.
    """
    call = model if call is None else call
    head = fused_head(model)
    if head is not None:
        features = call(inputs, return_features=True)
        return head.nll(features, targets, reduction=reduction, with_rows=with_rows)
    logits = call(inputs)
    flat = (logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))
    if with_rows:
        rows = F.cross_entropy(*flat, reduction="none")
        return rows.sum(), rows.detach().view(targets.shape)
    nll = F.cross_entropy(*flat, reduction=reduction)
    return nll.view(targets.shape) if reduction == "none" else nll


@torch.no_grad()
def evaluate(model: nn.Module, tokens: torch.Tensor, seq_len: int, batch_size: int,
             stride: int | None = None, *, bos_id: int | None = None,
             device: torch.device | str | None = None, autocast_dtype: torch.dtype | None = None,
             progress: bool = False) -> EvalResult:
    """Mean NLL, perplexity and bits per token of ``model`` on the whole ``tokens`` stream.

    The model is put in eval mode for the call and its previous mode restored afterwards.
    """
    if tokens.dim() != 1 or tokens.numel() == 0:
        raise ValueError(f"tokens must be a non-empty 1-D tensor, got shape {tuple(tokens.shape)}")
    if seq_len < 1 or batch_size < 1:
        raise ValueError(f"seq_len and batch_size must be positive, got {seq_len}, {batch_size}")
    stride = seq_len if stride is None else stride
    if not 1 <= stride <= seq_len:
        raise ValueError(f"stride must be in [1, seq_len={seq_len}], got {stride}")
    if device is None:
        device = next(model.parameters()).device
    bos = tokens[-1].item() if bos_id is None else bos_id
    stream = torch.cat([tokens.new_tensor([bos]), tokens]).to(device)
    num_targets = tokens.numel()

    windows = _windows(num_targets, seq_len, stride)
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    windows = windows[rank::world]

    # batch windows of equal length together (all but the first few and the last are full)
    groups: dict[int, list[tuple[int, int, int]]] = {}
    for w in windows:
        groups.setdefault(w[1] - w[0], []).append(w)

    was_training = model.training
    model.eval()
    total_nll = torch.zeros((), dtype=torch.float64, device=device)
    total_count = torch.zeros((), dtype=torch.int64, device=device)
    batches = [(length, ws[i:i + batch_size]) for length, ws in groups.items()
               for i in range(0, len(ws), batch_size)]
    if progress:
        from tqdm.auto import tqdm
        batches = tqdm(batches, desc="eval", leave=False)
    try:
        for length, batch in batches:
            starts = torch.tensor([w[0] for w in batch], device=device)
            offsets = torch.arange(length + 1, device=device)
            chunk = stream[starts[:, None] + offsets]          # (b, length + 1)
            inputs, targets = chunk[:, :-1], chunk[:, 1:]
            with torch.autocast(device_type=torch.device(device).type, dtype=autocast_dtype,
                                enabled=autocast_dtype is not None):
                nll = target_nll(model, inputs, targets, reduction="none")
            # score only positions at or after each window's first scored target
            first = torch.tensor([w[2] - w[0] for w in batch], device=device)
            mask = torch.arange(length, device=device)[None, :] >= first[:, None]
            total_nll += nll[mask].double().sum()
            total_count += mask.sum()
    finally:
        model.train(was_training)

    if world > 1:
        dist.all_reduce(total_nll)
        dist.all_reduce(total_count)
    count = int(total_count.item())
    if count != num_targets:
        raise RuntimeError(f"evaluation scored {count} targets, expected {num_targets}: a bug")
    nll_sum = float(total_nll.item())
    if not math.isfinite(nll_sum):
        raise FloatingPointError("evaluation loss is not finite (NaN or Inf in the model's logits)")
    return EvalResult(loss=nll_sum / count, num_tokens=count, total_nll=nll_sum,
                      seq_len=seq_len, stride=None if stride == seq_len else stride)


def bits_per_byte(total_nll: float, num_bytes: int) -> float | None:
    """Summed NLL (nats) of a split per byte of its UTF-8 text, in bits: the one unit in which
    word, BPE and byte runs of the same text can be compared (None for an empty split)."""
    return total_nll / math.log(2) / num_bytes if num_bytes else None


def word_perplexity(total_nll: float, num_words: int | None) -> float | None:
    """Perplexity per word of the published convention (words + one ``<eos>`` per line) from a
    split's summed NLL under any tokenizer: how subword and byte runs are put beside word-level
    ones (None where the split's words are not counted)."""
    return math.exp(total_nll / num_words) if num_words else None
