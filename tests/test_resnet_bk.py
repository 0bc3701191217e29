"""The ResNet-BK language model: causality, MoE routing, gradients, parameter accounting."""

import math

import pytest
import torch
import torch.nn.functional as F

from bkbench.audit import audit_causality
from bkbench.config import BenchmarkConfig
from bkbench.models import build_model
from torch.utils._python_dispatch import TorchDispatchMode

from bkbench.models.resnet_bk import EXPERT_ROW_MULTIPLE, ResNetBKLM, naive_moe

V = 64


def tiny(seed: int = 0, **kw) -> ResNetBKLM:
    torch.manual_seed(seed)
    cfg = dict(d_model=16, n_layers=2, n_seq=24, num_experts=4, top_k=1, bk_heads=1, dropout=0.2)
    cfg.update(kw)
    return build_model("resnet_bk", V, **cfg)


def tokens(batch=3, seq=24, seed=1):
    return torch.randint(0, V, (batch, seq), generator=torch.Generator().manual_seed(seed))


def test_shapes_parameter_count_and_components():
    d, L, T, E, K = 16, 2, 24, 4, 3
    model = tiny(bk_heads=K)
    assert model(tokens()).shape == (3, 24, V)
    expert = (d * 2 * d + 2 * d) + (2 * d * d + d)
    ffn = 2 * d + d * E + E * expert                        # block LayerNorm, gate, experts
    mixer = (d * K + K) + 3 * K + (2 * K * d + d) + d        # v_proj, t/E/eps, feature_proj, scale
    assert model.parameter_breakdown() == {
        "embedding": V * d + T * d, "mixer": L * mixer, "feed_forward": L * ffn,
        "lm_head": 2 * d + d * V}
    assert model.num_parameters() == V * d + T * d + L * (mixer + ffn) + 2 * d + d * V
    for name, _ in model.named_parameters():
        assert model.component_of(name) != "other", name
    for name, module in model.named_modules():   # modules that own parameters (FLOP attribution)
        if any(True for _ in module.parameters(recurse=False)):
            assert model.component_of(name) != "other", name


def test_initial_bk_values_are_the_published_ones():
    model = tiny(bk_heads=2)
    bk = model.blocks[0].bk
    assert bk.h0 == -2.0
    assert torch.equal(bk.coupling.data, torch.ones(2))
    assert torch.equal(bk.energy.data, torch.zeros(2))
    assert torch.equal(bk.eps(), torch.ones(2))            # exactly, through the softplus
    assert torch.equal(tiny(bk_eps=0.5).blocks[1].bk.eps(), torch.full((1,), 0.5))
    assert torch.equal(bk.scale.data, torch.ones(16))


def test_accepts_exactly_the_benchmark_config_fields():
    kwargs = BenchmarkConfig(model_name="resnet_bk_full", use_analytic_gradient=True).model_kwargs()
    kwargs.update(d_model=16, n_layers=1, n_seq=16)
    model = build_model("resnet_bk", V, **kwargs)
    assert model.blocks[0].bk.analytic_gradient is False  # the flag is applied by bkbench.flags
    with pytest.raises(ValueError, match="bk_mode"):
        build_model("resnet_bk", V, bk_mode="sideways")
    with pytest.raises(ValueError, match="top_k"):
        build_model("resnet_bk", V, num_experts=2, top_k=3)


@pytest.mark.parametrize("cfg", [
    dict(),                                                 # the published layout, top-1, K=1
    dict(num_experts=4, top_k=2, bk_heads=3),
    dict(num_experts=3, top_k=3, bk_heads=2, analytic_gradient=True),
    dict(num_experts=1, top_k=1, bk_heads=1, n_layers=1, tie_weights=True),
])
def test_causal_model_passes_the_audit_bit_for_bit(cfg):
    audit = audit_causality(tiny(**cfg), V, num_sequences=2, positions=[1, 5, 12, 23])
    assert audit.causal and audit.max_leak == 0.0, audit.to_dict()
    assert set(audit.modes) == {"eval", "train"}
    assert all(m.responsive for m in audit.modes.values())


