"""use_act and use_early_exit (issue 11): each test fails if its flag were a no-op or masked
work instead of skipping it."""

import math
import os
import signal

import pytest
import torch
import torch.nn.functional as F

from bkbench.audit import audit_causality
from bkbench.config import BenchmarkConfig
from bkbench.flags import build_model
from bkbench.metrics.flops import measure_forward_flops
from bkbench.models.layers.early_exit import with_exits
from bkbench.train import Trainer, TrainingInterrupted, seed_everything

from conftest import make_corpus

V = 32
L = 3
B, N = 4, 16


def config(**changes):
    base = dict(model_name="resnet_bk_t", d_model=16, n_layers=L, n_heads=2, n_seq=N,
                batch_size=8, epochs=0, max_steps=6, lr=3e-3, warmup_steps=1,
                eval_batch_size=16, seed=3, dropout=0.1, num_experts=4, act_record_windows=2,
                early_exit_calibration_windows=2, early_exit_record_windows=2)
    return BenchmarkConfig.from_dict({**base, **changes}).validate()


def built(cfg):
    seed_everything(cfg.seed)
    return build_model(cfg, V)


def trainer(cfg, corpus=None, **kw):
    model, flags = built(cfg)
    corpus = corpus or make_corpus(vocab_size=V, n_train=2000, n_eval=300)
    return Trainer(cfg, model, corpus, torch.device("cpu"), progress=False, flags=flags, **kw)


def tokens(batch=B, seq=N, seed=1):
    idx = torch.randint(0, V, (batch, seq + 1), generator=torch.Generator().manual_seed(seed))
    return idx[:, :-1], idx[:, 1:]


def moe_rows(model, run):
    """Rows entering each layer's MoE (its input buffer, padding included) during ``run()``."""
    seen = {}
    hooks = [b.moe.register_forward_hook(
        lambda m, args, out, i=i: seen.setdefault(i, []).append(args[0].reshape(-1, args[0].shape[-1]).shape[0]))
        for i, b in enumerate(model.blocks)]
    try:
        run()
    finally:
        for h in hooks:
            h.remove()
    return [sum(seen.get(i, [])) for i in range(len(model.blocks))]


# --- use_act -------------------------------------------------------------------------------

def test_act_changes_the_output_and_adds_a_ponder_term_with_a_gradient():
    inputs, targets = tokens()
    plain, _ = built(config())
    on = trainer(config(use_act=True, moe_balance_weight=0.0))
    plain.eval(), on.model.eval()
    with torch.no_grad():
        assert not torch.equal(plain(inputs), on.model(inputs))
    on.model.train()
    loss, terms = on.compute_loss(inputs, targets)
    assert "ponder" in terms and terms["ponder"].item() > 0
    unit = on.model.flag_modules["act"].units[0].bias
    grad_task, = torch.autograd.grad(terms["cross_entropy_sum"], [unit], retain_graph=True)
    grad_ponder, = torch.autograd.grad(terms["ponder"], [unit])
    assert grad_task.abs().sum() > 0 and grad_ponder.abs().sum() > 0


def test_act_halting_after_layer_1_runs_only_layer_1s_feed_forward():
    t = trainer(config(use_act=True, act_bias_init=10.0))
    inputs, targets = tokens()
    t.model.train()
    rows = moe_rows(t.model, lambda: t.compute_loss(inputs, targets)[0].backward())
    assert rows == [B * N, 0, 0]
    assert torch.equal(t.model.flag_modules["act"].last_layers, torch.ones(B * N, dtype=torch.long))
    # and the counted forward FLOPs fall accordingly, against the plain model
    plain, _ = built(config())
    fl_plain = measure_forward_flops(plain, B, N, V)["by_component"]["feed_forward"]
    fl_act = measure_forward_flops(t.model, B, N, V)["by_component"]["feed_forward"]
    assert fl_act == pytest.approx(fl_plain / L, rel=1e-9)


