"""ResNet-BK language model: a mixture-of-experts feed-forward plus the O(N) BK-Core mixer.

Token + position embeddings -> n_layers pre-LayerNorm residual blocks x + Layer(LN(x)) ->
LayerNorm -> LM head. Each block's layer (docs/models.md):

1. ``f = MoE(h)``: num_experts GELU experts d -> 2d -> d; each token goes to the top_k experts
   of a linear gate, each weighted by its probability under the softmax over all gate logits
   (Switch Transformer), renormalized over the chosen k when k > 1. Routing has no noise, so
   it is a deterministic function of the token's own hidden state in both modes.
2. per BK head k (K = bk_heads): a potential ``v_k = v_max * tanh(proj(f)_k / v_max)``, the
   chain of the sequence's positions;
3. the BK-Core ``g = resolvent_diag(v, h0, t_k, energy=E_k, eps=eps_k)`` (causal by default:
   g at position i depends on positions <= i only), each head with its own learnable coupling
   t_k and shift z_k = E_k + i*eps_k, eps_k = softplus(raw_k) > 0;
4. ``out = f + bk_scale * Linear(2K, d)([Re g_1..K, Im g_1..K])``.

The blocks run as a list of stages (``models/layers/stages.py``): one per block, unless a
structural flag runs some differently (``use_multi_scale``'s shortened middle). Flags that let
tokens stop computing before the last layer (``use_act``, ``use_early_exit``) install *depth
policies* on ``depth_policies``; the stages then run through ``models/layers/depth.py``, which
runs the feed-forward on the still-running tokens' gathered rows only and keeps every position
in the BK chain. A block runs every token, and a BK mixer's chain is every position, unless a
router (``use_sparse_bk``) chooses which tokens run the block or are sites of the chain.

``bk_mode="bidirectional"`` uses the full-chain resolvent of the published model; it sees the
future, is not a valid language model, and exists to be studied (the causality audit fails it).

Two details keep the causal model causal *bit for bit* (``bkbench.audit``), not just in exact
arithmetic:

* each expert runs on the tokens routed to it only (one contiguous slice of the tokens sorted
  by expert, see MoEFeedForward), so the row count of its matmuls depends on the routing of every token in the batch, later ones
  included. CPU GEMMs pick their kernel by shape, and for small row counts (measured: fewer
  than 12 rows, not a multiple of 4) a row's result then changes in the last bits with the
  row count. Each expert's batch is therefore padded with zero rows to a multiple of
  ``EXPERT_ROW_MULTIPLE``: its kernels see row counts from the regime where a row's result
  does not depend on the others. The padding costs at most 15 rows per expert and layer, and
  the FLOP counter sees it (it is work done).
* dropout is applied only to tensors of a fixed shape (the embeddings, each layer's output),
  never inside an expert, so the RNG stream - and every dropout mask - does not depend on the
  routing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops.bk_core import resolvent_diag
from .common import LanguageModel
from .dropout import KeyedDropout
from .layers.depth import TokenSkip, run_stack
from .layers.stages import plain_stages

# Rows of each expert's batch are padded to a multiple of this (see the module docstring).
EXPERT_ROW_MULTIPLE = 16


@dataclass
class ResNetBKConfig:
    """ResNet-BK model configuration (the BenchmarkConfig fields of the same names feed it).

    Initialization: every Linear and Embedding weight ~ N(0, 0.02), biases 0, as in the
    Transformer baseline; t = bk_t, E = bk_energy and eps = bk_eps for every head (the
    published h0 = -2, t = 1, z = i by default; heads differ through their rows of the v
    projection). ``bk_scale_init = 1.0`` makes bk_scale a per-channel gain that starts as the
    identity: the small-initialized Linear(2K, d) already sets the initial size of the BK term,
    and starting the gain near 0 as well would make the term a product of two small factors,
    each receiving a gradient proportional to the other, so both would learn slowly.
    """

    vocab_size: int
    d_model: int = 64
    n_layers: int = 4
    n_seq: int = 128
    dropout: float = 0.1
    tie_weights: bool = False
    num_experts: int = 4
    top_k: int = 1
    moe_balance_weight: float = 0.01   # Switch-style load-balancing loss weight (0: off)
    bk_heads: int = 1                  # K BK-Core heads per layer (the published model: 1)
    bk_mode: str = "causal"            # "causal" or "bidirectional" (not a valid LM)
    v_max: float = 3.0                 # bound of the potential, v = v_max*tanh(u/v_max)
    bk_h0: float = -2.0                # free diagonal h0 (fixed)
    bk_t: float = 1.0                  # initial coupling t (learnable per head)
    bk_energy: float = 0.0             # initial E of z = E + i*eps (learnable per head)
    bk_eps: float = 1.0                # initial eps > 0 (learnable per head, via softplus)
    bk_scale_init: float = 1.0         # initial per-channel gain on the BK features
    analytic_gradient: bool = False    # BK-Core backward by the exact adjoint sweep

    def __post_init__(self) -> None:
        if self.bk_mode not in ("causal", "bidirectional"):
            raise ValueError(f"bk_mode must be 'causal' or 'bidirectional', got {self.bk_mode!r}")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"top_k ({self.top_k}) must be between 1 and num_experts "
                             f"({self.num_experts})")
        if self.bk_heads < 1:
            raise ValueError(f"bk_heads must be >= 1, got {self.bk_heads}")
        if not self.bk_eps > 0:
            raise ValueError(f"bk_eps must be > 0 (|g| <= 1/eps), got {self.bk_eps}")
        if not self.v_max > 0:
            raise ValueError(f"v_max must be > 0, got {self.v_max}")
        if self.moe_balance_weight < 0:
            raise ValueError(f"moe_balance_weight must be >= 0, got {self.moe_balance_weight}")


def inverse_softplus(y: float) -> float:
    """A float32 x with softplus(x) == float32(y) exactly, when one is within 3 ulps of the
    rounded solution of log(exp(y) - 1) (else that rounded solution)."""
    # on the CPU even when the model is built on the meta device (to size it): values needed
    cpu = torch.device("cpu")
    x = torch.tensor(y + math.log(-math.expm1(-y)), dtype=torch.float32, device=cpu)
    target = torch.tensor(y, dtype=torch.float32, device=cpu)
    up, down = x, x
    for _ in range(4):  # rounding x to float32 can move softplus(x) by an ulp or so
        for c in (up, down):
            if F.softplus(c) == target:
                return float(c)
        up = torch.nextafter(up, torch.tensor(math.inf, device=cpu))
        down = torch.nextafter(down, torch.tensor(-math.inf, device=cpu))
    return float(x)


class Expert(nn.Module):
    """One feed-forward expert: d -> 2d -> d with GELU."""

    def __init__(self, d_model: int):
        super().__init__()
        self.fc = nn.Linear(d_model, 2 * d_model)
        self.proj = nn.Linear(2 * d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x)))


def route(logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(probs (N, E), chosen experts (N, k), their weights (N, k)) for gate logits (N, E).

    Each token's experts are its top_k gate logits, listed in ascending expert index (the
    order in which their outputs are summed). A chosen expert's weight is its probability
    under the softmax over *all* experts (Switch Transformer), renormalized over the chosen k
    when k > 1 -- for k > 1 the same numbers as a softmax over the chosen k logits, but at
    k = 1 that softmax is identically 1 and leaves the gate no gradient from the task loss.
    """
    probs = F.softmax(logits, dim=-1)
    chosen = logits.topk(top_k, dim=-1).indices.sort(dim=-1).values
    # a one-hot product, not a gather: its backward is a product too, never a scatter
    experts = torch.arange(logits.shape[-1], device=logits.device)
    mask = (chosen.unsqueeze(-1) == experts).to(probs.dtype)             # (N, k, E)
    weights = (mask * probs.unsqueeze(1)).sum(dim=-1)                   # (N, k)
    if top_k > 1:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return probs, chosen, weights


