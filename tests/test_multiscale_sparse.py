"""use_multi_scale (causal hourglass) and use_sparse_bk (routed BK chain): each test fails if
its flag were a no-op, leaked the future, or skipped nothing."""

import os
import signal

import pytest
import torch

from bkbench.audit import audit_causality
from bkbench.config import BenchmarkConfig, ConfigError
from bkbench.flags import build_model
from bkbench.metrics.flops import measure_forward_flops
from bkbench.models.layers import sparse_bk as sbk
from bkbench.models.layers.hourglass import ShortenedStage, apply_hourglass, without_hourglass
from bkbench.train import Trainer, TrainingInterrupted, seed_everything

from conftest import make_corpus

V = 32


def config(**changes):
    base = dict(model_name="resnet_bk_t", d_model=16, n_layers=4, n_seq=16, batch_size=8,
                epochs=0, max_steps=6, lr=3e-3, warmup_steps=1, eval_batch_size=16, seed=3,
                dropout=0.1, num_experts=4, multi_scale_timing_repeats=1,
                sparse_bk_timing_repeats=1, sparse_bk_record_windows=2)
    return BenchmarkConfig.from_dict({**base, **changes}).validate()


def built(cfg):
    seed_everything(cfg.seed)
    return build_model(cfg, V)


def trainer(cfg, corpus=None, **kw):
    model, flags = built(cfg)
    corpus = corpus or make_corpus(vocab_size=V, n_train=2000, n_eval=300)
    return Trainer(cfg, model, corpus, torch.device("cpu"), progress=False, flags=flags, **kw)


def tokens(batch=8, seq=16, seed=1):
    return torch.randint(0, V, (batch, seq), generator=torch.Generator().manual_seed(seed))


def force_routing(model, pattern):
    """Make every router route exactly the tokens where ``pattern`` (B, T) is True."""
    def hook(module, args, out):
        return torch.where(pattern, 5.0, -5.0).unsqueeze(-1).to(out.dtype) + 0 * out
    return [r.register_forward_hook(hook) for r in sbk.chain_routers(model)]


# --- the flags change what runs ------------------------------------------------------------

@pytest.mark.parametrize("flag", ["use_multi_scale", "use_sparse_bk"])
def test_flag_changes_the_output_and_off_means_the_plain_model(flag):
    model, _ = built(config(**{flag: True}))
    plain, _ = built(config())
    model.eval(), plain.eval()
    x = tokens()
    with torch.no_grad():
        out = model(x)
        base = plain(x)
        switched_off = without_hourglass(model) if flag == "use_multi_scale" \
            else sbk.dense_mixers(model)
        with switched_off:
            off = model(x)
    assert not torch.allclose(out, base, atol=1e-4)
    # the flag's model holds the plain model's weights: switched off it computes the same
    torch.testing.assert_close(off, base, rtol=0, atol=0)


def test_settings_are_validated():
    with pytest.raises(ConfigError, match="n_layers >= 2 \\* multi_scale_outer_layers \\+ 1 = 3"):
        config(use_multi_scale=True, n_layers=2)
    with pytest.raises(ConfigError, match="multi_scale_factor must be >= 2"):
        config(use_multi_scale=True, multi_scale_factor=1)
    with pytest.raises(ConfigError, match="sparse_bk_target_share"):
        config(use_sparse_bk=True, sparse_bk_target_share=0.0)
    with pytest.raises(ConfigError, match="bk_mode='causal'"):
        config(use_sparse_bk=True, bk_mode="bidirectional")


# --- the hourglass -------------------------------------------------------------------------

@pytest.mark.parametrize("factor,seq,short", [(2, 16, 8), (2, 15, 8), (3, 16, 6)])
def test_middle_blocks_run_on_n_over_k_positions(factor, seq, short):
    model, _ = built(config(use_multi_scale=True, multi_scale_factor=factor, n_seq=seq))
    seen = {}
    for i, block in enumerate(model.blocks):
        block.register_forward_pre_hook(lambda m, a, i=i: seen.__setitem__(i, a[0].shape[1]))
    model(tokens(seq=seq))
    assert seen == {0: seq, 1: short, 2: short, 3: seq}