def test_act_starts_at_full_depth_and_records_it():
    """At the default initialisation every token runs every layer at step 1 (and keeps its
    feed-forward rows); the record says so. bias 0 would halt most tokens after 2 layers."""
    t = trainer(config(use_act=True, max_steps=2))
    inputs, targets = tokens()
    t.model.train()
    rows = moe_rows(t.model, lambda: t.compute_loss(inputs, targets)[0].backward())
    assert rows == [B * N] * L
    assert torch.equal(t.model.flag_modules["act"].last_layers, torch.full((B * N,), L))
    outcome = t.fit()
    rec = t.flags.record(t.context, outcome)["use_act"]["measured"]
    first = rec["train_first_step"]
    assert first["mean_layers_used"] == L and first["tokens"] == 8 * 16
    assert first["layers_used_histogram"] == {**{str(i): 0 for i in range(1, L)}, str(L): 8 * 16}


def test_act_with_mixed_halting_gathers_the_running_rows_only():
    model, _ = built(config(use_act=True, act_bias_init=0.0))   # halting after 2 or 3 layers
    model.eval()
    inputs, _ = tokens()
    rows = moe_rows(model, lambda: model(inputs))
    used = model.flag_modules["act"].last_layers
    running_at_3 = int((used == 3).sum())
    assert 0 < running_at_3 < B * N
    assert rows[:2] == [B * N, B * N] and rows[2] == running_at_3 + (-running_at_3 % 16)
    assert model.last_rows_per_layer == [B * N, B * N, running_at_3]


# --- use_early_exit --------------------------------------------------------------------------

def layer_states(model, inputs):
    """The states x_0 (embeddings) .. x_L of a plain forward of ``inputs``."""
    states = []
    hooks = [model.blocks[0].register_forward_pre_hook(lambda m, a: states.append(a[0]))]
    hooks += [b.register_forward_hook(lambda m, a, out: states.append(out)) for b in model.blocks]
    try:
        model(inputs)
    finally:
        for h in hooks:
            h.remove()
    return states


def cosine(a, b):
    a, b = a.reshape(-1, a.shape[-1]).double(), b.reshape(-1, b.shape[-1]).double()
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))


def median_saturation_threshold(model, inputs):
    """A threshold that about half of the tokens reach after layer 1 (mixed exits)."""
    model.eval()
    with torch.no_grad():
        x = layer_states(model, inputs)
    c = cosine(x[1], x[0]).sort().values
    k = c.numel() // 2
    return float((c[k - 1] + c[k]) / 2)   # between two tokens: no token sits on it


def test_early_exit_threshold_minus_1_exits_at_layer_1_and_above_1_never():
    model, flags = built(config(use_early_exit=True))
    inputs, _ = tokens()
    full, never = with_exits(model, math.inf)
    first, always = with_exits(model, -1.0)
    for m in (full, first):
        m.eval()
    with torch.no_grad():
        rows_never = moe_rows(model, lambda: full(inputs))
        out_never = full(inputs)
        rows_always = moe_rows(model, lambda: first(inputs))
        out_always = first(inputs)
        model.eval()
        out_plain = model(inputs)
        x = layer_states(model, inputs)
    assert rows_never == [B * N] * L and rows_always == [B * N, 0, 0]
    assert never.histogram.tolist()[-1] == 2 * B * N and never.histogram[:-1].sum() == 0
    assert always.histogram[0] == 2 * B * N and always.histogram[1:].sum() == 0
    assert torch.equal(out_never, out_plain)       # no exit: the full model, bit for bit
    # the exit at layer 1 predicts from layer 1's state through the final norm and head
    assert torch.allclose(out_always, model.lm_head(model.ln_f(x[1])), atol=1e-6)
    assert not torch.allclose(out_always, out_plain, atol=1e-3)
    # prepare_for_eval switches exits on at the model's threshold; the training model never exits
    evaluated = flags.prepare_for_eval(model)
    assert evaluated is not model and model.depth_policies == []
    assert evaluated.depth_policies[-1].threshold == math.inf   # uncalibrated: no exit


