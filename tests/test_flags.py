"""The flag framework: one registry, refusals, settings from CLI/YAML, hooks the trainer calls."""

import json

import pytest
import torch

from bkbench.cli import build_parser, main
from bkbench.config import OPTIMIZATION_FLAGS, BenchmarkConfig, ConfigError
from bkbench.flags import REGISTRY, Flag, FlagSet, build_model
from bkbench.metrics.flops import measure_step_flops
from bkbench.train import Trainer, seed_everything

from conftest import make_corpus

V = 32


def exit_code(argv):
    try:
        return main(argv)
    except SystemExit as exc:
        return exc.code


def bk_config(**changes):
    base = dict(model_name="resnet_bk_t", d_model=16, n_layers=2, n_seq=16, batch_size=4,
                epochs=0, max_steps=4, lr=3e-3, warmup_steps=1, eval_batch_size=16, seed=3,
                dropout=0.1, num_experts=2)
    return BenchmarkConfig.from_dict({**base, **changes}).validate()


def trainer_for(config, corpus=None, **kwargs):
    corpus = corpus or make_corpus(vocab_size=V, n_train=800, n_eval=200)
    seed_everything(config.seed)
    model, flags = build_model(config, len(corpus.vocab))
    return Trainer(config, model, corpus, torch.device("cpu"), progress=False, flags=flags,
                   **kwargs)


def test_registry_names_are_config_flags_with_modules_and_docs():
    assert set(REGISTRY) == set(OPTIMIZATION_FLAGS)        # all twelve are built
    for name, spec in REGISTRY.items():
        assert spec.module.__doc__ and name in spec.module.__doc__, name
        assert issubclass(spec.flag_class, Flag)
        for other in spec.incompatible:
            assert other in REGISTRY, (name, other)


def test_flag_settings_from_cli_yaml_and_help(tmp_path, capsys):
    help_text = build_parser()._subparsers._group_actions[0].choices["run"].format_help()
    for spec in REGISTRY.values():
        assert f"--{spec.name.replace('_', '-')}" in help_text
    assert "--analytic-gradient-timing-repeats" in help_text
    cfg = bk_config(analytic_gradient_timing_repeats=3)
    assert cfg.settings("use_analytic_gradient").timing_repeats == 3
    assert cfg.to_dict()["flag_settings"]["analytic_gradient"] == {"timing_repeats": 3}
    assert BenchmarkConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="did you mean 'analytic_gradient_timing_repeats'"):
        bk_config(analytic_gradient_timing_repeat=3)
    y = tmp_path / "c.yaml"
    y.write_text("analytic_gradient_timing_repeats: 0\n")
    code = exit_code(["run", "--preset", "smoke", "--config", str(y), "--models",
                      "resnet_bk_full", "--output-dir", str(tmp_path / "o")])
    assert code == 2
    assert "analytic_gradient_timing_repeats must be >= 1" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_analytic_gradient_is_applied_by_the_flag_and_records_timings():
    on = trainer_for(bk_config(use_analytic_gradient=True, analytic_gradient_timing_repeats=2))
    off = trainer_for(bk_config())
    assert all(b.bk.analytic_gradient for b in on.model.blocks)
    assert not any(b.bk.analytic_gradient for b in off.model.blocks)
    outcome = on.fit()
    rec = on.flags.record(on.context, outcome)["use_analytic_gradient"]
    m = rec["measured"]
    assert rec["settings"] == {"timing_repeats": 2}
    assert "adjoint" in m["backward_path"] and m["timed_shape"] == [4, 1, 16]


def test_analytic_gradient_record_times_each_path_as_its_own(monkeypatch):
    """A fake clock that each BK-Core path advances by its own known cost: the record must
    report each path's forward and backward under its name (not swapped, not one path twice),
    the median of interleaved calls, and their ratio."""
    from bkbench.flags import analytic_gradient as ag
    clock = {"now": 0.0}
    cost = {True: (1e-3, 2e-3), False: (3e-3, 8e-3)}     # (forward, backward) seconds
    calls = []

    def fake_resolvent_diag(v, h0, t, *, analytic_gradient, **kw):
        calls.append(analytic_gradient)
        clock["now"] += cost[analytic_gradient][0]
        out = (v * 1.0).to(torch.complex64)
        out.register_hook(lambda g: clock.__setitem__("now", clock["now"]
                                                      + cost[analytic_gradient][1]))
        return out

    monkeypatch.setattr(ag, "resolvent_diag", fake_resolvent_diag)
    monkeypatch.setattr(ag.time, "perf_counter", lambda: clock["now"])
    on = trainer_for(bk_config(use_analytic_gradient=True, analytic_gradient_timing_repeats=3))
    m = on.flags["use_analytic_gradient"].record(on.context, None)
    assert calls == [True, False] * 4                    # a warm-up pair, then 3 interleaved
    assert m["bk_core_forward_ms"] == pytest.approx({"analytic": 1.0, "autograd": 3.0})
    assert m["bk_core_backward_ms"] == pytest.approx({"analytic": 2.0, "autograd": 8.0})
    assert m["backward_speedup"] == pytest.approx(4.0)


