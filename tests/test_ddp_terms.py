"""Flag loss terms under DDP that need more than a rank's own mean: a share (sparse_bk), a
sampled mean (early exit), a mean over a shard of unequal size (koopman, physics, ACT). Two
gloo ranks on CPU, shards of 2 and 1 windows, each compute the term on their shard; the
ranks' averaged gradient (what DDP applies) and the term's value (on every rank, or averaged
over the ranks for a shard mean) must equal one process's on the whole batch."""

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from bkbench.flags.early_exit import mean_over_ranks
from bkbench.flags.sparse_bk import global_shares
from bkbench.models.dropout import dropout_key, shard_weight

D, BATCH, SEQ, TARGET = 5, 3, 8, 0.3   # 3 windows on 2 ranks: shards of 2 and 1


def data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(BATCH, SEQ, D, generator=g), torch.randn(D, generator=g)


def share_loss(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """sparse_bk's term on the windows ``x``: two layers, the second at half resolution (as
    under multi-scale), routing straight-through on a gate."""
    routed = []
    for states in (x, x[:, ::2]):
        gate = torch.sigmoid(states @ w)
        routed.append((gate > 0.5).float() + gate - gate.detach())
    return ((global_shares(routed) - TARGET) ** 2).mean()


def _rank(rank: int, world: int, store: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        x, w = data()
        w.requires_grad_(True)
        shard = x[rank::world]
        loss = share_loss(shard, w)
        # a mean of per-sample values over the global batch, this shard's sum / global count
        values = (shard @ w).square().mean(dim=1)
        mean = mean_over_ranks([values.sum() * (world / BATCH)])[0]
        # a mean over the shard (koopman, physics, ACT), weighted by the shard's size
        with dropout_key(0, 0, range(BATCH)[rank::world], BATCH):
            weighted = shard_weight(shard.shape[0]) * values.mean()
        grads = [torch.autograd.grad(t, w, retain_graph=True)[0] for t in (loss, mean, weighted)]
        for g in grads:   # what DDP does with the ranks' gradients
            dist.all_reduce(g)
            g /= world
        torch.save({"loss": loss.detach(), "mean": mean.detach(), "weighted": weighted.detach(),
                    "grads": grads},
                   f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_global_terms_on_two_ranks_equal_one_process(tmp_path):
    x, w = data()
    w.requires_grad_(True)
    loss = share_loss(x, w)     # not distributed here: the whole batch's term
    mean = (x @ w).square().mean(dim=1).mean()
    expected = [torch.autograd.grad(t, w, retain_graph=True)[0] for t in (loss, mean, mean)]
    mp.spawn(_rank, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2)
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert torch.allclose(got["loss"], loss.detach(), rtol=1e-6, atol=0)
        assert torch.allclose(got["mean"], mean.detach(), rtol=1e-6, atol=0)
        for g, e in zip(got["grads"], expected):
            assert torch.allclose(g, e, rtol=1e-5, atol=1e-8)
    weighted = [torch.load(tmp_path / f"rank{rank}.pt")["weighted"] for rank in range(2)]
    assert torch.allclose(sum(weighted) / 2, mean.detach(), rtol=1e-6, atol=0)
    # the test can fail: the plain shard means, and each rank's own share, average otherwise
    plain = [(x[r::2] @ w).square().mean() for r in range(2)]
    assert not torch.allclose(sum(plain) / 2, mean.detach(), rtol=1e-3)
    own = [((torch.stack([(torch.sigmoid(s @ w) > 0.5).float().mean() for s in (x[r::2], x[r::2, ::2])])
             - TARGET) ** 2).mean() for r in range(2)]
    assert not torch.allclose(sum(own) / 2, loss.detach(), rtol=1e-3)
