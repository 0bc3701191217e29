"""FLOP counting: the counter against the analytic formulas, attribution, optimizer, state."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from bkbench.metrics import (analytic_transformer_flops, flops_result_fields,
                             measure_forward_flops, measure_step_flops, optimizer_flops)
from bkbench.metrics.flops import analytic_resnet_bk_flops
from bkbench.models import available_models, build_model

V, B, T = 300, 4, 32


def _head_forward_flops(tokens: int, vocab: int, d_model: int = 32) -> int:
    return 2 * tokens * d_model * vocab           # one multiply-add per (token, feature, word)


def _transformer(dropout=0.1, **kw):
    torch.manual_seed(0)
    cfg = dict(d_model=32, n_layers=2, n_heads=2, n_seq=T, dropout=dropout)
    cfg.update(kw)
    return build_model("transformer", V, **cfg)


def _close(a, b, tol=0.01):
    return abs(a - b) <= tol * abs(b)


@pytest.mark.parametrize("dropout", [0.1, 0.0])   # math SDPA kernel / CPU flash kernel
def test_transformer_matches_analytic(dropout):
    model = _transformer(dropout)
    r = measure_step_flops(model, B, T, V)
    an = analytic_transformer_flops(B, T, 32, 2, V)
    assert _close(r.forward, an["forward"])
    assert _close(r.backward, an["backward"])
    assert _close(r.backward, 2 * r.forward)           # backward of matmuls = 2 x forward
    for comp, expected in an["forward_by_component"].items():
        assert abs(r.forward_by_component[comp] - expected) <= 0.01 * an["forward"]
        assert abs(r.backward_by_component[comp] - 2 * expected) <= 0.01 * an["backward"]
    assert r.analytic is not None and abs(r.analytic["forward_rel_diff"]) < 0.01
    # attention is counted whichever kernel runs
    assert r.forward_by_component["mixer"] > 2 * 2 * T * 32 * B * T


def test_components_add_up_to_global_total():
    model = _transformer()
    r = measure_step_flops(model, B, T, V)
    assert sum(r.forward_by_component.values()) == r.forward
    assert sum(r.backward_by_component.values()) == r.backward
    assert sum(r.forward_by_op.values()) == r.forward
    assert r.total == r.forward + r.backward + r.optimizer
    assert sum(r.optimizer_by_component.values()) == r.optimizer
    # the LM head dominates even at this size; the embedding does no matmul
    assert r.forward_by_component["embedding"] == 0
    assert r.forward_by_component["lm_head"] == 2 * B * T * 32 * V


def test_uncounted_is_reported_not_added():
    r = measure_step_flops(_transformer(), B, T, V)
    unc = r.uncounted
    for kind in ("normalization", "softmax", "activation"):
        assert unc["forward"].get(kind, 0) > 0
    assert unc["total"] == unc["forward_total"] + unc["backward_total"]
    assert 0 < unc["fraction_of_counted"] < 1
    assert "LayerNorm" in unc["explanation"]
    assert r.forward == analytic_transformer_flops(B, T, 32, 2, V)["forward"]


def test_measurement_leaves_model_and_rng_alone():
    model = _transformer()
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    marker = torch.ones_like(model.lm_head.weight)
    model.lm_head.weight.grad = marker
    rng = torch.get_rng_state()
    measure_step_flops(model, B, T, V)
    assert not model.training and not any(m.training for m in model.modules())
    assert model.lm_head.weight.grad is marker
    assert all(p.grad is None for n, p in model.named_parameters() if n != "lm_head.weight")
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert torch.equal(torch.get_rng_state(), rng)


# Per-element cost of each op of torch's foreach AdamW step and clip_grad_norm_, counted here
# from what the op computes (the first list argument gives the elements): lerp_ m + w(g - m)
# 3, addcmul_ v + c*g*g 3, addcdiv_ p + c*m/d 3, norm square + sum 2, the rest 1.
_FOREACH_COST = {"_foreach_mul_": 1, "_foreach_add_": 1, "_foreach_lerp_": 3,
                 "_foreach_addcmul_": 3, "_foreach_sqrt": 1, "_foreach_div_": 1,
                 "_foreach_addcdiv_": 3, "_foreach_norm": 2}


class _ForeachCensus(TorchDispatchMode):
    """Element operations of the per-element foreach ops; per-tensor scalar work (step
    counters, bias corrections, the norm of the per-tensor norms) is left out, as in the
    formula."""

    def __init__(self, param_tensors: int):
        super().__init__()
        self.per_tensor = param_tensors
        self.flops = 0
        self.unknown = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if name.startswith("_foreach_") and isinstance(args[0], (list, tuple)):
            n = sum(t.numel() for t in args[0])
            if n == len(args[0]):            # one scalar per tensor: step counters
                return out
            if name not in _FOREACH_COST:
                self.unknown.add(name)
            self.flops += _FOREACH_COST.get(name, 0) * n
        return out


def test_optimizer_formula_matches_an_operation_count_of_a_foreach_adamw_step():
    model = _transformer()
    from bkbench.config import BenchmarkConfig
    from bkbench.train import make_optimizer
    opt = make_optimizer(model, BenchmarkConfig(weight_decay=0.1))   # matrices decay, rest not
    for group in opt.param_groups:       # the fused kernel computes the same update as one op,
        group["fused"], group["foreach"] = False, True   # which a census cannot see inside
    params = [p for g in opt.param_groups for p in g["params"]]
    decayed = sum(p.numel() for p in opt.param_groups[0]["params"])
    assert 0 < decayed < sum(p.numel() for p in params)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()                                    # state initialised: a step like every other
    census = _ForeachCensus(len(params))
    with FlopCounterMode(display=False) as counter, census:
        torch.nn.utils.clip_grad_norm_(params, 0.5, foreach=True)
        opt.step()
    assert counter.get_total_flops() == 0         # the counter does not see the optimizer
    assert not census.unknown, census.unknown
    r = measure_step_flops(model, B, T, V, optimizer=opt, grad_clip=True)
    assert r.optimizer == census.flops > 0
    assert r.decayed_parameters == decayed
    assert r.optimizer == optimizer_flops(r.num_parameters, grad_clip=True, decayed=decayed)
    assert r.sources["optimizer"] == {"counted": 0, "formula": r.optimizer}
    with pytest.raises(ValueError):
        optimizer_flops(10, "lion")
    with pytest.raises(ValueError, match="decayed"):
        optimizer_flops(10, decayed=11)


def test_optimizer_instance_counts_only_its_parameters():
    model = _transformer()
    opt = torch.optim.AdamW(model.lm_head.parameters())
    r = measure_step_flops(model, B, T, V, optimizer=opt, grad_clip=False)
    assert r.optimizer == model.lm_head.weight.numel() * (13 + 1)    # weight decay 0.01
    assert set(k for k, v in r.optimizer_by_component.items() if v) == {"lm_head"}


def test_result_fields_and_training_totals():
    r = measure_step_flops(_transformer(), B, T, V)
    ev = measure_forward_flops(_transformer(), B, T, V)
    assert ev["forward"] == r.forward            # eval forward: same matmuls, dropout off
    fields = flops_result_fields(r, steps=10, eval_forward=ev, eval_tokens=1000)
    assert fields["forward_flops"] == r.forward
    assert fields["total_flops"] == 10 * r.total
    training = fields["flops"]["training"]
    assert sum(training["by_component"].values()) == training["total"]
    assert fields["flops"]["evaluation"]["total"] == round(ev["per_token"] * 1000)
    # every figure says where it comes from: the head fused with the loss is one op charged by
    # its registered formula (2 N d V forward, 4 N d V backward); the other products are counted
    src = fields["flops"]["sources"]
    head_fwd = _head_forward_flops(B * T, V)
    assert src["forward"] == {"counted": r.forward - head_fwd, "formula": head_fwd}
    assert src["backward"] == {"counted": r.backward - 2 * head_fwd, "formula": 2 * head_fwd}
    assert src["optimizer"] == {"counted": 0, "formula": r.optimizer}
    assert src["uncounted"]["formula"] == r.uncounted["total"]
    # evaluation runs the fused head too (its no-gradient op, charged 2 N d V by formula)
    scale = 1000 / ev["tokens"]
    assert src["evaluation"] == {"counted": round((ev["forward"] - head_fwd) * scale),
                                 "formula": round(head_fwd * scale)}
    import json
    json.dumps(fields)                            # JSON-ready


# --- the BK-Core and the ResNet-BK model -------------------------------------------------

def test_the_runs_measurement_of_the_trainers_objective_sees_the_fused_head(tiny_corpus):
    """What `bkbench run` counts (measure_step_flops with Trainer.compute_loss) is the fused
    head op the trainer runs, not the unfused products: the FLOP tracker's module hooks once
    made the fused-head check fail inside the measurement, so the run's head was counted as
    plain matrix products while training ran the fused op."""
    from bkbench.config import BenchmarkConfig
    from bkbench.train import Trainer
    vocab = len(tiny_corpus.vocab)
    config = BenchmarkConfig(model_name="t", architecture="transformer", d_model=32, n_layers=2,
                             n_heads=2, n_seq=16, batch_size=4, max_steps=1, dropout=0.1)
    torch.manual_seed(0)
    model = build_model("transformer", vocab, **config.model_kwargs())
    trainer = Trainer(config, model, tiny_corpus, torch.device("cpu"), progress=False)
    plain = measure_step_flops(model, 4, 16, vocab, optimizer=trainer.optimizer)
    run = measure_step_flops(model, 4, 16, vocab, optimizer=trainer.optimizer,
                             compute_loss=trainer.compute_loss)
    head_fwd = 2 * 4 * 16 * 32 * vocab
    assert run.sources["forward"] == plain.sources["forward"] == {
        "counted": plain.forward - head_fwd, "formula": head_fwd}
    assert run.sources["backward"] == {"counted": run.backward - 2 * head_fwd,
                                       "formula": 2 * head_fwd}
    assert (run.forward, run.backward) == (plain.forward, plain.backward)


def test_bk_core_count_matches_its_formula():
    bk = pytest.importorskip("bkbench.ops.bk_core")
    for analytic in (True, False):
        v = torch.randn(3, 2, 40, requires_grad=True)
        with FlopCounterMode(display=False) as counter:
            g = bk.resolvent_diag(v, analytic_gradient=analytic)
            fwd = counter.get_total_flops()
            (g.real.sum() + g.imag.sum()).backward()
        total = counter.get_total_flops()
        assert fwd == bk.bk_core_flops(3 * 2 * 40) > 0
        assert total - fwd == bk.bk_core_flops(3 * 2 * 40, backward=True) > 0


class _Real:
    """A real number that counts its arithmetic in ``ops[0]`` (negation is free)."""

    ops = [0]

    def __init__(self, x):
        self.x = float(x)

    @staticmethod
    def _lift(o):
        return _Complex(_Real(o.real), _Real(o.imag)) if isinstance(o, complex) else o

    def _op(self, o, f, swap=False):
        o = self._lift(o)
        if isinstance(o, _Complex):
            return f(_Complex(self, 0.0), o) if not swap else f(o, _Complex(self, 0.0))
        _Real.ops[0] += 1
        y = o.x if isinstance(o, _Real) else float(o)
        return _Real(f(y, self.x) if swap else f(self.x, y))

    def __add__(self, o): return self._op(o, lambda a, b: a + b)
    def __radd__(self, o): return self._op(o, lambda a, b: a + b, swap=True)
    def __sub__(self, o): return self._op(o, lambda a, b: a - b)
    def __rsub__(self, o): return self._op(o, lambda a, b: a - b, swap=True)
    def __mul__(self, o): return self._op(o, lambda a, b: a * b)
    def __rmul__(self, o): return self._op(o, lambda a, b: a * b, swap=True)
    def __truediv__(self, o): return self._op(o, lambda a, b: a / b)
    def __neg__(self): return _Real(-self.x)


class _Complex:
    """Complex arithmetic on counting reals, each op as its plain real formula: +/- 2 real
    ops, real x complex 2, complex x complex 6, 1/z 5 (|z|^2 3, two divisions); a real
    operand (imaginary part exactly 0) is not multiplied through. conj/neg/real/imag: free."""

    def __init__(self, re, im):
        self.re = re if isinstance(re, _Real) else _Real(re)
        self.im = im if isinstance(im, _Real) else _Real(im)
        self.is_real = not isinstance(im, _Real) and im == 0.0

    @staticmethod
    def _lift(o):
        if isinstance(o, _Complex):
            return o
        if isinstance(o, complex):               # a Python complex: a full complex operand
            return _Complex(_Real(o.real), _Real(o.imag))
        return _Complex(o, 0.0)

    def __add__(self, o):
        o = self._lift(o)
        if o.is_real:
            return _Complex(self.re + o.re, self.im)
        return _Complex(self.re + o.re, self.im + o.im)

    __radd__ = __add__

    def __sub__(self, o):
        return self + (-self._lift(o))

    def __rsub__(self, o):
        return self._lift(o) + (-self)

    def __neg__(self):
        out = _Complex(-self.re, -self.im)
        out.is_real = self.is_real
        return out

    def __mul__(self, o):
        o = self._lift(o)
        if o.is_real:
            return _Complex(self.re * o.re, self.im * o.re)
        if self.is_real:
            return o * self
        return _Complex(self.re * o.re - self.im * o.im, self.re * o.im + self.im * o.re)

    __rmul__ = __mul__

    def __rtruediv__(self, o):
        assert float(o) == 1.0                   # the loops only take reciprocals
        d = self.re * self.re + self.im * self.im
        return _Complex(self.re / d, (-self.im) / d)

    def conjugate(self):
        return _Complex(self.re, -self.im)

    @property
    def real(self):
        return self.re

    @property
    def imag(self):
        return self.im


def _reference_loop_ops(n: int) -> dict[str, int]:
    """Real operations of the reference loops (bk_core.naive) on one row of n sites."""
    from bkbench.ops.bk_core import naive

    v = [0.3 * i - 0.5 for i in range(n)]
    tau = _Real(0.81)

    def alpha():
        return [_Complex(_Real(0.7) + x, -0.4) for x in v]     # shift + v_i - i eps

    def count(fn):
        _Real.ops[0] = 0
        fn()
        return _Real.ops[0]

    def bidirectional():
        a = alpha()
        left, right = naive._sweep(a, tau), naive._sweep(a[::-1], tau)[::-1]
        return [1.0 / (a[i] - tau * (left[i - 1] if i else 0j)
                       - tau * (right[i + 1] if i + 1 < n else 0j)) for i in range(n)]

    left = naive._sweep(alpha(), tau)
    gbar = [_Complex(0.1 * i, 0.2) for i in range(n)]

    def causal_backward():
        alphabar, _ = naive._sweep_adjoint(left, gbar, tau)
        return sum(a.real for a in alphabar), sum(a.imag for a in alphabar)   # shift, eps

    return {"causal": count(lambda: naive._sweep(alpha(), tau)),
            "causal_backward": count(causal_backward), "bidirectional": count(bidirectional)}


def test_bk_core_formula_against_an_operation_count_of_the_reference_loop():
    from bkbench.ops.bk_core import FLOPS_PER_POSITION

    # the cost of one more site (interior positions; the chain's ends skip a term or two)
    short, long = _reference_loop_ops(7), _reference_loop_ops(8)
    per_site = {k: long[k] - short[k] for k in short}
    # the reference loop does exactly the kernel's arithmetic in the causal forward ...
    assert per_site["causal"] == FLOPS_PER_POSITION[(True, False)]
    # ... and a little more elsewhere, each difference a shortcut of the kernels that the
    # formula's comment counts: in the backward, g^2 as a general product (6, not 5) and all
    # of conj(g_{i-1}) delta where only its real part is used (6 + 1, not 4); bidirectional,
    # tau*gL + tau*gR (8) where the kernel adds first, tau*(gL + gR) (6), but recomputes alpha (1)
    assert per_site["causal_backward"] == FLOPS_PER_POSITION[(True, True)] + 1 + 3
    assert per_site["bidirectional"] == FLOPS_PER_POSITION[(False, False)] + 2 - 1


@pytest.mark.skipif("resnet_bk" not in available_models(), reason="ResNet-BK model not built")
@pytest.mark.parametrize("analytic_gradient", [True, False])
def test_resnet_bk_matches_analytic(analytic_gradient):
    from bkbench.ops.bk_core import bk_core_flops
    torch.manual_seed(0)
    model = build_model("resnet_bk", V, d_model=32, n_layers=2, n_seq=T, num_experts=4,
                        top_k=1, analytic_gradient=analytic_gradient)
    r = measure_step_flops(model, B, T, V)
    an = r.analytic
    assert an["architecture"] == "resnet_bk"
    assert abs(an["forward_rel_diff"]) < 0.01 and abs(an["backward_rel_diff"]) < 0.01
    positions = 2 * B * 1 * T                      # layers x batch x heads x sites
    bk_fwd = sum(n for op, n in r.forward_by_op.items() if "bk_core" in op)
    bk_bwd = sum(n for op, n in r.backward_by_op.items() if "bk_core" in op)
    assert bk_fwd == bk_core_flops(positions) > 0
    assert bk_bwd == bk_core_flops(positions, backward=True) > 0
    # the BK-Core's and the fused head's figures are their formulas (on either gradient path);
    # the rest is counted
    head_fwd = _head_forward_flops(B * T, V)
    assert r.sources["forward"] == {"counted": r.forward - bk_fwd - head_fwd,
                                    "formula": bk_fwd + head_fwd}
    assert r.sources["backward"] == {"counted": r.backward - bk_bwd - 2 * head_fwd,
                                     "formula": bk_bwd + 2 * head_fwd}
    assert sum(r.forward_by_component.values()) == r.forward
    assert sum(r.backward_by_component.values()) == r.backward
    assert r.forward_by_component["mixer"] >= bk_fwd
    # routing changes the count only through the experts' padding, within stated bounds
    rng = r.per_step_range
    assert rng["forward_min"] <= r.forward <= rng["forward_max"]
    no_pad = analytic_resnet_bk_flops(B, T, 32, 2, V, num_experts=4, top_k=1)
    assert no_pad["forward"] == rng["forward_min"]


# --- evaluation FLOPs of the model as it is evaluated (prepare_for_eval) -------------------------

def _flagged(**flags):
    from bkbench.config import BenchmarkConfig
    from bkbench.flags import build_model as build_flagged
    cfg = BenchmarkConfig.from_dict(dict(model_name="resnet_bk_t", d_model=32, n_layers=3,
                                         n_heads=2, n_seq=T, num_experts=4, seed=0,
                                         **flags)).validate()
    torch.manual_seed(0)
    return build_flagged(cfg, V)


def _text_windows():
    # a repetitive "text" rather than uniform noise: the states saturate unevenly
    return (torch.arange(B * (T + 1)) % 17).view(B, T + 1)


def test_eval_flops_count_the_integer_models_int8_products():
    from bkbench.compression.quantization import IntLinear
    model, flags = _flagged(use_quantization=True)
    evaluated = flags.prepare_for_eval(model)
    assert any(isinstance(m, IntLinear) for m in evaluated.modules())
    integer = measure_forward_flops(evaluated, B, T, V)
    fake_quant = measure_forward_flops(model, B, T, V)
    # the same products, int8 x int8 instead of float: counted alike (uncounted, they vanished)
    assert integer["forward"] == fake_quant["forward"] > 0
    assert integer["by_component"]["feed_forward"] == fake_quant["by_component"]["feed_forward"] > 0


def test_eval_flops_count_the_early_exits_and_one_head_per_token():
    model, flags = _flagged(use_early_exit=True)
    windows = _text_windows()
    plain = measure_forward_flops(flags.prepare_for_eval(model), B, T, V, windows=windows)
    model.early_exit_threshold.fill_(-1.0)          # every token exits after layer 1
    exiting = measure_forward_flops(flags.prepare_for_eval(model), B, T, V, windows=windows)
    assert exiting["by_component"]["feed_forward"] < plain["by_component"]["feed_forward"] / 2
    # deciding costs no LM head: the head runs once per token, exits or not
    assert exiting["by_component"]["lm_head"] == plain["by_component"]["lm_head"] \
        == _head_forward_flops(B * T, V)
    with pytest.raises(ValueError, match="do not fit batch"):
        measure_forward_flops(model, B, T, V, windows=windows[:, :-1])
