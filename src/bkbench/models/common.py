"""What every benchmarked language model shares: input checks and cost accounting by component."""

from __future__ import annotations

import torch
import torch.nn as nn

from ..ops.lm_loss.head import Head, head_of


class LanguageModel(nn.Module):
    """Base class: ``forward(idx)`` maps (B, T) token ids to (B, T, V) logits.

    Subclasses implement ``features(idx)`` (the final normalized hidden states) and own an
    ``lm_head`` Linear, so ``forward`` is ``lm_head(features(idx))``. They set ``n_seq`` and
    ``COMPONENTS`` (component -> module-name prefixes inside the model, matched against each
    dotted name's parts) so that parameters and measured FLOPs can be attributed to
    embedding / mixer / feed_forward / lm_head.
    """

    COMPONENTS: dict[str, tuple[str, ...]] = {}
    n_seq: int

    @staticmethod
    def init_weights(module: nn.Module) -> None:
        """GPT-2's initialisation: N(0, 0.02) for Linear and Embedding weights, zero biases
        (``self.apply(self.init_weights)``; other modules keep their own)."""
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)

    def check_input(self, idx: torch.Tensor) -> int:
        if idx.dim() != 2:
            raise ValueError(f"expected token ids of shape (batch, seq), got {tuple(idx.shape)}")
        if idx.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"token ids must be an integer tensor, got {idx.dtype}")
        T = idx.shape[1]
        if T > self.n_seq:
            raise ValueError(f"sequence length {T} exceeds the model's n_seq={self.n_seq}")
        return T

    def features(self, idx: torch.Tensor) -> torch.Tensor:
        """(B, T) token ids -> (B, T, d) final hidden states, the LM head's input."""
        raise NotImplementedError

    def forward(self, idx: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        """Logits (B, T, V); with ``return_features`` the LM head's input (B, T, d) instead,
        for a loss that fuses the head with the cross-entropy (``bkbench.ops.lm_loss``). A
        keyword of ``forward`` rather than a call of ``features`` so that it also works through
        a DistributedDataParallel wrapper, which only hooks ``forward``."""
        h = self.features(idx)
        return h if return_features else self.lm_head(h)

    def effective_head(self) -> Head | None:
        """The LM head the fused loss applies to ``forward(idx, return_features=True)``
        (weight, bias, input transform: ``bkbench.ops.lm_loss.head``), or None when the logits
        are not a linear map of those features (a subclass with its own forward, or a head
        module that is not linear), so that the loss must run the model to its logits."""
        if getattr(self.forward, "__func__", None) is not LanguageModel.forward:
            return None
        return head_of(self.lm_head)

    def auxiliary_loss(self, sum_over_ranks=None, world: int = 1) -> torch.Tensor | None:
        """Extra training loss produced by the last forward pass (None if the model has none).
        Under DDP the trainer passes ``sum_over_ranks`` and ``world`` so that a loss made of
        batch statistics is that of the global batch (see ResNetBKLM.auxiliary_loss)."""
        return None

    def component_of(self, name: str) -> str:
        """The cost component a parameter or module (dotted name) belongs to."""
        parts = name.split(".")
        for component, prefixes in self.COMPONENTS.items():
            if any(p in parts for p in prefixes):
                return component
        return "other"

    def num_parameters(self) -> int:
        """Number of distinct parameters (a tied weight is counted once)."""
        return sum(p.numel() for p in self.parameters())

    def parameter_breakdown(self) -> dict[str, int]:
        """Parameters per component; tied weights are counted once, under their first name."""
        counts = {c: 0 for c in self.COMPONENTS}
        for name, p in self.named_parameters():  # named_parameters() yields a shared tensor once
            component = self.component_of(name)
            counts[component] = counts.get(component, 0) + p.numel()
        return counts