def _take_rows(src: torch.Tensor, index: torch.Tensor, zero_row: bool) -> torch.Tensor:
    """src[index]; with ``zero_row`` the index value len(src) selects a row of zeros."""
    if zero_row:
        src = torch.cat([src, src.new_zeros(1, src.shape[1])])
    return src.index_select(0, index)


class PermuteRows(torch.autograd.Function):
    """out = src[index] for an index that maps each output row to one source row or to a row
    of zeros (the value len(src)), every source row being used at most once. Its backward is
    the opposite gather, grad_src = grad_out[inverse], so neither direction scatters."""

    @staticmethod
    def forward(ctx, src, index, inverse, forward_pads, backward_pads):
        ctx.save_for_backward(inverse)
        ctx.backward_pads = backward_pads
        return _take_rows(src, index, forward_pads)

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        return _take_rows(grad.contiguous(), inverse, ctx.backward_pads), None, None, None, None


class MoEFeedForward(nn.Module):
    """Top-k mixture of experts; each expert computes only the tokens routed to it.

    Dispatch: the N*k routed (token, slot) pairs are sorted by expert once; each expert's
    pairs form one contiguous slice, padded with zero rows to a multiple of
    EXPERT_ROW_MULTIPLE (module docstring), within one (rows, d) buffer; every expert runs on
    its slice, also an empty one (so that all expert parameters are in every step's graph, as
    DDP requires); the outputs return to token order by a gather with the inverse permutation.
    Both moves are one gather each way (:class:`PermuteRows`); :func:`naive_moe` is the
    per-expert loop it replaces, kept as the tests' reference.
    """

    def __init__(self, cfg: ResNetBKConfig):
        super().__init__()
        self.num_experts = cfg.num_experts
        self.top_k = cfg.top_k
        self.balance_weight = cfg.moe_balance_weight
        self.gate = nn.Linear(cfg.d_model, cfg.num_experts, bias=False)
        self.experts = nn.ModuleList(Expert(cfg.d_model) for _ in range(cfg.num_experts))
        # state of the last forward, for tests, the auxiliary loss and expert pruning
        self.last_counts: torch.Tensor | None = None      # (num_experts,) tokens per expert
        self.last_indices: torch.Tensor | None = None     # (tokens, top_k) chosen experts
        self.last_aux_loss: torch.Tensor | None = None
        # gate probabilities summed over the routed tokens (with grad) and their number, of the
        # last training forward: with last_counts, a balance loss over several ranks' batches
        self.last_probs_sum: torch.Tensor | None = None
        self.last_tokens = 0

    def dispatch_plan(self, chosen: torch.Tensor):
        """Index maps between pair order (pair p = token * k + slot) and the padded
        expert-sorted buffer: (counts (E,), padded rows per expert (list), to_buffer
        (rows,) pair of each buffer row or P for padding, to_pairs (P,) buffer row of each
        pair)."""
        E = len(self.experts)
        pair_expert = chosen.reshape(-1)
        P = pair_expert.numel()
        order = torch.argsort(pair_expert, stable=True)        # tokens ascending per expert
        counts = torch.bincount(pair_expert, minlength=E)
        padded = counts + (-counts) % EXPERT_ROW_MULTIPLE
        start = torch.cumsum(counts, 0) - counts
        start_padded = torch.cumsum(padded, 0) - padded
        padded_list = padded.tolist()
        rows = sum(padded_list)
        experts = torch.arange(E, device=chosen.device)
        row_expert = torch.repeat_interleave(experts, padded, output_size=rows)
        offset = torch.arange(rows, device=chosen.device) - start_padded[row_expert]
        real = offset < counts[row_expert]
        sorted_slot = torch.where(real, start[row_expert] + offset, P)
        to_buffer = torch.cat([order, order.new_full((1,), P)])[sorted_slot]
        sorted_expert = pair_expert[order]
        row_of_sorted = (torch.arange(P, device=chosen.device) - start[sorted_expert]
                         + start_padded[sorted_expert])
        to_pairs = row_of_sorted[torch.argsort(order)]
        return counts, padded_list, to_buffer, to_pairs

    def forward(self, h: torch.Tensor, real_rows: int | None = None) -> torch.Tensor:
        """MoE of ``h`` (..., d). With ``real_rows`` the input is a (rows, d) buffer of
        gathered tokens whose first ``real_rows`` rows are real and the rest zero padding
        (models/layers/depth.py): the gate runs on the whole padded buffer (so that its GEMM
        sees a row count from the regime where a row's result does not depend on the others,
        as for the experts), only the real rows are routed, and (real_rows, d) is returned."""
        shape = h.shape
        x = h.reshape(-1, shape[-1])                       # (N, d)
        logits = self.gate(x)                              # (N, E)
        if real_rows is not None:
            x, logits = x[:real_rows], logits[:real_rows]
        N, d, k = x.shape[0], x.shape[1], self.top_k
        probs, chosen, weights = route(logits, k)
        counts, padded, to_buffer, to_pairs = self.dispatch_plan(chosen)

        pairs = x if k == 1 else x.unsqueeze(1).expand(N, k, d).reshape(N * k, d)
        buffer = PermuteRows.apply(pairs, to_buffer, to_pairs, True, False)
        outputs = [expert(part) for expert, part in zip(self.experts, buffer.split(padded))]
        # under autocast the experts may return half precision
        y = PermuteRows.apply(torch.cat(outputs).to(x.dtype), to_pairs, to_buffer, False, True)
        y = y.reshape(N, k, d)
        out = y[:, 0] * weights[:, :1]
        for s in range(1, k):                              # ascending expert index, as a loop
            out = out + y[:, s] * weights[:, s:s + 1]

        self.last_counts = counts.detach()
        self.last_indices = chosen.detach()
        self.last_aux_loss = self._balance_loss(counts, probs, N)
        return out if real_rows is not None else out.reshape(shape)

    def _balance_loss(self, counts: torch.Tensor, probs: torch.Tensor, N: int):
        if not (self.training and self.balance_weight > 0):
            self.last_probs_sum = None
            return None
        self.last_probs_sum, self.last_tokens = probs.sum(dim=0), N
        if N == 0:   # no token reached this layer (all halted or exited): nothing to balance
            return probs.sum() * 0.0
        # Switch Transformer: E * sum_e (fraction of routed slots to e) * (mean gate prob of e)
        fraction = counts.to(probs.dtype) / (N * self.top_k)
        return self.balance_weight * counts.numel() * (fraction * probs.mean(dim=0)).sum()

    def global_balance_loss(self, counts: torch.Tensor, tokens: float, world: int):
        """This rank's share of the balance loss of the global batch, given the ``counts``
        and ``tokens`` summed over the ``world`` ranks: E * sum_e f_e * P_e with the global
        fraction f_e and this rank's gate probabilities over the global token count, times
        ``world`` because DDP averages the ranks' gradients. The ranks' losses then average to
        the single-process loss of the whole batch and their gradients to its gradient; the
        per-rank loss of ``last_aux_loss`` multiplies two means of a shard instead, which
        differs from the product of the global means."""
        probs_sum = self.last_probs_sum
        if tokens == 0:
            return probs_sum.sum() * 0.0
        fraction = counts.to(probs_sum.dtype) / (tokens * self.top_k)
        return (self.balance_weight * counts.numel() * world / tokens) * (fraction * probs_sum).sum()


