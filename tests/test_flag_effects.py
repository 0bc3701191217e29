"""The flags of issue 10 change what runs: each test fails if its flag were a no-op."""

import dataclasses
import os
import signal

import pytest
import torch
import torch.nn as nn

from bkbench.audit import audit_causality
from bkbench.cli import main
from bkbench.compression.quantization import (IntLinear, QATLinear, integer_model, pack_int4,
                                              unpack_int4, weight_scale)
from bkbench.config import BenchmarkConfig
from bkbench.flags import REGISTRY, build_model
from bkbench.flags import registry as flag_registry
from bkbench.train import Trainer, TrainingInterrupted, seed_everything

from conftest import make_corpus

V = 32
FIVE = ["use_koopman", "use_physics_informed", "use_quantization", "use_pruning",
        "use_mixed_precision"]
ALL = list(REGISTRY)   # all twelve flags: what resnet_bk_full turns on
assert len(ALL) == 12


def config(arch="resnet_bk", **changes):
    base = dict(model_name=f"{arch}_t", d_model=16, n_layers=2, n_heads=2, n_seq=16,
                batch_size=8, epochs=0, max_steps=8, lr=3e-3, warmup_steps=1,
                eval_batch_size=16, seed=3, dropout=0.1, num_experts=4,
                analytic_gradient_timing_repeats=1, mixed_precision_timing_steps=1,
                koopman_record_windows=2, physics_informed_record_windows=2)
    return BenchmarkConfig.from_dict({**base, **changes}).validate()


def built(cfg):
    seed_everything(cfg.seed)
    return build_model(cfg, V)


def trainer(cfg, corpus=None, **kw):
    model, flags = built(cfg)
    corpus = corpus or make_corpus(vocab_size=V, n_train=2000, n_eval=300)
    return Trainer(cfg, model, corpus, torch.device("cpu"), progress=False, flags=flags, **kw)


def tokens(batch=4, seq=16, seed=1):
    idx = torch.randint(0, V, (batch, seq + 1), generator=torch.Generator().manual_seed(seed))
    return idx[:, :-1], idx[:, 1:]


@pytest.mark.parametrize("flag,term,owner", [
    ("use_koopman", "koopman", "flag_modules.koopman.operator.weight"),
    ("use_physics_informed", "physics_energy", "blocks.0.moe.experts.0.fc.weight"),
])
def test_objective_term_is_in_the_loss_with_a_gradient(flag, term, owner):
    t = trainer(config(**{flag: True, "moe_balance_weight": 0.0}))
    t.model.train()
    loss, terms = t.compute_loss(*tokens())
    assert term in terms and terms[term].item() > 0
    params = dict(t.model.named_parameters())
    # the term reaches its own parameters and the language model itself (through its states)
    grad, grad_lm = torch.autograd.grad(terms[term], [params[owner], params["blocks.0.ln.weight"]],
                                        allow_unused=True)
    assert grad is not None and grad.abs().sum() > 0
    assert grad_lm is not None and grad_lm.abs().sum() > 0
    plain = trainer(config(moe_balance_weight=0.0))
    assert set(plain.compute_loss(*tokens())[1]) == {"cross_entropy_sum", "cross_entropy_per_window"}


def test_energy_drift_is_relative_to_the_state_it_changes():
    """Oracle: a layer that scales every state by c changes E by c^2, so its relative drift is
    |c^2 - 1| whatever the states' scale; an absolute drift would grow with the scale."""
    from bkbench.objectives.physics_informed import energy_drift
    h0 = torch.randn(2, 5, 8)
    for scale in (0.1, 1.0, 30.0):
        states = torch.stack([scale * h0, 1.5 * scale * h0, 1.5 * 0.8 * scale * h0])
        drift = energy_drift(states)
        expected = torch.tensor([1.5 ** 2 - 1, 1 - 0.8 ** 2])
        assert torch.allclose(drift, expected, rtol=1e-5), scale
    # per position, then averaged: a position whose state does not change has no drift
    states = torch.stack([h0, h0.clone()])
    states[1, 0, 0] *= 2
    assert torch.allclose(energy_drift(states), torch.tensor([3.0 / 10]), rtol=1e-5)


@pytest.mark.parametrize("flag,term", [("use_koopman", "koopman"),
                                       ("use_physics_informed", "physics_energy")])