@pytest.mark.parametrize("factor,shift", [(2, 0), (3, 0), (3, 1)])
def test_hourglass_without_the_full_shift_leaks_and_the_audit_catches_it(factor, shift):
    model, _ = built(config())
    apply_hourglass(model, factor, outer_layers=1, shift=shift)
    audit = audit_causality(model, V, seq_len=16)
    assert not audit.causal and audit.max_leak > 0
    assert audit.modes["eval"].max_leak > 0 and audit.modes["train"].max_leak > 0


@pytest.mark.parametrize("changes", [
    dict(use_multi_scale=True),
    dict(use_multi_scale=True, multi_scale_factor=3, n_seq=15),
    dict(use_multi_scale=True, multi_scale_outer_layers=0),
    dict(use_sparse_bk=True),
    dict(use_sparse_bk=True, sparse_bk_scope="mixer"),
    dict(use_sparse_bk=True, use_act=True),
    dict(use_sparse_bk=True, use_early_exit=True),
    dict(use_multi_scale=True, use_sparse_bk=True),
    dict(use_multi_scale=True, use_sparse_bk=True, use_koopman=True, use_physics_informed=True,
         use_analytic_gradient=True, koopman_record_windows=2,
         physics_informed_record_windows=2),
], ids=["k2", "k3_odd_length", "all_middle", "sparse", "sparse_mixer", "sparse_act",
        "sparse_early_exit", "both", "both_and_objectives"])
def test_flags_are_causal_in_eval_and_train_mode(changes):
    cfg = config(**changes)
    model, flags = built(cfg)
    audit = audit_causality(model, V, seq_len=cfg.n_seq, modes=("eval", "train"))
    assert audit.causal, audit.max_leak
    assert all(m.responsive for m in audit.modes.values())


PART_ONE = ["use_analytic_gradient", "use_koopman", "use_physics_informed", "use_quantization",
            "use_pruning", "use_mixed_precision"]


def test_causal_with_the_part_one_flags_and_in_the_evaluated_model():
    cfg = config(**{name: True for name in PART_ONE + ["use_multi_scale", "use_sparse_bk"]}, koopman_record_windows=2,
                 physics_informed_record_windows=2, mixed_precision_timing_steps=1,
                 analytic_gradient_timing_repeats=1)
    model, flags = built(cfg)
    with flags.autocast(torch.device("cpu")):
        assert audit_causality(model, V, seq_len=16).causal
        evaluated = flags.prepare_for_eval(model)
        assert audit_causality(evaluated, V, seq_len=16, modes=("eval",)).causal
    assert any(isinstance(s, ShortenedStage) for s in evaluated.stages)
    assert isinstance(evaluated.blocks[1].router, sbk.BlockRouter)


def test_layer_objectives_read_the_middle_states_at_full_resolution():
    cfg = config(use_multi_scale=True, multi_scale_factor=3, n_seq=15, use_koopman=True,
                 use_physics_informed=True, koopman_record_windows=2,
                 physics_informed_record_windows=2)
    t = trainer(cfg)
    t.model.train()
    _, terms = t.compute_loss(tokens(seq=15), tokens(seq=15, seed=2))
    states = t.flags["use_koopman"].states
    assert [s.shape[1] for s in states.states] == [15, 15, 5, 5, 15]
    assert states.stacked().shape == (5, 8, 15, 16)
    # a middle state stands for the positions it is upsampled to: group j for 3j .. 3j + 2
    assert torch.equal(states.stacked()[2, :, 3:6], states.states[2][:, 1:2].expand(-1, 3, -1))
    assert terms["koopman"].item() > 0 and terms["physics_energy"].item() > 0


# --- the sparse BK chain -------------------------------------------------------------------