def test_bidirectional_model_fails_the_audit():
    audit = audit_causality(tiny(bk_mode="bidirectional", top_k=2, bk_heads=2), V)
    assert not audit.causal
    assert audit.modes["eval"].max_leak > 0 and audit.modes["train"].max_leak > 0


def test_resolvent_is_bounded_by_one_over_eps():
    model = tiny(bk_eps=0.5, v_max=3.0).eval()
    with torch.no_grad():
        f = 100 * torch.randn(2, 24, 16)                   # large inputs saturate v at +-v_max
        g = model.blocks[0].bk.resolvent(f)
    assert g.shape == (2, 1, 24) and g.dtype == torch.complex64
    assert (g.abs() <= 1 / 0.5 + 1e-5).all() and (g.imag > 0).all()


def test_routing_is_deterministic_and_each_token_gets_exactly_top_k_experts():
    model = tiny(num_experts=4, top_k=2, bk_heads=2).eval()
    idx = tokens(batch=4)
    with torch.no_grad():
        a = model(idx)
        counts_a = model.last_routing_counts().clone()
        indices_a = model.blocks[1].moe.last_indices.clone()
        b = model(idx)
    assert torch.equal(a, b)
    assert torch.equal(counts_a, model.last_routing_counts())
    assert torch.equal(indices_a, model.blocks[1].moe.last_indices)
    n_tokens = idx.numel()
    assert counts_a.shape == (2, 4)
    assert (counts_a.sum(dim=1) == n_tokens * 2).all()
    for block in model.blocks:
        chosen = block.moe.last_indices
        assert chosen.shape == (n_tokens, 2)
        assert (chosen[:, 0] != chosen[:, 1]).all()        # two distinct experts per token


def test_moe_output_equals_the_dense_top_k_mixture():
    torch.manual_seed(3)
    model = tiny(num_experts=4, top_k=2)
    moe = model.blocks[0].moe.eval()
    h = torch.randn(3, 24, 16)
    with torch.no_grad():
        out = moe(h)
        x = h.reshape(-1, 16)
        top, idx = moe.gate(x).topk(2, dim=-1)
        w = F.softmax(top, dim=-1)
        all_experts = torch.stack([expert(x) for expert in moe.experts], dim=1)   # (N, E, d)
        dense = (all_experts.gather(1, idx[..., None].expand(-1, -1, 16)) * w[..., None]).sum(1)
    torch.testing.assert_close(out.reshape(-1, 16), dense, rtol=1e-5, atol=1e-6)