def test_objective_weight_warms_up_linearly(flag, term):
    short = flag.removeprefix("use_")
    t = trainer(config(**{flag: True, f"{short}_weight": 0.2, f"{short}_warmup": 0.5}))
    seen = []
    hook = t.flags.after_optimizer_step

    def spy(run, terms):
        hook(run, terms)
        f = t.flags[flag]
        seen.append((f.last["weight"], terms[term].item()))
    t.flags.after_optimizer_step = spy
    t.fit()
    # 8 steps, warm-up 0.5: the weight is 0.2 x (t + 1) / 4 for t < 4, then 0.2
    expected = [0.2 * min(1.0, (s + 1) / 4) for s in range(8)]
    assert [w for w, _ in seen] == pytest.approx(expected)
    assert all(v > 0 for _, v in seen)
    if flag == "use_koopman":   # the term is the weight times the raw loss
        f = t.flags[flag]
        assert f.last["term"] == pytest.approx(0.2 * f.last["raw"], rel=1e-6)


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_weights_lie_on_the_grid_and_evaluation_uses_integers(bits):
    cfg = config(use_quantization=True, quantization_bits=bits)
    model, flags = built(cfg)
    qat = [m for m in model.modules() if isinstance(m, QATLinear)]
    assert qat and not any(isinstance(m, nn.Linear) for m in model.modules())
    qmax = 2 ** (bits - 1) - 1
    lin = model.blocks[0].moe.experts[0].fc
    seen = {}
    handle = torch.nn.functional.linear
    def spy(x, w, b=None):
        seen["w"], seen["x"] = w, x
        return handle(x, w, b)
    torch.nn.functional.linear = spy
    try:
        lin(torch.randn(5, 16))
    finally:
        torch.nn.functional.linear = handle
    scale = weight_scale(lin.weight, bits)
    grid = seen["w"] / scale[:, None]
    assert torch.allclose(grid, grid.round(), atol=1e-4) and grid.abs().max() <= qmax + 1e-4
    assert not torch.allclose(seen["w"], lin.weight)          # really quantized
    x_grid = seen["x"] / (seen["x"].abs().amax(-1, keepdim=True) / 127)
    assert torch.allclose(x_grid, x_grid.round(), atol=1e-3)

    evaluated = flags.prepare_for_eval(model)
    ints = [m for m in evaluated.modules() if isinstance(m, IntLinear)]
    assert len(ints) == len(qat) and not any(isinstance(m, nn.Linear) for m in evaluated.modules())
    for m in ints:
        w = m.int_weight()
        assert w.dtype == torch.int8 and w.abs().max() <= qmax
        assert not any(p.is_floating_point() and p.dim() == 2 for p in m.buffers()
                       if p is not m.weight_scale), "no float weight matrix may remain"
    # the integer layer computes int8 x int8 exactly: compare with an int64 oracle
    m = ints[0]
    x = torch.randn(7, m.in_features)
    s = x.abs().amax(-1, keepdim=True) / 127
    xi = torch.clamp(torch.round(x / s), -127, 127).long()
    oracle = (xi @ m.int_weight().long().t()).double() * s.double() * m.weight_scale.double()
    if m.bias is not None:
        oracle = oracle + m.bias.double()
    assert torch.allclose(m(x).double(), oracle, rtol=1e-6, atol=1e-6)
    assert audit_causality(evaluated, V, seq_len=16, modes=("eval",)).causal


def test_quantization_records_integer_against_float_evaluation_on_the_same_text():
    from bkbench.compression.quantization import float_model
    t = trainer(config(use_quantization=True, quantization_bits=4, quantization_record_windows=2))
    outcome = t.fit()
    rec = t.flags.record(t.context, outcome)["use_quantization"]["measured"]
    held = rec["integer_against_float32"]
    stream = t.data.test[:2 * 16]
    assert held["tokens"] == stream.numel()
    plain = float_model(t.model)
    assert not any(isinstance(m, QATLinear) for m in plain.modules())
    assert held["perplexity"]["float32"] == t.evaluate(plain, stream).perplexity
    assert held["perplexity"]["integer"] == t.evaluate(integer_model(t.model), stream).perplexity
    assert held["perplexity"]["integer"] != held["perplexity"]["float32"]   # 4 bits change it
    assert held["eval_seconds"]["integer"] > 0 and held["eval_seconds"]["float32"] > 0
    assert "storage only" in rec["int4"]


def test_int4_packing_roundtrip():
    q = torch.randint(-7, 8, (5, 9), dtype=torch.int8)
    packed = pack_int4(q)
    assert packed.dtype == torch.uint8 and packed.shape == (5, 5)
    assert torch.equal(unpack_int4(packed, 9), q)