def test_chain_length_is_the_routed_count_and_unrouted_tokens_get_no_mixer_output(monkeypatch):
    B, T = 16, 16          # batch 16: the padded length is the longest chain itself
    g = torch.Generator().manual_seed(5)
    pattern = torch.rand(B, T, generator=g) < 0.4
    pattern[0] = False     # one sequence routes nothing, another everything
    pattern[1] = True
    model, _ = built(config(use_sparse_bk=True, sparse_bk_scope="mixer", batch_size=B))
    force_routing(model, pattern)
    chains = []
    import bkbench.models.resnet_bk as rbk
    real = rbk.resolvent_diag
    monkeypatch.setattr(rbk, "resolvent_diag", lambda v, *a, **k: chains.append(v.shape) or real(v, *a, **k))
    mixer = model.blocks[0].bk
    captured = {}
    mixer.register_forward_hook(lambda m, a, o: captured.update(f=a[0], out=o))
    model.eval()
    with torch.no_grad():
        model(tokens(batch=B, seq=T))
    counts = pattern.sum(1)
    assert chains == [(B, 1, int(counts.max()))] * 4   # every layer: the longest routed chain
    router = mixer.router
    assert torch.equal(router.last_counts, counts) and torch.equal(router.last_routed, pattern)
    out, f = captured["out"], captured["f"]
    assert (out[~pattern] == 0).all()
    with torch.no_grad():
        for b in (1, 2, 3):      # a routed token's output: the BK mixer on its sequence's chain
            pos = pattern[b].nonzero().squeeze(1)
            alone = mixer.mix(f[b, pos].unsqueeze(0))[0]
            gate = router.last_gate[b, pos].unsqueeze(-1)
            torch.testing.assert_close(out[b, pos], alone * gate, rtol=1e-5, atol=1e-6)


def test_padded_chain_length_keeps_rows_a_multiple_of_16():
    assert sbk.padded_chain_length(5, 16) == 5
    assert sbk.padded_chain_length(5, 8) == 6
    assert sbk.padded_chain_length(5, 4) == 8
    assert sbk.padded_chain_length(0, 3) == 16


def test_share_loss_pulls_the_router_toward_the_target():
    cfg = config(use_sparse_bk=True, sparse_bk_target_share=0.25, moe_balance_weight=0.0)
    t = trainer(cfg)
    t.model.train()
    _, terms = t.compute_loss(tokens(), tokens(seed=2))
    share = sum(r.last_routed.float().mean().item() for r in sbk.chain_routers(t.model)) / 4
    assert terms["sparse_bk"].item() > 0 and share > 0.25
    bias = t.model.blocks[0].router.bias
    (grad,) = torch.autograd.grad(terms["sparse_bk"], [bias])
    assert grad.item() > 0      # descent lowers the gate: fewer tokens routed


def naive_routed_block(block, x):
    """Reference for Block.forward under a BlockRouter (Mixture-of-Depths): the MoE on every
    token, then each sequence's routed tokens alone through the BK mixer; a routed token takes
    x + gate * (f + BK(f)), the others keep x."""
    h = block.ln(x)
    logit = block.router(h).squeeze(-1)
    routed, gate = logit > 0, torch.sigmoid(logit)
    f = block.moe(h)
    out = []
    for b in range(x.shape[0]):
        pos = routed[b].nonzero().squeeze(1)
        chain = f[b, pos].unsqueeze(0)
        update = torch.zeros_like(x[b]).index_copy(0, pos, (chain + block.bk(chain))[0])
        out.append(x[b] + gate[b].unsqueeze(-1) * update)
    return torch.stack(out)


@pytest.mark.parametrize("B,T,seed", [(5, 13, 0), (8, 16, 1), (3, 7, 2)])
def test_block_routing_matches_the_naive_reference(B, T, seed):
    model, _ = built(config(use_sparse_bk=True, dropout=0.0))
    block = model.blocks[1]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, 16, generator=g)
    with torch.no_grad():     # a router with a spread of logits; one sequence routes nothing
        block.router.weight.copy_(torch.randn(block.router.weight.shape, generator=g))
        x[0] = -block.router.weight.sign() * (1 + torch.rand(T, 16, generator=g))
    x.requires_grad_(True)
    model.eval()
    fast = block(x)
    routed = block.router.last_routed
    assert not routed[0].any() and 0 < routed.float().mean() < 1
    w = torch.randn(B, T, 16, generator=g)
    params = [x, block.router.weight, block.moe.experts[0].fc.weight, block.bk.v_proj.weight]
    grads = torch.autograd.grad((fast * w).sum(), params)
    with sbk.dense_mixers(model):      # the block's own modules, every token (the plain path)
        slow = naive_routed_block(block, x)
        slow_grads = torch.autograd.grad((slow * w).sum(), params)
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads, slow_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    # an unrouted token passes the block untouched, bit for bit
    assert torch.equal(fast[~routed], x[~routed])