def test_experts_compute_only_their_tokens():
    model = tiny(num_experts=4, top_k=1).eval()
    rows = {}
    hooks = [expert.fc.register_forward_hook(
        lambda mod, inp, out, e=e: rows.__setitem__(e, inp[0].shape[0]))
        for e, expert in enumerate(model.blocks[0].moe.experts)]
    with torch.no_grad():
        model(tokens(batch=4))
    for hook in hooks:
        hook.remove()
    counts = model.last_routing_counts()[0].tolist()
    for e, n in enumerate(counts):
        padded = -(-n // EXPERT_ROW_MULTIPLE) * EXPERT_ROW_MULTIPLE
        assert rows.get(e, 0) == padded
    assert sum(rows.values()) < 4 * 24 * 4                  # far less than every token x expert


def test_load_balancing_loss():
    model = tiny(num_experts=4, top_k=2, moe_balance_weight=0.1).train()
    idx = tokens()
    model(idx)
    aux = model.auxiliary_loss()
    expected = 0.0
    for block in model.blocks:
        moe = block.moe
        assert moe.last_aux_loss is not None
        expected += moe.last_aux_loss.item()
    assert aux is not None and aux.requires_grad
    assert math.isclose(aux.item(), expected, rel_tol=1e-6)
    # Switch loss: E * sum_e f_e P_e with sum f = sum P = 1, so it is >= weight * 0 and near weight
    assert 0 < aux.item() < 0.1 * 2 * 4
    aux.backward()
    assert model.blocks[0].moe.gate.weight.grad.abs().sum() > 0
    model.eval()
    model(idx)
    assert model.auxiliary_loss() is None
    off = tiny(moe_balance_weight=0.0).train()
    off(idx)
    assert off.auxiliary_loss() is None


def test_balance_loss_over_rank_shards_equals_the_whole_batchs():
    """Two 'ranks' each run half the batch; with the counts summed over them, their losses
    average to the one-process loss and their gradients (as DDP averages them) to its
    gradient. Per-shard fractions (each rank's own Switch loss) do not."""
    model = tiny(num_experts=4, top_k=2, moe_balance_weight=0.1, dropout=0.0).train()
    idx = tokens(batch=4)
    gate = [b.moe.gate.weight for b in model.blocks]

    def grads_of(loss):
        return torch.autograd.grad(loss, gate)

    model(idx)
    whole = model.auxiliary_loss()
    whole_grads = grads_of(whole)

    shards = []
    for part in (idx[0::2], idx[1::2]):
        model(part)
        shards.append((model.auxiliary_loss(), [(b.moe.last_counts.clone(), b.moe.last_probs_sum,
                                                 b.moe.last_tokens) for b in model.blocks]))
    # what the all-reduce gives every rank: the counts and token numbers summed over both
    summed = torch.stack([torch.cat([torch.cat([c.double(), c.new_tensor([n]).double()])
                                     for c, _, n in stats]) for _, stats in shards]).sum(0)
    rank_losses, rank_grads = [], []
    for _, stats in shards:
        for block, (c, p, n) in zip(model.blocks, stats):
            block.moe.last_counts, block.moe.last_probs_sum, block.moe.last_tokens = c, p, n
        loss = model.auxiliary_loss(lambda t: summed.clone(), world=2)
        rank_losses.append(loss)
        rank_grads.append(grads_of(loss))
    assert ((rank_losses[0] + rank_losses[1]) / 2).item() == pytest.approx(whole.item(), rel=1e-6)
    for g0, g1, g in zip(*rank_grads, whole_grads):
        torch.testing.assert_close((g0 + g1) / 2, g, rtol=1e-5, atol=1e-8)
    per_shard = ((shards[0][0] + shards[1][0]) / 2).item()
    assert abs(per_shard - whole.item()) > 1e-6 * whole.item()   # the defect this guards against


def test_gradients_reach_every_parameter_and_are_finite():
    model = tiny(num_experts=3, top_k=2, bk_heads=2, dropout=0.0, analytic_gradient=True).train()
    idx = tokens(batch=4)
    logits = model(idx)
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, V), idx[:, 1:].reshape(-1))
    loss = loss + model.auxiliary_loss()
    loss.backward()
    assert (model.last_routing_counts() > 0).all()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_analytic_and_autograd_variants_agree(dtype):
    grads = {}
    losses = {}
    idx = tokens(batch=2)
    for analytic in (False, True):
        model = tiny(seed=5, num_experts=2, top_k=2, bk_heads=2, dropout=0.0,
                     analytic_gradient=analytic).to(dtype).eval()
        # a larger potential than at initialization, so that the BK-Core matters
        with torch.no_grad():
            for block in model.blocks:
                block.bk.v_proj.weight.normal_(0, 1.0)
                block.moe.experts[0].proj.weight.normal_(0, 0.3)
        logits = model(idx)
        loss = F.cross_entropy(logits.reshape(-1, V), idx.reshape(-1))
        loss.backward()
        losses[analytic] = loss.detach()
        grads[analytic] = {n: p.grad for n, p in model.named_parameters()}
    tol = dict(rtol=1e-4, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(losses[True], losses[False], **tol)
    for name, g in grads[False].items():
        torch.testing.assert_close(grads[True][name], g, **tol, msg=name)


def test_one_batch_overfits():
    model = tiny(seed=0, d_model=16, n_layers=2, num_experts=2, top_k=1, dropout=0.0,
                 moe_balance_weight=0.01).train()
    idx = tokens(batch=4, seq=24, seed=7)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-2)
    first = None
    for _ in range(30):
        logits = model(idx[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, V), idx[:, 1:].reshape(-1))
        if first is None:
            first = loss.item()
        (loss + model.auxiliary_loss()).backward()
        opt.step()
        opt.zero_grad()
    assert first > 3.5                                      # about log(64) = 4.16 at start
    assert loss.item() < 0.25 * first


