"""The hidden states along depth, h_0 (the first block's input) .. h_L (the last block's output).

Both auxiliary objectives act on the layer-to-layer dynamics h_l -> h_{l+1} of the residual
stream at each position. Forward hooks on the model's ``blocks`` keep the states of the last
forward (references to tensors autograd keeps anyway in training); nothing in the forward's
arithmetic changes.

Blocks that run on fewer positions (the middle blocks of ``use_multi_scale``'s hourglass) are
read at full resolution, each pooled state standing for the positions it is upsampled to
(the model's ``stack.upsample_state``), so that h_l and h_{l+1} are the states of one token.
The full-resolution state that enters the shortened middle is read from the stack's input:
with ``multi_scale_outer_layers = 0`` the first block's input is already pooled.
"""

from __future__ import annotations

import torch
import torch.nn as nn


class LayerStates:
    def __init__(self, model: nn.Module, flag: str):
        blocks = getattr(model, "blocks", None)
        if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
            raise ValueError(f"{flag} needs a model with a ModuleList of blocks")
        self.states: list[torch.Tensor] = []
        self.model = model
        self.entry: torch.Tensor | None = None   # the hourglass stack's input of the last forward
        self._hooked_stack: nn.Module | None = None
        model.register_forward_pre_hook(self._watch_stack)
        blocks[0].register_forward_pre_hook(self._start)
        for block in blocks:
            block.register_forward_hook(self._add)

    def __deepcopy__(self, memo) -> "LayerStates":
        # a copied model (e.g. the integer evaluation model) records into its own, empty list
        copied = object.__new__(LayerStates)
        copied.states = []
        copied.model = memo.get(id(self.model), self.model)
        copied.entry = copied._hooked_stack = None
        return copied

    def _watch_stack(self, module, args) -> None:
        # the hourglass is installed by another flag, possibly after these hooks
        self.entry = None   # a forward without the stack (without_hourglass) sets none
        stack = getattr(self.model, "stack", None)
        if stack is not None and stack is not self._hooked_stack:
            stack.register_forward_pre_hook(self._enter_stack)
            self._hooked_stack = stack

    def _enter_stack(self, stack, args) -> None:
        self.entry = args[1]    # stack(blocks, x): x at full resolution

    def _full_entry(self) -> torch.Tensor:
        """The full-resolution state entering the blocks' middle (the first state without one)."""
        stack = getattr(self.model, "stack", None)
        return self.entry if stack is not None and self.entry is not None else self.states[0]

    def _start(self, module, args) -> None:
        self.states = [args[0]]

    def _add(self, module, args, output) -> None:
        self.states.append(output)

    def stacked(self) -> torch.Tensor:
        """(L + 1, B, T, d) states of the last forward, float32."""
        if not self.states:
            raise RuntimeError("no forward has run since the hooks were installed")
        entry = self._full_entry()
        length = entry.shape[1]
        stack = getattr(self.model, "stack", None)
        full = [s if s.shape[1] == length else entry if i == 0 else stack.upsample_state(s, length)
                for i, s in enumerate(self.states)]
        return torch.stack([s.float() for s in full])


    def full_resolution(self) -> list[torch.Tensor]:
        """The L + 1 states of the last forward at full resolution, in their own dtype. A
        middle block's pooled state is upsampled and added to the state that entered the
        shortened middle: for the last middle block that is exactly what the next block gets."""
        entry = self._full_entry()
        length = entry.shape[1]
        stack = getattr(self.model, "stack", None)
        return [s if s.shape[1] == length else entry if i == 0
                else entry + stack.upsample_state(s, length)
                for i, s in enumerate(self.states)]


def held_out_windows(split: torch.Tensor, seq_len: int, count: int) -> torch.Tensor:
    """The first ``count`` whole windows of ``seq_len`` tokens of a held-out split, (n, T)."""
    n = min(count, split.numel() // seq_len)
    if n < 1:
        raise ValueError(f"held-out split of {split.numel()} tokens has no window of {seq_len}")
    return split[: n * seq_len].view(n, seq_len)