def test_block_routing_runs_the_moe_and_mixer_on_the_routed_tokens_only():
    B, T = 16, 16
    pattern = torch.rand(B, T, generator=torch.Generator().manual_seed(4)) < 0.3
    model, _ = built(config(use_sparse_bk=True, batch_size=B))
    force_routing(model, pattern)
    rows, chains = [], []
    block = model.blocks[2]
    block.moe.register_forward_pre_hook(lambda m, a: rows.append(a[0].shape[0]))
    block.bk.register_forward_pre_hook(lambda m, a: chains.append(a[0].shape))
    model.eval()
    with torch.no_grad():
        model(tokens(batch=B, seq=T))
    n = int(pattern.sum())
    assert rows == [n + (-n % 16)]                    # gathered rows, padded to 16
    assert chains == [(B, int(pattern.sum(1).max()), 16)]
    assert torch.equal(block.moe.last_counts.sum(), torch.tensor(n))


def test_a_token_stopped_by_a_depth_policy_is_never_routed_and_keeps_its_state():
    from bkbench.models.layers.depth import TokenSkip
    B, T = 4, 16
    model, _ = built(config(use_sparse_bk=True, dropout=0.0))
    model.eval()
    block = model.blocks[1]
    g = torch.Generator().manual_seed(7)
    x = torch.randn(B, T, 16, generator=g)
    skip = TokenSkip(x)
    skip.running = torch.rand(B * T, generator=g) < 0.5
    with torch.no_grad():
        block.router.bias.fill_(10.0)        # the router alone would route every token
        out = block(x, skip)
    running = skip.running.view(B, T)
    assert torch.equal(block.router.last_routed, running)
    assert skip.rows_per_layer == [int(running.sum())]
    assert torch.equal(out[~running], x[~running])
    assert not torch.equal(out[running], x[running])


# --- counted FLOPs -------------------------------------------------------------------------

def test_counted_forward_flops_fall_with_each_flag():
    # one expert: the MoE's padding (the only other routing-dependent work) is then fixed
    base_cfg = dict(num_experts=1, top_k=1, batch_size=16)
    plain, _ = built(config(**base_cfg))
    base = measure_forward_flops(plain, 16, 16, V)
    hour, _ = built(config(use_multi_scale=True, multi_scale_factor=2, **base_cfg))
    h = measure_forward_flops(hour, 16, 16, V)
    assert h["forward"] < base["forward"]
    assert h["by_component"]["mixer"] * 4 == base["by_component"]["mixer"] * 3   # 2 of 4 at N/2
    sparse, _ = built(config(use_sparse_bk=True, sparse_bk_scope="mixer", **base_cfg))
    half = torch.zeros(16, 16, dtype=torch.bool)
    half[:, ::2] = True                          # share 1/2 in every sequence
    force_routing(sparse, half)
    s = measure_forward_flops(sparse, 16, 16, V)
    assert s["forward"] < base["forward"]
    d = 16
    # router 2d per token, the mixer's products and BK-Core on half of the tokens
    per_token = 2 * d + (2 * d + 10 + 4 * d) / 2
    assert s["by_component"]["mixer"] == 4 * 16 * 16 * per_token


