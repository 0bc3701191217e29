"""Chunkwise-parallel gated linear attention in plain PyTorch (CPU and GPU).

The sequence is cut into chunks of C positions. With b the cumulative log-decay inside a
chunk (b_i = g_1 + ... + g_i, so b_j - b_i <= 0 for j >= i), the output at position i of
chunk n is

    o_i = scale * [ sum_{j <= i in chunk} (q_i . (k_j * exp(b_i - b_j))) v_j      (intra)
                    + (q_i * exp(b_i))^T S_n ]                                      (inter)

where S_n is the state entering chunk n,

    S_0 = 0,   S_{n+1} = diag(exp(b_C)) S_n + (k * exp(b_C - b))^T v             (chunk n)

The inter-chunk terms and the state updates are matrix products of C x K x V tiles, batched
over all chunks; only the K x V state is carried from chunk to chunk. Every exponent is a
difference b_i - b_j with j <= i, so it is <= 0 and nothing can overflow, whatever the gates.
The intra-chunk scores are computed from those differences elementwise (a C x C x K product),
as GLA's kernels do for their diagonal tiles: the factorised matmul (q*exp(b)) (k*exp(-b))^T
would need exp(-b), which overflows for strong decay. The counter cannot see that product,
so it passes through :func:`score_marker`, which charges it as the C x K x C matmul it equals.

Causality is exact, not approximate: scores of later positions are exp(-inf) = 0 before they
multiply anything, the state entering a chunk depends on earlier chunks only, and every tensor
has a shape fixed by (B, T, H, K, V, C), so no kernel choice depends on later tokens.
A length that is not a multiple of C is padded at the end with zero keys, values and gates;
padding after the last position cannot reach it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .flops import score_marker


def chunk_gla(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
              scale: float | None = None, chunk_size: int = 16) -> torch.Tensor:
    """q, k, g: (B, T, H, K); v: (B, T, H, V) -> o: (B, T, H, V); see the module docstring."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    C = chunk_size
    if scale is None:
        scale = K ** -0.5
    pad = -T % C
    if pad:  # zero keys/values and zero log-decay (alpha = 1) after the end
        q, k, v, g = (F.pad(x, (0, 0, 0, 0, 0, pad)) for x in (q, k, v, g))
    N = (T + pad) // C

    def chunks(x: torch.Tensor) -> torch.Tensor:  # (B, T, H, D) -> (B, H, N, C, D)
        return x.reshape(B, N, C, H, x.shape[-1]).permute(0, 3, 1, 2, 4)

    q, k, v, g = chunks(q) * scale, chunks(k), chunks(v), chunks(g)
    b = g.cumsum(dim=-2)                                          # (B, H, N, C, K)
    b_last = b[..., -1:, :]                                       # (B, H, N, 1, K)

    # intra-chunk scores A_ij = q_i . (k_j * exp(b_i - b_j)) for j <= i, else exactly 0
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    diff = (b.unsqueeze(-2) - b.unsqueeze(-3)).masked_fill(~causal.unsqueeze(-1), float("-inf"))
    scores = (q.unsqueeze(-2) * k.unsqueeze(-3) * diff.exp()).sum(-1)   # (B, H, N, C, C)
    scores = score_marker(scores, K)
    out = scores @ v

    if N > 1:
        # S_1 .. S_{N-1}, the states entering chunks 1 .. N-1 (S_0 = 0 contributes nothing)
        head = slice(None, -1)
        delta = (k[:, :, head] * (b_last[:, :, head] - b[:, :, head]).exp()).transpose(-1, -2) \
            @ v[:, :, head]                                       # (B, H, N-1, K, V)
        decay = b_last[:, :, head].squeeze(-2).exp().unsqueeze(-1)   # (B, H, N-1, K, 1)
        states = [delta[:, :, 0]]
        for n in range(1, N - 1):
            states.append(decay[:, :, n] * states[-1] + delta[:, :, n])
        entering = torch.stack(states, dim=2)                     # (B, H, N-1, K, V)
        inter = (q[:, :, 1:] * b[:, :, 1:].exp()) @ entering
        out = torch.cat([out[:, :, :1], out[:, :, 1:] + inter], dim=2)

    out = out.permute(0, 2, 3, 1, 4).reshape(B, N * C, H, V)
    return out[:, :T]