def test_a_token_exits_where_its_state_saturates():
    """Mixed exits: exactly the tokens whose cos(x_1, x_0) reaches the threshold exit after
    layer 1, and only the running rows enter layer 2's feed-forward."""
    model, _ = built(config(use_early_exit=True))
    inputs, _ = tokens()
    threshold = median_saturation_threshold(model, inputs)
    evaluated, policy = with_exits(model, threshold)
    evaluated.eval()
    with torch.no_grad():
        x = layer_states(model, inputs)
        rows = moe_rows(model, lambda: evaluated(inputs))
        out = evaluated(inputs)
    exits_1 = cosine(x[1], x[0]) >= threshold
    assert 0 < int(exits_1.sum()) < B * N
    assert policy.histogram[0] == 2 * int(exits_1.sum())      # two forwards
    running = B * N - int(exits_1.sum())
    assert rows[1] == running + (-running % 16)      # gathered rows, padded to 16
    # an exited token's prediction is that of its layer-1 state
    flat = out.reshape(B * N, -1)
    exit_1 = model.lm_head(model.ln_f(x[1])).reshape(B * N, -1)
    assert torch.allclose(flat[exits_1], exit_1[exits_1], atol=1e-5)


def test_the_exits_term_is_the_depth_weighted_loss_of_each_earlier_exit(monkeypatch):
    """The oracle: exits n = 1..L-1 (not the last layer), each on its own disjoint sampled
    rows, cross-entropy through the final norm and the LM head, weighted n / (1 + ... + L-1)."""
    import bkbench.flags.early_exit as flag_module
    weight, share = 0.7, 0.25
    t = trainer(config(use_early_exit=True, moe_balance_weight=0.0, early_exit_weight=weight,
                       early_exit_positions=share, dropout=0.0))
    sampled = []

    def spy(*args):
        rows = real(*args)
        sampled.append(rows)
        return rows
    real = flag_module.sampled_exit_rows
    monkeypatch.setattr(flag_module, "sampled_exit_rows", spy)
    inputs, targets = tokens()
    t.model.train()
    loss, terms = t.compute_loss(inputs, targets)
    rows, = sampled
    assert len(rows) == L - 1
    assert all(r.numel() == round(share * B * N / (L - 1)) for r in rows)
    assert torch.cat(rows).unique().numel() == sum(r.numel() for r in rows)   # disjoint
    x = layer_states(t.model, inputs)
    expected = 0.0
    for n, r in enumerate(rows, start=1):
        logits = t.model.lm_head(t.model.ln_f(x[n].reshape(B * N, -1)[r]))
        expected += n / (L * (L - 1) / 2) * F.cross_entropy(logits, targets.reshape(-1)[r])
    assert torch.allclose(terms["exits"], weight * expected, rtol=1e-5, atol=1e-6)
    # the exit of layer 1 trains layer 1 (and the shared head)
    w = dict(t.model.named_parameters())["blocks.0.moe.experts.0.fc.weight"]
    grad, = torch.autograd.grad(terms["exits"], [w])
    assert grad.abs().sum() > 0