def test_block_routing_counts_the_feed_forward_and_mixer_flops_of_the_routed_share():
    # one expert and shares that keep every row count a multiple of 16: no padding, exact
    B = T = 16
    model, _ = built(config(use_sparse_bk=True, num_experts=1, top_k=1, batch_size=B))

    def counted(pattern):
        hooks = force_routing(model, pattern)
        try:
            return measure_forward_flops(model, B, T, V)["by_component"]
        finally:
            for h in hooks:
                h.remove()
    none = counted(torch.zeros(B, T, dtype=torch.bool))
    every = counted(torch.ones(B, T, dtype=torch.bool))
    with sbk.dense_mixers(model):
        plain = measure_forward_flops(model, B, T, V)["by_component"]
    assert every["feed_forward"] == plain["feed_forward"] and every["mixer"] == plain["mixer"]
    moe_plain = plain["feed_forward"] - none["feed_forward"]   # none: the LayerNorm alone
    assert moe_plain > 0.9 * plain["feed_forward"]
    assert none["mixer"] * T == plain["mixer"]      # nothing routed: one padding site a chain
    for stride in (2, 4):      # share 1/2, 1/4 of every sequence
        pattern = torch.zeros(B, T, dtype=torch.bool)
        pattern[:, ::stride] = True
        got = counted(pattern)
        assert (got["feed_forward"] - none["feed_forward"]) * stride == moe_plain
        assert got["mixer"] * stride == plain["mixer"]


# --- training, records, resume -------------------------------------------------------------

def test_training_records_what_each_flag_measured():
    t = trainer(config(use_multi_scale=True, multi_scale_factor=2, use_sparse_bk=True,
                       sparse_bk_target_share=0.5))
    outcome = t.fit()
    rec = t.flags.record(t.context, outcome)
    ms = rec["use_multi_scale"]["measured"]
    assert ms["positions_per_block"] == [16, 8, 8, 16]
    assert ms["forward_flops"]["with"] < ms["forward_flops"]["without"]
    assert ms["eval_forward_ms"]["with"] > 0
    sp = rec["use_sparse_bk"]["measured"]
    assert rec["use_sparse_bk"]["settings"]["target_share"] == 0.5
    assert sp["train"]["steps"] == 6 and 0 < sp["train"]["share"] < 1
    assert 0 <= sp["held_out"]["share"] <= 1 and sp["held_out"]["windows"] == 2
    assert all(p <= 16 for p in sp["held_out"]["padded_length_per_layer"])
    assert sp["held_out"]["positions_per_layer"] == [16, 8, 8, 16]
    assert sp["forward_flops"]["mixer_with"] < sp["forward_flops"]["mixer_without"]
    assert sp["forward_flops"]["feed_forward_with"] < sp["forward_flops"]["feed_forward_without"]
    assert "held-out tokens" in sp["forward_flops"]["how"]
    assert sp["term_per_epoch"] and sp["router_parameters"] == 4 * 17


def test_checkpoint_resume_is_bit_identical_with_both_flags_on(tmp_path):
    corpus = make_corpus(vocab_size=V, n_train=2000, n_eval=300)
    cfg = config(use_multi_scale=True, use_sparse_bk=True, checkpoint_every=3, max_steps=8)
    ref = trainer(cfg, corpus, run_dir=tmp_path / "ref")
    out_ref = ref.fit()

    t = trainer(cfg, corpus, run_dir=tmp_path / "cut")
    hook = t.flags.after_optimizer_step

    def interrupt_at_step_5(run, terms):
        hook(run, terms)
        if run.progress.step + 1 == 5:
            os.kill(os.getpid(), signal.SIGTERM)
    t.flags.after_optimizer_step = interrupt_at_step_5
    with pytest.raises(TrainingInterrupted):
        t.fit()
    resumed = trainer(cfg, corpus, run_dir=tmp_path / "cut", resume=True)
    out = resumed.fit()
    assert out.resumed_from_step == 5
    assert out.step_losses == out_ref.step_losses
    assert out.test.total_nll == out_ref.test.total_nll
    for a, b in zip(resumed.model.state_dict().items(), ref.model.state_dict().items()):
        assert a[0] == b[0] and torch.equal(a[1], b[1]), a[0]
    rec_a = resumed.flags.record(resumed.context, out)["use_sparse_bk"]["measured"]
    rec_b = ref.flags.record(ref.context, out_ref)["use_sparse_bk"]["measured"]
    for key in ("train", "held_out", "term_per_epoch", "forward_flops"):
        assert rec_a[key] == rec_b[key], key