def test_router_learns_from_the_task_loss_at_top_1():
    model = tiny(num_experts=4, top_k=1, moe_balance_weight=0.0, dropout=0.0).train()
    idx = tokens(batch=2)
    logits = model(idx)
    assert model.auxiliary_loss() is None
    F.cross_entropy(logits[:, :-1].reshape(-1, V), idx[:, 1:].reshape(-1)).backward()
    for block in model.blocks:
        assert block.moe.gate.weight.grad.abs().max() > 1e-6
    # the weight of the chosen expert is its probability under the softmax over all experts
    moe = model.blocks[0].moe
    h = torch.randn(5, 16)
    with torch.no_grad():
        probs = F.softmax(moe.gate(h), dim=-1)
        out = moe(h)
        chosen = probs.argmax(dim=-1)
        expected = torch.stack([probs[i, e] * moe.experts[e](h[i:i + 1])[0]
                                for i, e in enumerate(chosen.tolist())])
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-7)


class _OpLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def _idle(moe, e, h):
    """Point expert e's gate row against the inputs' common direction: e gets no token."""
    with torch.no_grad():
        moe.gate.weight[e] = -5 * h.reshape(-1, h.shape[-1]).mean(0)


@pytest.mark.parametrize("E,k,idle", [(4, 1, None), (4, 1, 2), (4, 2, None), (3, 3, None),
                                      (5, 2, 0), (1, 1, None)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sorted_dispatch_equals_the_per_expert_loop(E, k, idle, dtype):
    torch.manual_seed(E * 10 + k)
    moe = tiny(num_experts=E, top_k=k, moe_balance_weight=0.1).blocks[0].moe.to(dtype).train()
    for p in moe.parameters():
        p.data.normal_(0, 0.3)
    h = (torch.randn(16, dtype=dtype) + 0.3 * torch.randn(3, 21, 16, dtype=dtype))
    if idle is not None:
        _idle(moe, idle, h)
    g_out = torch.randn(3, 21, 16, dtype=dtype)
    results = []
    for run in (moe, lambda x: naive_moe(moe, x)):
        x = h.clone().requires_grad_(True)
        out = run(x)
        state = (moe.last_counts.clone(), moe.last_indices.clone(), moe.last_aux_loss)
        ((out * g_out).sum() + state[2]).backward()
        # the loop skips an idle expert (no gradient); the sorted dispatch gives it zeros
        grads = [x.grad] + [torch.zeros_like(p) if p.grad is None else p.grad.clone()
                            for p in moe.parameters()]
        moe.zero_grad(set_to_none=True)
        results.append((out.detach(), state, grads))
    (out, state, grads), (ref_out, ref_state, ref_grads) = results
    assert torch.equal(out, ref_out)                     # bit for bit
    assert torch.equal(state[0], ref_state[0]) and torch.equal(state[1], ref_state[1])
    assert torch.equal(state[2], ref_state[2])
    assert int(state[0].sum()) == 3 * 21 * k
    if idle is not None:
        assert state[0][idle] == 0
    for g, ref in zip(grads, ref_grads):
        torch.testing.assert_close(g, ref, rtol=1e-6 if dtype == torch.float32 else 1e-12,
                                   atol=1e-7 if dtype == torch.float32 else 1e-14)


def test_dispatch_scatters_nothing_and_every_expert_gets_a_gradient():
    moe = tiny(num_experts=4, top_k=1).blocks[0].moe.train()
    h = torch.randn(16) + 0.3 * torch.randn(4, 24, 16)
    _idle(moe, 1, h)
    x = h.clone().requires_grad_(True)
    with _OpLog() as log:
        moe(x).square().sum().backward()
    assert moe.last_counts[1] == 0
    assert not {op for op in log.ops if "scatter" in op or "index_add" in op or "index_put" in op}
    assert "index_select" in log.ops
    for name, p in moe.named_parameters():                # the idle expert's too (zeros)
        assert p.grad is not None, name
    assert torch.equal(moe.experts[1].fc.weight.grad, torch.zeros_like(moe.experts[1].fc.weight))