def naive_moe(moe: MoEFeedForward, h: torch.Tensor) -> torch.Tensor:
    """Reference for :meth:`MoEFeedForward.forward` (tests only): the same routing, then a
    loop over experts with a gather, the padded expert and an ``index_add_`` each. Idle
    experts are skipped. Sets the same ``last_*`` state."""
    shape = h.shape
    x = h.reshape(-1, shape[-1])
    logits = moe.gate(x)
    probs, chosen, weights = route(logits, moe.top_k)
    out = torch.zeros_like(x)
    counts = torch.zeros(len(moe.experts), dtype=torch.long, device=x.device)
    for e, expert in enumerate(moe.experts):
        token, slot = (chosen == e).nonzero(as_tuple=True)   # tokens in ascending order
        n = token.numel()
        counts[e] = n
        if n == 0:
            continue
        xe = x.index_select(0, token)
        pad = -n % EXPERT_ROW_MULTIPLE
        if pad:
            xe = F.pad(xe, (0, 0, 0, pad))
        ye = expert(xe)[:n] * weights[token, slot].unsqueeze(-1)
        out.index_add_(0, token, ye.to(out.dtype))
    moe.last_counts = counts
    moe.last_indices = chosen.detach()
    moe.last_aux_loss = moe._balance_loss(counts, probs, x.shape[0])
    return out.reshape(shape)