@pytest.mark.parametrize("world", [2, 3])
def test_a_shards_exit_rows_are_the_global_choice_restricted_to_the_shard(world):
    """Under DDP rank r holds samples r, r + world, ... of the global batch: its exit rows are
    exactly the globally sampled rows that fall in those samples, in the global order."""
    from bkbench.models.layers.early_exit import sampled_exit_rows, shard_rows
    batch, seq = 5, 7
    rows = sampled_exit_rows(batch * seq, 2, 0.6, torch.Generator().manual_seed(4))
    for exit_rows in rows:
        covered = []
        for rank in range(world):
            samples = range(batch)[rank::world]
            local = shard_rows(exit_rows, samples, batch, seq)
            as_global = torch.tensor([samples[int(i) // seq] * seq + int(i) % seq for i in local],
                                     dtype=torch.long)
            expected = exit_rows[torch.isin(exit_rows // seq, torch.tensor(list(samples)))]
            assert torch.equal(as_global, expected)
            covered.append(as_global)
        assert torch.equal(torch.cat(covered).sort().values, exit_rows.sort().values)


def test_the_shards_exits_terms_add_up_to_the_global_batchs():
    """The exits term of each shard of a global batch (keyed by its samples' global positions,
    as each rank's step is) adds up to the term of the whole batch in one process: the
    positions are sampled over the global batch, and each shard's NLL sum is divided by the
    global count. Sampled per shard, as before, they did not (and 2 ranks trained otherwise
    than one process from step 2)."""
    from bkbench.models.dropout import dropout_key
    t = trainer(config(use_early_exit=True, moe_balance_weight=0.0, early_exit_positions=0.25,
                       dropout=0.0, batch_size=5))
    inputs, targets = tokens(batch=5)
    t.model.train()
    t.progress.step = 3
    with torch.no_grad(), dropout_key(3, 3, range(5), 5):
        whole = t.compute_loss(inputs, targets)[1]["exits"]
    shards = []
    for samples in (range(0, 5, 2), range(1, 5, 2)):
        with torch.no_grad(), dropout_key(3, 3, samples, 5):
            shards.append(t.compute_loss(inputs[samples.start::2], targets[samples.start::2])[1]["exits"])
    assert torch.allclose(sum(shards), whole, rtol=1e-5)
    assert all(s < whole for s in shards)   # each shard holds a part of the sampled rows


def test_calibration_keeps_the_lowest_threshold_before_the_first_failure():
    """CALM's fixed sequence on the validation windows: highest threshold first, stop at the
    first whose perplexity exceeds full depth's by more than the tolerance."""
    from types import SimpleNamespace
    from bkbench.flags.early_exit import EarlyExit
    cfg = config(use_early_exit=True, early_exit_candidates="0.9,0.99,0.5,0.7",
                 early_exit_tolerance=0.1, early_exit_calibration_windows=3)
    model, flags = built(cfg)
    flag = flags.flags["use_early_exit"]
    assert isinstance(flag, EarlyExit)
    ppl = {math.inf: 10.0, 0.99: 10.5, 0.9: 10.9, 0.7: 11.5, 0.5: 10.2}   # 0.5 comes after a failure
    valid, test = torch.arange(200) % V, torch.arange(200) % 7
    seen = []

    def evaluate(m, stream):
        threshold = m.depth_policies[-1].threshold if m.depth_policies else math.inf
        seen.append((threshold, stream))
        return SimpleNamespace(perplexity=ppl[threshold])
    run = SimpleNamespace(model=model, data=SimpleNamespace(valid=valid, test=test),
                          evaluate=evaluate)
    result = flag.calibrate(run)
    assert [s[0] for s in seen] == [math.inf, 0.99, 0.9, 0.7]
    assert all(torch.equal(s[1], valid[:3 * N]) for s in seen)    # validation, never test
    assert result["chosen"] == 0.9 and float(model.early_exit_threshold) == 0.9
    assert flags.prepare_for_eval(model).depth_policies[-1].threshold == 0.9
    ppl[0.7] = 10.4                                               # now every candidate passes
    seen.clear()
    assert flag.calibrate(run)["chosen"] == 0.5


# --- causality, resume, record ---------------------------------------------------------------

@pytest.mark.parametrize("flags", [["use_act"], ["use_early_exit"], ["use_act", "use_early_exit"]],
                         ids=lambda f: "+".join(f))
def test_audit_is_causal_with_the_flags_in_train_and_eval_mode(flags):
    model, fl = built(config(**{f: True for f in flags}))
    audit = audit_causality(model, V, seq_len=N, num_sequences=4)
    assert audit.causal, audit.max_leak
    evaluated = fl.prepare_for_eval(model)
    if "use_early_exit" in flags:   # a threshold that makes some tokens exit and others not
        threshold = median_saturation_threshold(model, tokens()[0])
        evaluated, policy = with_exits(model, threshold)
    audit = audit_causality(evaluated, V, seq_len=N, num_sequences=4)
    assert audit.causal, audit.max_leak
    if "use_early_exit" in flags:
        assert 0 < policy.histogram[0] < policy.histogram.sum()   # exits were mixed


def test_checkpoint_resume_is_bit_identical_with_act_and_early_exit(tmp_path):
    corpus = make_corpus(vocab_size=V, n_train=2000, n_eval=300)
    cfg = config(use_act=True, use_early_exit=True, checkpoint_every=3, max_steps=8)
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
    rec_a, rec_b = resumed.flags.record(resumed.context, out), ref.flags.record(ref.context, out_ref)
    assert rec_a["use_act"]["measured"]["train_per_epoch"] == rec_b["use_act"]["measured"]["train_per_epoch"]
    assert (rec_a["use_early_exit"]["measured"]["exits_term_per_epoch"]
            == rec_b["use_early_exit"]["measured"]["exits_term_per_epoch"])


def test_smoke_run_records_what_the_flags_measured(tmp_path):
    # halting bias 0: tokens halt early, so the held-out FLOPs must show the saving
    t = trainer(config(use_act=True, use_early_exit=True, act_bias_init=0.0,
                       early_exit_candidates="0.9,-1", early_exit_tolerance=1e9),
                run_dir=tmp_path)
    outcome = t.fit()
    rec = t.flags.record(t.context, outcome)
    act = rec["use_act"]["measured"]
    assert act["train_last_epoch"]["tokens"] == 6 * 8 * N
    assert 1 <= act["train_last_epoch"]["mean_layers_used"] <= L
    held = act["held_out"]
    assert held["tokens"] == 2 * N and 1 <= held["mean_layers_used"] <= L
    assert held["forward_flops_counted"]["act"] <= held["forward_flops_counted"]["all_layers"]
    ee = rec["use_early_exit"]["measured"]
    assert ee["test_perplexity_early_exit"] == outcome.test.perplexity
    assert ee["test_exits"]["tokens"] == outcome.test.num_tokens
    # every exit passes the tolerance: the calibration keeps the lowest candidate, -1, so every
    # token exits after layer 1, on validation and on test
    assert ee["threshold"] == -1.0 and ee["calibrations"][-1]["chosen"] == -1.0
    assert ee["test_exits"]["mean_exit_layer"] == 1.0
    held = ee["held_out_with_and_without"]
    assert held["tokens"] == 2 * N
    assert held["mean_layers_used"] == {"with": 1.0, "without": float(L)}
    # the same text evaluated both ways: exits change the perplexity and skip later layers' MoE
    assert held["perplexity"]["with"] != held["perplexity"]["without"]
    flops = held["eval_flops_per_token"]
    assert 0 < flops["with"] < flops["without"]
    lines = (tmp_path / "train_log.jsonl").read_text()
    assert "term_ponder" in lines and "term_exits" in lines


PART1 = ["use_analytic_gradient", "use_koopman", "use_physics_informed", "use_quantization",
         "use_pruning", "use_mixed_precision"]


@pytest.mark.slow
def test_with_every_part_1_flag_too_audit_is_causal_and_a_run_records(tmp_path):
    cfg = config(**{f: True for f in PART1 + ["use_act", "use_early_exit"]},
                 analytic_gradient_timing_repeats=1, mixed_precision_timing_steps=1,
                 koopman_record_windows=2, physics_informed_record_windows=2,
                 pruning_frequency=2, pruning_expert_min_share=0.3)
    model, fl = built(cfg)
    with fl.autocast(torch.device("cpu")):
        assert audit_causality(model, V, seq_len=N, num_sequences=4).causal
        assert audit_causality(fl.prepare_for_eval(model), V, seq_len=N, num_sequences=4).causal
    t = trainer(cfg, run_dir=tmp_path)
    outcome = t.fit()
    rec = t.flags.record(t.context, outcome)
    assert set(rec) == set(PART1 + ["use_act", "use_early_exit"])
    assert rec["use_act"]["measured"]["held_out"]["mean_layers_used"] >= 1
    assert rec["use_early_exit"]["measured"]["calibrations"]