def test_torch_ao_dynamic_quantization_would_leak_the_future():
    """Why the integer model does not use quantize_dynamic: one activation scale per batch."""
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dyn = torch.ao.quantization.quantize_dynamic(nn.Sequential(nn.Linear(16, 8)),
                                                     {nn.Linear}, dtype=torch.qint8)
    x = torch.randn(4, 16)
    later = x.clone()
    later[3] *= 10      # only the last row (a later token) changes
    assert not torch.equal(dyn(x)[:3], dyn(later)[:3])
    ours = IntLinear(QATLinear(nn.Linear(16, 8), 8))
    assert torch.equal(ours(x)[:3], ours(later)[:3])


def test_weight_pruning_folds_masks_into_the_weights_and_removes_experts(tmp_path):
    cfg = config(use_pruning=True, pruning_structure="weights", pruning_frequency=2,
                 pruning_expert_min_share=0.3, pruning_target_sparsity=0.6, warmup_steps=3)
    t = trainer(cfg)
    params_before = t.model.num_parameters()
    experts_before = [len(b.moe.experts) for b in t.model.blocks]
    head_before = t.model.lm_head.weight.detach().clone()
    outcome = t.fit()
    rec = t.flags.record(t.context, outcome)["use_pruning"]["measured"]
    flag = t.flags["use_pruning"]
    assert flag.layers and all(n.startswith("blocks.") for n in flag.layers)
    for name, module in flag.layers.items():
        # the zeros are in the weight itself, and they are the mask's
        assert (module.weight == 0).sum().item() == round(0.6 * module.weight.numel()), name
        assert torch.equal(module.weight != 0, flag.masks[name]), name
    assert rec["sparsity_pruned_layers"] == pytest.approx(0.6, abs=1e-3)
    # no hook, no stored original or mask: the stored model is a plain one's
    assert not any("orig" in k or "mask" in k for k in t.model.state_dict())
    assert not any(m._forward_pre_hooks for m in t.model.modules())
    # the LM head is not pruned (it trained: it has no zero and changed)
    assert (t.model.lm_head.weight != 0).all() and not torch.equal(t.model.lm_head.weight,
                                                                     head_before)
    # the schedule starts after the 3 warm-up steps
    assert rec["schedule_window"]["t0"] == 3 and min(s["step"] for s in rec["schedule"]) > 3
    experts_after = [len(b.moe.experts) for b in t.model.blocks]
    assert sum(experts_after) < sum(experts_before)
    for b, n in zip(t.model.blocks, experts_after):
        assert b.moe.num_experts == n == b.moe.gate.weight.shape[0] == b.moe.gate.out_features
    assert t.model.num_parameters() < params_before
    assert rec["experts"]["experts_removed"] == sum(experts_before) - sum(experts_after)
    assert rec["experts"]["after"]["parameters"] < rec["experts"]["before"]["parameters"]
    # the optimizer holds exactly the model's parameters, and training ran past the removal
    in_opt = {id(p) for g in t.optimizer.param_groups for p in g["params"]}
    assert in_opt == {id(p) for p in t.model.parameters()}
    assert outcome.steps == 8 and rec["experts"]["step"] == 4


def test_weight_pruning_stores_what_an_unpruned_model_stores():
    from bkbench.compression.quantization import stored_bytes
    cfg = config(use_pruning=True, pruning_structure="weights", pruning_frequency=2,
                 pruning_expert_min_share=0.0, pruning_target_sparsity=0.5)
    t = trainer(cfg)
    t.fit()
    plain, _ = built(config())
    assert {k: v.shape for k, v in t.model.state_dict().items()} == \
        {k: v.shape for k, v in plain.state_dict().items()}
    assert stored_bytes(t.model) == stored_bytes(plain)