class BKMixer(nn.Module):
    """Potential -> BK-Core (K heads) -> (Re g, Im g) features -> Linear(2K, d) -> per-channel gain."""

    def __init__(self, cfg: ResNetBKConfig):
        super().__init__()
        K = cfg.bk_heads
        self.heads = K
        self.v_max = cfg.v_max
        self.h0 = cfg.bk_h0
        self.causal = cfg.bk_mode == "causal"
        self.analytic_gradient = cfg.analytic_gradient
        self.v_proj = nn.Linear(cfg.d_model, K)
        self.coupling = nn.Parameter(torch.full((K,), float(cfg.bk_t)))
        self.energy = nn.Parameter(torch.full((K,), float(cfg.bk_energy)))
        self.eps_raw = nn.Parameter(torch.full((K,), inverse_softplus(cfg.bk_eps)))
        self.feature_proj = nn.Linear(2 * K, cfg.d_model)
        self.scale = nn.Parameter(torch.full((cfg.d_model,), float(cfg.bk_scale_init)))
        # which positions are sites of the chain: None, every position; use_sparse_bk sets a
        # router here (models/layers/sparse_bk.py) whose ``sites(f)`` gathers the chosen ones
        self.router: nn.Module | None = None

    def eps(self) -> torch.Tensor:
        return F.softplus(self.eps_raw)

    def resolvent(self, f: torch.Tensor) -> torch.Tensor:
        """The BK-Core output g, complex (B, K, T), for the feed-forward output f (B, T, d)."""
        v = self.v_max * torch.tanh(self.v_proj(f) / self.v_max)    # (B, T, K)
        v = v.transpose(1, 2).contiguous()                          # (B, K, T): one chain per head
        return resolvent_diag(v, self.h0, self.coupling, energy=self.energy, eps=self.eps(),
                              causal=self.causal, analytic_gradient=self.analytic_gradient)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        sites = self.router.sites(f) if self.router is not None else None
        if sites is None:
            return self.mix(f)
        # the chain of the chosen sites only: gathered, mixed, scattered back
        return sites.scatter(self.mix(sites.gather(f)))

    def mix(self, f: torch.Tensor) -> torch.Tensor:
        """The mixer on a chain whose every position is a site: (B, T, d) -> (B, T, d)."""
        g = self.resolvent(f)
        features = torch.cat([g.real, g.imag], dim=1).transpose(1, 2)   # (B, T, 2K)
        return self.scale * self.feature_proj(features)


