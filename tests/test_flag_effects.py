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
from bkbench.ops.lm_loss.head import current_weight
from bkbench.train import Trainer, TrainingInterrupted, seed_everything

from conftest import make_corpus

V = 32
FIVE = ["use_koopman", "use_physics_informed", "use_quantization", "use_pruning",
        "use_mixed_precision"]
ALL = FIVE + ["use_analytic_gradient"]


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
    assert set(plain.compute_loss(*tokens())[1]) == {"cross_entropy_sum"}


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


def test_pruning_reaches_the_target_sparsity_and_removes_experts(tmp_path):
    cfg = config(use_pruning=True, pruning_frequency=2, pruning_expert_min_share=0.3,
                 pruning_target_sparsity=0.6)
    t = trainer(cfg)
    params_before = t.model.num_parameters()
    experts_before = [len(b.moe.experts) for b in t.model.blocks]
    outcome = t.fit()
    rec = t.flags.record(t.context, outcome)["use_pruning"]["measured"]
    for name, module in t.flags["use_pruning"].layers.items():
        zeros = (module.weight_mask == 0).sum().item()
        assert zeros == round(0.6 * module.weight_mask.numel()), name
        # the weight its next forward (or the fused LM loss) multiplies by; an LM head that
        # only runs fused never runs the pre-hook that refreshes its ``weight`` attribute
        weight = current_weight(module)
        assert torch.equal(weight == 0, module.weight_mask == 0) or \
            (weight[module.weight_mask == 0] == 0).all()
    assert rec["sparsity_pruned_layers"] == pytest.approx(0.6, abs=1e-3)
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
    cfg = config(**{f: True for f in flags})
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
    cfg = config(**{f: True for f in ALL}, checkpoint_every=3, pruning_frequency=2,
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
