"""The hidden states along depth, h_0 (the first block's input) .. h_L (the last block's output).

Both auxiliary objectives act on the layer-to-layer dynamics h_l -> h_{l+1} of the residual
stream at each position. Forward hooks on the model's ``blocks`` keep the states of the last
forward (references to tensors autograd keeps anyway in training); nothing in the forward's
arithmetic changes.

Blocks that run on fewer positions (a shortened stage, e.g. ``use_multi_scale``'s hourglass)
are read at full resolution, as the stage that runs them says (``models/layers/stages.py``),
so that h_l and h_{l+1} are the states of one token.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..models.layers.stages import stage_of_layers


class LayerStates:
    def __init__(self, model: nn.Module, flag: str):
        blocks = getattr(model, "blocks", None)
        if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
            raise ValueError(f"{flag} needs a model with a ModuleList of blocks")
        self.states: list[torch.Tensor] = []
        self.model = model
        blocks[0].register_forward_pre_hook(self._start)
        for block in blocks:
            block.register_forward_hook(self._add)

    def __deepcopy__(self, memo) -> "LayerStates":
        # a copied model (e.g. the integer evaluation model) records into its own, empty list
        copied = object.__new__(LayerStates)
        copied.states = []
        copied.model = memo.get(id(self.model), self.model)
        return copied

    def _start(self, module, args) -> None:
        self.states = [args[0]]

    def _add(self, module, args, output) -> None:
        self.states.append(output)

    def _stages(self) -> list:
        """The stage that runs each block (only a block whose state is shorter than the
        sequence needs one; a model without stages has none)."""
        stages = getattr(self.model, "stages", None)
        return stage_of_layers(stages) if stages is not None else []

    def stacked(self) -> torch.Tensor:
        """(L + 1, B, T, d) states of the last forward, float32; a shortened block's state
        upsampled, each position standing for the ones it is upsampled to."""
        if not self.states:
            raise RuntimeError("no forward has run since the hooks were installed")
        length = self.states[0].shape[1]
        stages = self._stages()
        full = [self.states[0]] + [s if s.shape[1] == length else stages[n].upsampled(s, length)
                                   for n, s in enumerate(self.states[1:])]
        return torch.stack([s.float() for s in full])

    def full_resolution(self) -> list[torch.Tensor]:
        """The L + 1 states of the last forward at full resolution, in their own dtype: each
        as the next block sees it (a shortened block's state upsampled and added to the state
        that entered its stage: for the stage's last block, exactly the next block's input)."""
        length, stages = self.states[0].shape[1], self._stages()
        return [self.states[0]] + [
            s if s.shape[1] == length
            else stages[n].resolved(s, self.states[stages[n].layers.start], length)
            for n, s in enumerate(self.states[1:])]


def held_out_windows(split: torch.Tensor, seq_len: int, count: int) -> torch.Tensor:
    """The first ``count`` whole windows of ``seq_len`` tokens of a held-out split, (n, T)."""
    n = min(count, split.numel() // seq_len)
    if n < 1:
        raise ValueError(f"held-out split of {split.numel()} tokens has no window of {seq_len}")
    return split[: n * seq_len].view(n, seq_len)