def test_hidden_unit_pruning_shrinks_the_matrices_and_their_flops():
    cfg = config(use_pruning=True, pruning_frequency=2, pruning_expert_min_share=0.0,
                 pruning_target_sparsity=0.5)
    t = trainer(cfg)
    outcome = t.fit()
    rec = t.flags.record(t.context, outcome)["use_pruning"]["measured"]
    hidden = 2 * cfg.d_model
    for block in t.model.blocks:
        for ex in block.moe.experts:
            assert ex.fc.weight.shape == (hidden // 2, cfg.d_model) == (ex.fc.out_features,
                                                                        ex.fc.in_features)
            assert ex.fc.bias.shape == (hidden // 2,)
            assert ex.proj.weight.shape == (cfg.d_model, hidden // 2) == (ex.proj.out_features,
                                                                          ex.proj.in_features)
    params = {"fc": cfg.d_model * hidden + hidden, "proj": hidden * cfg.d_model}
    removed = cfg.n_layers * cfg.num_experts * (params["fc"] + params["proj"]) // 2
    assert rec["unpruned"]["parameters"] - rec["pruned"]["parameters"] == removed
    assert rec["pruned"]["parameters"] == t.model.num_parameters()
    # the feed-forward FLOPs are the matrix products of the remaining units: half
    assert rec["pruned"]["feed_forward_flops"] < 0.55 * rec["unpruned"]["feed_forward_flops"]
    assert rec["forward_flops_ratio"] < 1 and rec["training_step"]["pruned_ms"] > 0
    in_opt = {id(p) for g in t.optimizer.param_groups for p in g["params"]}
    assert in_opt == {id(p) for p in t.model.parameters()}


def test_removing_units_without_output_leaves_the_network_unchanged():
    """Reference: a unit whose output column is zero contributes nothing, so removing exactly
    those units (they score 0) must give the same outputs; the optimizer's moments follow."""
    from bkbench.compression.pruning import prune_hidden_units
    from bkbench.models.resnet_bk import Expert
    torch.manual_seed(0)
    ex = Expert(8)
    dead = torch.tensor([1, 4, 6, 9, 15])
    with torch.no_grad():
        ex.proj.weight[:, dead] = 0
    opt = torch.optim.AdamW(ex.parameters())
    ex(torch.randn(3, 8)).sum().backward()
    opt.step()
    with torch.no_grad():
        ex.proj.weight[:, dead] = 0
    old_fc, moment = ex.fc.weight, opt.state[ex.fc.weight]["exp_avg"].clone()
    x = torch.randn(5, 8)
    expected = ex(x)
    prune_hidden_units(ex, 16 - len(dead), opt)
    keep = torch.tensor([i for i in range(16) if i not in dead.tolist()])
    assert ex.fc.weight is not old_fc                      # a new Parameter (DDP-safe)
    assert torch.allclose(ex(x), expected, atol=1e-6)
    assert torch.equal(opt.state[ex.fc.weight]["exp_avg"], moment[keep])
    assert {id(p) for p in opt.param_groups[0]["params"]} == {id(p) for p in ex.parameters()}


def test_mixed_precision_runs_the_model_in_bfloat16_and_the_bk_mixer_in_float32(monkeypatch):
    from bkbench.ops import lm_loss
    seen = {}

    def watch(name):
        def hook(module, args, out):
            seen.setdefault(name, out.dtype)
        return hook

    # the head runs fused with the loss (its module is never called): watch the dtype the
    # fused op computes its products in
    compute_dtype = lm_loss._compute_dtype

    def watched_compute_dtype(features, weight):
        dtype = compute_dtype(features, weight)
        seen.setdefault("head", dtype)
        return dtype

    monkeypatch.setattr(lm_loss, "_compute_dtype", watched_compute_dtype)
    t = trainer(config(use_mixed_precision=True))
    hooks = [t.model.blocks[0].moe.gate.register_forward_hook(watch("gate")),
             t.model.blocks[0].bk.register_forward_hook(watch("bk"))]
    t.model.train()
    t.compute_loss(*tokens())
    for h in hooks:
        h.remove()
    assert seen == {"head": torch.bfloat16, "gate": torch.bfloat16, "bk": torch.float32}
    plain = trainer(config())
    seen.clear()
    plain.compute_loss(*tokens())
    assert seen["head"] == torch.float32


def test_quantized_linears_compute_in_bfloat16_under_mixed_precision():
    """use_quantization with use_mixed_precision (as in resnet_bk_full): the fake-quantized
    products run in the autocast dtype, on grid values; alone, quantization stays float32."""
    seen = {}

    def watch(name):
        def hook(module, args, out):
            # the BK mixers stay float32 under the flag (their projections included)
            seen.setdefault("bk" if ".bk." in name else "rest", set()).add(out.dtype)
        return hook

    for mixed, dtype in ((True, torch.bfloat16), (False, torch.float32)):
        seen.clear()
        t = trainer(config(use_quantization=True, use_mixed_precision=mixed))
        qat = [(n, m) for n, m in t.model.named_modules() if isinstance(m, QATLinear)]
        hooks = [m.register_forward_hook(watch(n)) for n, m in qat]
        t.model.train()
        loss, _ = t.compute_loss(*tokens())
        for h in hooks:
            h.remove()
        assert seen == {"rest": {dtype}, "bk": {torch.float32}}
        qat = [m for _, m in qat]
        loss.backward()
        assert all(m.weight.grad is not None and m.weight.grad.dtype == torch.float32
                   for m in qat if m.weight.requires_grad)


@pytest.mark.slow
@pytest.mark.parametrize("flags", [[f] for f in FIVE] + [ALL], ids=lambda f: "+".join(f))
def test_audit_passes_with_each_flag_and_all_together(flags):
    cfg = config(**{f: True for f in flags}, n_layers=3)   # multi_scale needs a middle block
    model, fl = built(cfg)
    with fl.autocast(torch.device("cpu")):
        audit = audit_causality(model, V, seq_len=16)
    assert audit.causal, audit.max_leak
    evaluated = fl.prepare_for_eval(model)
    with fl.autocast(torch.device("cpu")):
        assert audit_causality(evaluated, V, seq_len=16, modes=("eval",)).causal


@pytest.mark.slow
def test_checkpoint_resume_is_bit_identical_with_all_flags_on(tmp_path):
    corpus = make_corpus(vocab_size=V, n_train=2000, n_eval=300)
    cfg = config(**{f: True for f in ALL}, n_layers=3, checkpoint_every=3, pruning_frequency=2,
                 pruning_expert_min_share=0.3, pruning_expert_prune_at=0.25)
    ref = trainer(cfg, corpus, run_dir=tmp_path / "ref")
    out_ref = ref.fit()

    t = trainer(cfg, corpus, run_dir=tmp_path / "cut")
    hook = t.flags.after_optimizer_step

    def interrupt_at_step_7(run, terms):
        hook(run, terms)
        if run.progress.step + 1 == 7:
            os.kill(os.getpid(), signal.SIGTERM)
    t.flags.after_optimizer_step = interrupt_at_step_7
    with pytest.raises(TrainingInterrupted):
        t.fit()
    resumed = trainer(cfg, corpus, run_dir=tmp_path / "cut", resume=True)
    out = resumed.fit()
    assert out.resumed_from_step == 7
    assert out.step_losses == out_ref.step_losses
    assert out.test.total_nll == out_ref.test.total_nll
    for a, b in zip(resumed.model.state_dict().items(), ref.model.state_dict().items()):
        assert a[0] == b[0] and torch.equal(a[1], b[1]), a[0]
    keep = ("use_koopman", "use_physics_informed", "use_pruning")
    rec_a, rec_b = resumed.flags.record(resumed.context, out), ref.flags.record(ref.context, out_ref)
    for rec in (rec_a, rec_b):   # a clock reading, not a function of the run
        del rec["use_pruning"]["measured"]["training_step"]
    for name in keep:
        assert rec_a[name] == rec_b[name], name


def test_incompatible_flags_exit_2_naming_both(monkeypatch, tmp_path, capsys):
    clash = dataclasses.replace(REGISTRY["use_koopman"], incompatible=("use_pruning",))
    monkeypatch.setitem(flag_registry.REGISTRY, "use_koopman", clash)
    code = main(["run", "--preset", "smoke", "--models", "resnet_bk_baseline", "--use-koopman",
                 "--use-pruning", "--output-dir", str(tmp_path / "o")])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert "use_koopman" in err and "use_pruning" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_inapplicable_flag_exits_2(monkeypatch, tmp_path, capsys):
    code = main(["run", "--preset", "smoke", "--models", "transformer_baseline",
                 "--use-analytic-gradient", "--output-dir", str(tmp_path / "o")])
    assert code == 2 and "applies to resnet_bk" in capsys.readouterr().err


def test_transformer_takes_the_flags_that_apply_to_it():
    cfg = config("transformer", **{f: True for f in FIVE})
    model, fl = built(cfg)
    with fl.autocast(torch.device("cpu")):
        assert audit_causality(model, V, seq_len=16).causal
    assert isinstance(model.lm_head, QATLinear)


def test_each_structural_prune_returns_the_freed_allocator_memory(monkeypatch):
    # each pruning step gives the feed-forward matrices (and their activations) new shapes;
    # without a trim the allocator keeps every old shape's freed blocks, and a 150-step
    # default-preset run peaked at 1215 MiB RSS against 810 MiB with it (the baseline's 780)
    import bkbench.train as train_mod

    trims, changes = [], []
    monkeypatch.setattr(train_mod, "release_freed_memory", lambda: trims.append(len(changes)))
    original = train_mod.Trainer.model_structure_changed

    def counted(self, reset_model_selection):
        changes.append(reset_model_selection)
        original(self, reset_model_selection)
    monkeypatch.setattr(train_mod.Trainer, "model_structure_changed", counted)
    t = trainer(config(use_pruning=True, pruning_frequency=2, pruning_target_sparsity=0.5,
                       pruning_expert_min_share=0.3, warmup_steps=1))
    t.fit()
    assert t.flags["use_pruning"].expert_record["experts_removed"] > 0
    assert len(changes) >= 3                                  # widths shrank, experts went
    assert trims == list(range(1, len(changes) + 1))          # one trim after each change
