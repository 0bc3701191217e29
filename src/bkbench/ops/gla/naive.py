"""Recurrent reference for gated linear attention: one position at a time, the oracle.

For each batch row and head, with a state S (K x V) that starts at zero:

    S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T,        o_t = scale * S_t^T q_t

``g_t <= 0`` is the log of the data-dependent decay alpha_t in (0, 1]^K of GLA (Yang et al.
2023, "Gated Linear Attention Transformers with Hardware-Efficient Training"). Readable and
slow (a Python loop over T); used only to check the chunkwise form and the fla kernels.
"""

from __future__ import annotations

import torch


def naive_recurrent_gla(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                        scale: float | None = None) -> torch.Tensor:
    """q, k, g: (B, T, H, K); v: (B, T, H, V) -> o: (B, T, H, V). ``scale`` default K**-0.5."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    if scale is None:
        scale = K ** -0.5
    state = q.new_zeros(B, H, K, V)
    outputs = []
    for t in range(T):
        decay = g[:, t].exp().unsqueeze(-1)                                # (B, H, K, 1)
        state = decay * state + k[:, t].unsqueeze(-1) * v[:, t].unsqueeze(-2)
        outputs.append(torch.einsum("bhk,bhkv->bhv", q[:, t] * scale, state))
    if not outputs:
        return v.new_zeros(B, 0, H, V)
    return torch.stack(outputs, dim=1)