class _ExtraMatmul(Flag):
    """A test flag whose loss term is one (B*T, d) x (d, 8) product of the final features."""

    def __init__(self):
        super().__init__(None, None)
        self.w = torch.ones(16, 8)

    def loss_terms(self, model, inputs, targets, step):
        return {"extra": (model.features(inputs).reshape(-1, 16) @ self.w).mean() * 0}

    def record(self, trainer, outcome):
        return {"ran": True}


def test_flag_loss_terms_are_trained_logged_and_counted(tmp_path):
    cfg = bk_config()
    plain = trainer_for(cfg)
    extra = trainer_for(cfg, run_dir=tmp_path)
    extra.flags = FlagSet({"extra": _ExtraMatmul()})
    loss, terms = extra.compute_loss(*extra.batch(extra.epoch_order(0), 0))
    assert set(terms) == {"cross_entropy_sum", "cross_entropy_per_window", "moe_balance", "extra"}
    extra.fit()
    lines = [json.loads(l) for l in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    train = [l for l in lines if l["kind"] == "train"]
    assert len(train) == 4 and all("term_extra" in l and "term_moe_balance" in l for l in train)
    # the FLOP counter sees the term: the extra features forward plus its matmul
    a = measure_step_flops(plain.model, 4, 16, V, compute_loss=plain.compute_loss)
    b = measure_step_flops(extra.model, 4, 16, V, compute_loss=extra.compute_loss)
    assert b.forward > a.forward + 2 * 4 * 16 * 16 * 8 - 1


def test_trainer_refuses_flags_without_their_hooks():
    cfg = bk_config(use_analytic_gradient=True)
    from bkbench.models import build_model as plain
    model = plain("resnet_bk", V, **cfg.model_kwargs())
    with pytest.raises(ValueError, match="pass its flags="):
        Trainer(cfg, model, make_corpus(vocab_size=V), torch.device("cpu"), progress=False)


def test_docs_and_readme_table_are_generated_from_the_registry():
    from pathlib import Path
    from bkbench.flags.registry import flags_doc_markdown, flags_table_markdown
    from bkbench.flags.sweeps_doc import load_flag_sweeps
    root = Path(__file__).resolve().parents[1]
    # with a checked-in sweep (docs/flag_sweeps.json) the page holds its tables
    sweeps_file = root / "docs" / "flag_sweeps.json"
    sweeps = load_flag_sweeps(sweeps_file) if sweeps_file.exists() else None
    assert (root / "docs" / "flags.md").read_text().strip() == flags_doc_markdown(sweeps).strip(), \
        "docs/flags.md is stale: python -m bkbench.flags [--sweeps docs/flag_sweeps.json] > docs/flags.md"
    assert flags_table_markdown() in (root / "README.md").read_text(), \
        "README flag table is stale: python -m bkbench.flags --table"


def test_a_refused_pair_exits_2_naming_both_flags(tmp_path, capsys, monkeypatch):
    # no two of the twelve clash today; the refusal path is checked with a declared clash
    import dataclasses as dc
    clash = dc.replace(REGISTRY["use_koopman"], incompatible=("use_physics_informed",))
    monkeypatch.setitem(REGISTRY, "use_koopman", clash)
    code = exit_code(["run", "--preset", "smoke", "--models", "resnet_bk_baseline",
                      "--use-koopman", "--use-physics-informed",
                      "--output-dir", str(tmp_path / "o")])
    assert code == 2
    err = capsys.readouterr().err
    assert "use_koopman and use_physics_informed cannot be used together" in err
    assert not (tmp_path / "o").exists()