def bk_mixers(model: nn.Module) -> list[BKMixer]:
    """Every BK mixer of ``model`` (subclasses such as the sparse mixer included), in order."""
    return [m for m in model.modules() if isinstance(m, BKMixer)]


class Block(nn.Module):
    """x + dropout(Layer(LN(x))), Layer(h) = MoE(h) + BK(MoE(h))."""

    def __init__(self, cfg: ResNetBKConfig):
        super().__init__()
        self.ln = nn.LayerNorm(cfg.d_model)
        self.moe = MoEFeedForward(cfg)
        self.bk = BKMixer(cfg)
        self.dropout = KeyedDropout(cfg.dropout)
        # which tokens run the block: None, every token; use_sparse_bk sets a router here
        # (models/layers/sparse_bk.py) whose ``run_block`` runs the routed tokens only
        self.router: nn.Module | None = None

    def forward(self, x: torch.Tensor, skip: "TokenSkip | None" = None) -> torch.Tensor:
        if self.router is not None and not self.router.dense:
            return self.router.run_block(self, x, skip)
        if skip is not None:   # some tokens stopped computing (ACT, early exit): gathered path
            return skip.run_block(self, x)
        f = self.moe(self.ln(x))
        return x + self.dropout(f + self.bk(f))


class ResNetBKLM(LanguageModel):
    # module-name part -> cost component (see LanguageModel.component_of)
    COMPONENTS = {
        "embedding": ("tok_emb", "pos_emb"),
        "mixer": ("bk",),
        "feed_forward": ("moe", "ln"),
        "lm_head": ("ln_f", "lm_head"),
    }

    def __init__(self, cfg: ResNetBKConfig):
        super().__init__()
        self.config = cfg
        self.n_seq = cfg.n_seq
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.n_seq, cfg.d_model)
        self.drop = KeyedDropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_weights:
            self.lm_head.weight = self.tok_emb.weight
        self.apply(self.init_weights)
        # The blocks as a list of stages (models/layers/stages.py): one per block, unless a
        # structural flag runs some differently (use_multi_scale's hourglass). Stages own no
        # parameters, so the weights keep their names with the flag on or off.
        self.stages: list = plain_stages(cfg.n_layers)
        # per-token depth policies installed by flags (use_act, use_early_exit): objects with
        # begin / after_layer / finish (models/layers/depth.py). Empty: every token runs every
        # layer.
        self.depth_policies: list = []

    def features(self, idx: torch.Tensor) -> torch.Tensor:
        T = self.check_input(idx)
        pos = torch.arange(T, device=idx.device)
        x = self.drop(self.tok_emb(idx) + self.pos_emb(pos))
        return self.ln_f(run_stack(self, x))

    def auxiliary_loss(self, sum_over_ranks: Callable[[torch.Tensor], torch.Tensor] | None = None,
                       world: int = 1) -> torch.Tensor | None:
        """MoE load-balancing loss of the last forward, summed over layers (None in eval / weight 0).

        Under DDP pass ``sum_over_ranks`` (a tensor's sum over the ``world`` ranks, e.g. an
        all-reduce): the routing counts of all ranks then enter one global loss, so that several
        ranks train what one process trains on the whole batch (a loss made of per-shard
        fractions does not). Every rank must call it, once per training forward."""
        moes = [b.moe for b in self.blocks if b.moe.last_aux_loss is not None]
        if not moes:
            return None
        if sum_over_ranks is None:
            return torch.stack([m.last_aux_loss for m in moes]).sum()
        # one collective for every layer: each layer's counts followed by its token count
        local = torch.cat([torch.cat([m.last_counts.double(),
                                      m.last_counts.new_tensor([m.last_tokens]).double()])
                           for m in moes])
        summed = sum_over_ranks(local).tolist()
        losses, at = [], 0
        for m in moes:
            E = m.last_counts.numel()
            counts = m.last_counts.new_tensor(summed[at:at + E])
            losses.append(m.global_balance_loss(counts, summed[at + E], world))
            at += E + 1
        return torch.stack(losses).sum()

    def last_routing_counts(self) -> torch.Tensor:
        """(n_layers, num_experts) tokens routed to each expert in the last forward."""
        counts = [b.moe.last_counts for b in self.blocks]
        if any(c is None for c in counts):
            raise RuntimeError("no forward has run yet")
        return torch.stack(counts)
