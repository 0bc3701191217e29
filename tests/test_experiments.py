"""Statistics, seed aggregation and the scale sweep's fits (issue: experiments)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from bkbench.config import ConfigError, build_run_configs
from bkbench.experiments.scale import fit_scale, parse_int_list, scale_claims, sweep_configs
from bkbench.experiments.seeds import (aggregate, compare_aggregates, expand_seeds, mean_results,
                                       parse_seeds, seed_groups)
from bkbench.experiments.stats import fit_power_law, holm_adjust, summarize, welch_test
from bkbench.results import BenchmarkResults


def test_summary_matches_scipy_t_interval():
    values = [310.2, 309.1, 312.7, 308.4]
    s = summarize(values)
    low, high = stats.t.interval(0.95, len(values) - 1, loc=np.mean(values),
                                 scale=stats.sem(values))
    assert s.n == 4 and s.mean == pytest.approx(np.mean(values))
    assert s.std == pytest.approx(np.std(values, ddof=1))
    assert (s.ci_low, s.ci_high) == (pytest.approx(low), pytest.approx(high))
    # a hand value: t_{0.975,3} = 3.182446
    assert s.ci_high - s.mean == pytest.approx(3.182446 * s.std / 2, rel=1e-5)


def test_summary_of_one_value_has_no_interval_and_rejects_nan():
    s = summarize([5.0])
    assert s.std is None and s.ci_low is None and s.mean == 5.0
    with pytest.raises(ValueError):
        summarize([1.0, float("nan")])
    with pytest.raises(ValueError):
        summarize([])


def test_welch_matches_scipy_and_handles_degenerate_cases():
    a, b = [1.0, 2.0, 3.5, 2.2], [2.9, 3.1, 4.4]
    t = welch_test(a, b)
    ref = stats.ttest_ind(a, b, equal_var=False)
    assert t["p_value"] == pytest.approx(ref.pvalue) and t["t"] == pytest.approx(ref.statistic)
    # by hand: Welch's t statistic
    va, vb = np.var(a, ddof=1) / len(a), np.var(b, ddof=1) / len(b)
    assert t["t"] == pytest.approx((np.mean(a) - np.mean(b)) / math.sqrt(va + vb))
    assert welch_test([1.0], [2.0, 3.0])["p_value"] is None
    assert welch_test([1.0, 1.0], [1.0, 1.0])["p_value"] is None


@pytest.mark.parametrize("exponent", [0.0, 1.0, 2.0, -0.5])
def test_power_law_fit_recovers_a_known_exponent(exponent):
    rng = np.random.default_rng(0)
    xs = np.array([128, 256, 512, 1024, 2048, 4096], dtype=float)
    ys = 3e-6 * xs ** exponent * np.exp(rng.normal(0, 0.01, xs.size))  # 1% timing noise
    fit = fit_power_law(xs, ys)
    assert fit.exponent == pytest.approx(exponent, abs=0.02)
    assert fit.coefficient == pytest.approx(3e-6, rel=0.1)
    assert fit.r_squared > 0.99 or exponent == 0.0
    with pytest.raises(ValueError):
        fit_power_law([1.0], [2.0])


def test_power_law_fit_of_a_constant_up_to_rounding_is_flat_with_r2_one():
    # mixer FLOPs per token of the smoke sweep: 1821 at every N, but 1821/x*x rounding gave
    # an R^2 of -3.0 (two rounding residues divided)
    xs = [128.0, 512.0, 2048.0]
    for ys in ([1821.0] * 3, [1821.0, float(np.nextafter(1821.0, 2e3)), 1821.0]):
        fit = fit_power_law(xs, ys)                   # the old formula: R^2 -3.0 and -5.0
        assert fit.exponent == pytest.approx(0.0, abs=1e-12) and fit.r_squared == 1.0
    with pytest.raises(ValueError):
        fit_power_law([1.0, 2.0], [0.0, 1.0])


def _results(name: str, seed: int, ppl: float, tps: float, **config) -> BenchmarkResults:
    cfg = {"model_name": name, "seed": seed, "d_model": 64, "split_scheme": "proxy", **config}
    return BenchmarkResults(
        model_name=name, config=cfg, final_loss=math.log(ppl), final_perplexity=ppl,
        best_perplexity=ppl, test_loss=math.log(ppl), test_perplexity=ppl,
        test_bits_per_token=math.log2(ppl), test_tokens=1000, valid_loss=math.log(ppl),
        valid_perplexity=ppl, valid_bits_per_token=math.log2(ppl), valid_tokens=900,
        best_epoch=1, training_time=10.0, total_tokens=100, steps=10, tokens_per_second=tps,
        epoch_losses=[1.0], epoch_perplexities=[ppl], epoch_times=[10.0], eval_time=1.0,
        num_parameters=10, parameter_breakdown={}, model_size_mb=1.0, data={},
        forward_flops=100, backward_flops=200, optimizer_flops=10, seed=seed,
        causality={"causal": True})


def test_seed_expansion_names_and_seeds():
    configs = build_run_configs("smoke", models=["transformer_baseline", "resnet_bk_full"])
    out = expand_seeds(configs, [1, 2])
    assert [c.model_name for c in out] == ["transformer_baseline-seed1", "transformer_baseline-seed2",
                                           "resnet_bk_full-seed1", "resnet_bk_full-seed2"]
    assert [c.seed for c in out] == [1, 2, 1, 2]
    assert out[2].use_analytic_gradient and out[2].architecture == "resnet_bk"
    assert parse_seeds("1, 2,3") == [1, 2, 3] and parse_seeds([4, 5]) == [4, 5]
    for bad in ("", "1,1", "a", "-1", "1.5", [True]):
        with pytest.raises(ConfigError):
            parse_seeds(bad)


def test_aggregate_and_comparison_over_seeds():
    tf = [_results(f"transformer_baseline-seed{s}", s, p, t)
          for s, p, t in ((1, 300.0, 3000.0), (2, 302.0, 3100.0), (3, 301.0, 2900.0))]
    bk = [_results(f"resnet_bk_full-seed{s}", s, p, t)
          for s, p, t in ((1, 310.0, 4000.0), (2, 312.5, 4100.0), (3, 309.0, 3950.0))]
    groups = seed_groups({r.model_name: r for r in tf + bk})
    assert set(groups) == {"transformer_baseline", "resnet_bk_full"}
    agg_tf = aggregate("transformer_baseline", groups["transformer_baseline"])
    agg_bk = aggregate("resnet_bk_full", groups["resnet_bk_full"])
    ppl = agg_tf["metrics"]["test_perplexity"]["summary"]
    assert ppl["mean"] == pytest.approx(301.0) and ppl["n"] == 3
    assert agg_tf["metrics"]["step_flops"]["summary"]["mean"] == 310.0
    cmp = compare_aggregates(agg_tf, agg_bk, groups["transformer_baseline"], groups["resnet_bk_full"])
    ref = stats.ttest_ind([300, 302, 301], [310, 312.5, 309], equal_var=False)
    assert cmp["metrics"]["test_perplexity"]["p_value"] == pytest.approx(ref.pvalue)
    assert cmp["metrics"]["test_perplexity"]["significant"] is True
    mean = mean_results(groups["resnet_bk_full"])
    assert mean.model_name == "resnet_bk_full"
    assert mean.test_perplexity == pytest.approx((310 + 312.5 + 309) / 3)


def test_aggregate_refuses_runs_that_differ_in_more_than_the_seed():
    a = _results("m-seed1", 1, 300.0, 1.0)
    b = _results("m-seed2", 2, 301.0, 1.0, d_model=128)
    with pytest.raises(ConfigError, match="d_model"):
        aggregate("m", [a, b])


def test_sweep_configs_keep_tokens_per_batch_and_reject_bad_sweeps():
    base = build_run_configs("smoke", models=["transformer_baseline"])
    out = sweep_configs(base, "n_seq", [64, 256], tokens_per_batch=1024)
    assert [(c.n_seq, c.batch_size) for c in out] == [(64, 16), (256, 4)]
    with pytest.raises(ConfigError):
        sweep_configs(base, "n_seq", [64], None)
    with pytest.raises(ConfigError):
        sweep_configs(base, "n_seq", [64, 4096], tokens_per_batch=1024)
    # by default the batch holds the preset's 16 x 64 tokens, or one window of the longest n_seq
    # (`bkbench scale --preset smoke --n-seq 128,512,2048` exited 2 on 1024 < 2048)
    out = sweep_configs(base, "n_seq", [128, 512], None)
    assert [(c.n_seq, c.batch_size) for c in out] == [(128, 8), (512, 2)]
    out = sweep_configs(base, "n_seq", [128, 512, 2048], None)
    assert [(c.n_seq, c.batch_size) for c in out] == [(128, 16), (512, 4), (2048, 1)]
    with pytest.raises(ConfigError):
        parse_int_list("64,-1", "--n-seq")


def _point(model, n, spt, mem):
    return {"model_name": model, "value": n, "seconds_per_token": spt, "peak_memory_mb": mem,
            "flops_per_token": 1.0, "mixer_flops_per_token": 1.0, "tokens_per_second": 1 / spt}


def test_scale_fits_and_claims_from_synthetic_timings():
    ns = [128, 512, 2048]
    points = ([_point("transformer_baseline", n, 1e-6 * n, 10 + 0.01 * n) for n in ns]
              + [_point("resnet_bk_full", n, 2e-5, 10.0) for n in ns])
    fits = fit_scale(points, "n_seq")
    assert fits["transformer_baseline"]["seconds_per_token"]["exponent"] == pytest.approx(1.0)
    assert fits["resnet_bk_full"]["seconds_per_token"]["exponent"] == pytest.approx(0.0, abs=1e-9)
    scale = {"axis": "n_seq", "points": points, "fits": fits, "configs": {}}
    verdict = scale_claims(scale, "transformer_baseline", "resnet_bk_full")
    assert verdict["n_seq"] == 2048
    assert verdict["speedup"] == pytest.approx(2048e-6 / 2e-5)
    assert verdict["memory_saving"] == pytest.approx(1 - 10 / (10 + 20.48))


# --- equal-compute budgets ------------------------------------------------------------------

def _tiny(**changes):
    from bkbench.config import BenchmarkConfig
    base = dict(model_name="transformer_t", d_model=16, n_layers=1, n_heads=2, n_seq=16,
                batch_size=8, epochs=3, lr=3e-3, warmup_steps=0, eval_batch_size=16, seed=3)
    return BenchmarkConfig.from_dict({**base, **changes}).validate()


def _train(config, corpus):
    import torch

    from bkbench.models import build_model
    from bkbench.train import Trainer, seed_everything
    seed_everything(config.seed)
    model = build_model(config.architecture, len(corpus.vocab), **config.model_kwargs())
    trainer = Trainer(config, model, corpus, torch.device("cpu"), progress=False)
    return trainer, trainer.fit()


def test_flop_budget_stops_within_one_step_of_the_budget(tiny_corpus):
    from bkbench.metrics.flops import measure_step_flops
    probe, _ = _train(_tiny(max_steps=1), tiny_corpus)
    step = measure_step_flops(probe.model, 8, 16, 32, optimizer=probe.optimizer, seed=3).total
    budget = 7.5 * step
    trainer, out = _train(_tiny(budget_flops=budget), tiny_corpus)
    assert trainer.budget_step_flops == step
    assert out.steps == 7                      # the 8th step would exceed the budget
    assert out.steps * step <= budget < (out.steps + 1) * step
    assert len(out.epoch_perplexities) == 1    # 7 steps < one 31-step epoch: validated once


def test_flop_budget_below_one_step_is_refused(tiny_corpus):
    with pytest.raises(ConfigError, match="less than one training step"):
        _train(_tiny(budget_flops=10.0), tiny_corpus)
    with pytest.raises(ConfigError, match="budget_seconds"):
        _tiny(budget_seconds=-1.0)
    with pytest.raises(ConfigError, match="budget_flops"):
        _tiny(budget_flops=float("inf"))


def test_time_budget_stops_training_early(tiny_corpus):
    _, full = _train(_tiny(), tiny_corpus)
    trainer, out = _train(_tiny(budget_seconds=1e-9), tiny_corpus)
    # the budget is spent after the first step; the run then validates, tests and ends
    assert out.steps == 1 < full.steps
    assert len(out.epoch_perplexities) == 1 and out.test.num_tokens == full.test.num_tokens


# --- ablation -------------------------------------------------------------------------------

def test_ablation_rows_are_baseline_each_flag_and_all():
    from bkbench.experiments.ablate import ablation_rows, applicable_flags
    base = build_run_configs("smoke", models=["resnet_bk_full"])[0]   # a flag on: rows reset it
    rows = ablation_rows(base)
    flags = applicable_flags("resnet_bk")
    assert list(rows)[0] == "bk-baseline" and rows["bk-baseline"].enabled_flags() == []
    for flag in flags:
        assert rows["bk+" + flag.removeprefix("use_")].enabled_flags() == [flag]
    if len(flags) > 1:
        assert rows["bk-all"].enabled_flags() == flags
    assert len(rows) == 1 + len(flags) + (len(flags) > 1)
    shared = {k for k in base.to_dict() if not k.startswith("use_") and k != "model_name"}
    for c in rows.values():   # nothing but the flags differs between rows
        assert {k: getattr(c, k) for k in shared} == {k: getattr(base, k) for k in shared}


def _synthetic_ablation(ppl: list[list[float]], tps: list[list[float]] | None = None):
    """The ablation table of the first len(ppl) smoke rows from synthetic results (row i's
    per-seed test perplexities ppl[i], tokens/s tps[i]): (row names, table, Markdown line of
    each row by name)."""
    from bkbench.experiments.ablate import ablation_rows, build_table, format_table
    base = build_run_configs("smoke", models=["resnet_bk_baseline"])[0]
    rows = dict(list(ablation_rows(base).items())[:len(ppl)])
    seeds = list(range(1, len(ppl[0]) + 1))
    tps = tps or [[5000.0] * len(seeds)] * len(ppl)
    results = {}
    for name, row_ppl, row_tps in zip(rows, ppl, tps):
        for s, p, t in zip(seeds, row_ppl, row_tps):
            results[f"{name}-seed{s}"] = _results(f"{name}-seed{s}", s, p, t)
            results[f"{name}-seed{s}"].peak_memory_mb = 100.0
    table = build_table(rows, results, seeds=seeds)
    lines = {l.split(" | ")[0].lstrip("| "): l for l in format_table(table).splitlines()
             if l.startswith("| bk")}
    return list(rows), table, lines


def test_ablation_table_gives_welch_p_values_against_the_baseline():
    ppl = [[60.0, 61.0, 59.5], [60.2, 61.3, 59.1], [70.0, 71.5, 69.0]]
    tps = [[5000, 5100, 4950], [5200, 5150, 5300], [3000, 3100, 2900]]
    names, table, line = _synthetic_ablation(ppl, tps)
    assert "welch_vs_baseline" not in table["rows"][0]
    for i, r in enumerate(table["rows"][1:], 1):
        for field, values in (("test_perplexity", ppl), ("tokens_per_second", tps)):
            want = stats.ttest_ind(values[i], values[0], equal_var=False).pvalue
            assert r["welch_vs_baseline"][field]["p_value"] == pytest.approx(want, rel=1e-12)
    assert "(not significant)" in line[names[1]]              # p ~ 0.9
    assert "p = " in line[names[2]] and "(not significant)" not in line[names[2]]


@pytest.mark.slow
def test_ablation_row_equals_a_single_run_of_its_config(shared_data_dir, tmp_path):
    from bkbench.benchmark import WikiText2Benchmark
    from bkbench.experiments.ablate import run_ablation
    base = build_run_configs("smoke", overrides={"max_steps": 2, "data_dir": str(shared_data_dir),
                                                 "split_scheme": "proxy"},
                             models=["resnet_bk_baseline"])[0]
    # one thread on both sides: "auto" picks a count from the machine's load at each start,
    # and under CI's parallel tests the row and the single run could get different counts,
    # which changes the last bits (seen: 202.34170840336992 vs 202.3417084122991)
    import torch
    threads_before = torch.get_num_threads()
    try:
        table = run_ablation(base, tmp_path / "ablation", progress=False, threads="1")
        single = WikiText2Benchmark(tmp_path / "single", progress=False,
                                    threads="1").run_benchmark(
            base.replace(model_name="resnet_bk_full", use_analytic_gradient=True))
    finally:
        torch.set_num_threads(threads_before)
    row = next(r for r in table["rows"] if r["row"] == "bk+analytic_gradient")
    assert row["test_perplexity"]["mean"] == single.test_perplexity     # bit for bit
    assert (tmp_path / "ablation" / "ablation.md").read_text().count("| bk") == len(table["rows"])
    with pytest.raises(ConfigError, match="--overwrite"):
        run_ablation(base, tmp_path / "ablation", progress=False)


def test_a_scale_point_of_a_model_with_data_selection_flags_is_measured():
    """A scale point times train_step on one fixed batch; taking it through trainer.batch ran
    the flags' selection, and active learning refused a one-batch 'epoch' (resnet_bk_full's
    sweep stopped there)."""
    from bkbench.config import BenchmarkConfig
    from bkbench.experiments.scale import measure_point
    config = BenchmarkConfig(model_name="bk_al", architecture="resnet_bk", d_model=16,
                             n_layers=1, n_seq=16, batch_size=2, num_experts=2,
                             use_active_learning=True, use_curriculum=True).validate()
    point = measure_point(config, 50, steps=1, warmup=0, axis="n_seq")
    assert point["n_seq"] == 16 and point["batch_size"] == 2 and point["tokens_per_second"] > 0


@pytest.mark.parametrize("args,message", [
    (["run", "--seeds", ""], "seeds is empty"),
    (["run", "--seeds", "1,x"], "seeds must be non-negative integers"),
    (["run", "--seeds", "2,2"], "seeds repeat a value"),
    (["run", "--seeds", "1,2", "--seed", "3"], "either --seed or --seeds"),
    (["run", "--budget-flops", "-5"], "budget_flops must be a positive finite number"),
    (["run", "--budget-seconds", "nan"], "budget_seconds must be a positive finite number"),
    (["ablate", "--seeds", " , "], "seeds is empty"),
    (["ablate", "--jobs", "0"], "--jobs must be at least 1"),
    (["scale", "--n-seq", "128,abc"], "--n-seq takes comma-separated positive integers"),
    (["scale", "--n-seq", "512"], "two or more distinct values"),
    (["scale", "--n-seq", "128,256", "--steps", "0"], "steps must be >= 1"),
    (["scale", "--n-seq", "128,256", "--vocab-size", "0"], "--vocab-size must be at least 2"),
    (["scale", "--n-seq", "128,256", "--models", "mamba"], "unknown model"),
])
def test_experiment_commands_refuse_bad_arguments_with_exit_2(args, message, tmp_path, capsys):
    from bkbench.cli import main
    out_dir = tmp_path / "out"
    assert main([*args, "--output-dir", str(out_dir)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not out_dir.exists(), "nothing may be written when the input is bad"


def test_report_of_an_ablation_folder_holds_the_table_with_p_values(tmp_path):
    from bkbench.atomic import write_json_atomic
    from bkbench.experiments.ablate import ablation_rows, build_table, plot_ablation
    from bkbench.report import build_report
    base = build_run_configs("smoke", models=["resnet_bk_baseline"])[0]
    rows = dict(list(ablation_rows(base).items())[:2])
    names = list(rows)
    ppl = {names[0]: [60.0, 61.0], names[1]: [70.0, 71.5]}
    results = {f"{n}-seed{s}": _results(f"{n}-seed{s}", s, ppl[n][i], 5000.0 + i)
               for n in names for i, s in enumerate((1, 2))}
    for r in results.values():
        r.peak_memory_mb = 100.0
        r.save(tmp_path / f"{r.model_name}_results.json")
    table = build_table(rows, results, seeds=[1, 2])
    write_json_atomic(tmp_path / "ablation.json", table)
    plot_ablation(table, tmp_path / "ablation.png")
    build_report(tmp_path)
    md = (tmp_path / "report.md").read_text()
    section = md[md.index("## Ablation"):]
    want = stats.ttest_ind(ppl[names[1]], ppl[names[0]], equal_var=False).pvalue
    assert f"p = {want:.3g}" in section and "| bk-baseline | none | 60.50 ± " in section
    assert "](ablation.png)" in section
    assert "Test perplexity: ." not in md          # no empty sentence without benchmark runs
    page = (tmp_path / "report.html").read_text()
    img = page[page.index("<h2>Ablation"):]
    img = img[img.index("<img"):]
    assert img.startswith('<img src="data:image/png;base64,')   # embedded, not a link


def test_flop_budget_with_active_learning_spends_no_selection_flops(tiny_corpus):
    """budget_flops is what total_flops reports. Active learning ranks windows by the losses
    its own training steps computed (no scoring pass), so a budget of 9.5 steps trains 9
    steps and counts no selection FLOPs (it used to pay a scoring forward per round)."""
    import torch

    from bkbench.flags import build_model
    from bkbench.train import Trainer, seed_everything

    def train(config):
        seed_everything(config.seed)
        model, flags = build_model(config, len(tiny_corpus.vocab))
        trainer = Trainer(config, model, tiny_corpus, torch.device("cpu"), progress=False,
                          flags=flags)
        return trainer, trainer.fit()

    active = dict(use_active_learning=True, active_learning_fraction=0.5, active_learning_every=2)
    probe, _ = train(_tiny(max_steps=1, budget_flops=1e15, **active))
    step = probe.budget_step_flops
    trainer, out = train(_tiny(budget_flops=9.5 * step, **active))
    flag = trainer.flags.flags["use_active_learning"]
    assert flag.selection_flops() == 0
    assert out.steps == 9 and out.steps * step <= 9.5 * step


def test_parallel_ablation_rows_run_at_the_requested_threads(tmp_path, monkeypatch):
    # each worker gets the thread policy in its payload and OpenMP's in its environment
    import json as json_module
    import subprocess

    from bkbench.config import BenchmarkConfig
    from bkbench.experiments import ablate

    started = []

    class FakeChild:
        def __init__(self, argv, pass_fds=(), env=None):
            started.append((json_module.loads(argv[-1]), env))

        returncode = 0

        def poll(self):
            return 0

    monkeypatch.setattr(subprocess, "Popen", FakeChild)
    configs = [BenchmarkConfig.from_dict(dict(model_name=f"resnet_bk_r{i}")).validate()
               for i in range(3)]
    ablate._run_parallel(configs, tmp_path, resume=False, jobs=2, threads="1")
    assert len(started) == 3
    for payload, env in started:
        assert payload["thread_policy"]["threads"] == 1
        assert env["OMP_NUM_THREADS"] == "1"


def test_holm_adjustment_against_hand_computed_values():
    # sorted: 0.005 (x4), 0.01 (x3), 0.03 (x2), 0.04 (x1, raised to the running max 0.06)
    assert holm_adjust([0.01, 0.04, 0.03, 0.005, None]) == pytest.approx(
        [0.03, 0.06, 0.06, 0.02, None])
    assert holm_adjust([0.5, 0.6]) == [1.0, 1.0]        # capped at 1, monotone
    assert holm_adjust([None, None]) == [None, None]
    assert holm_adjust([0.02]) == [0.02]                 # one test: unchanged


def test_ablation_significance_is_judged_on_the_holm_p_value():
    # three rows against one baseline: two with plain p of about 0.03, which Holm's adjustment
    # for three tests lifts over 0.05, and one with p under 0.001, which stays significant
    ppl = [[60.0, 61.0, 59.5], [62.6, 63.9, 61.8], [62.3, 63.5, 61.6], [70.0, 71.5, 69.0]]
    names, table, line = _synthetic_ablation(ppl)
    test = [r["welch_vs_baseline"]["test_perplexity"] for r in table["rows"][1:]]
    p = [stats.ttest_ind(row, ppl[0], equal_var=False).pvalue for row in ppl[1:]]
    assert p[2] < p[0] < p[1] < 0.05
    assert test[2]["p_holm"] == pytest.approx(3 * p[2])
    assert test[0]["p_holm"] == pytest.approx(2 * p[0])
    assert test[1]["p_holm"] == pytest.approx(2 * p[0])   # the running maximum
    for n in names[1:3]:
        assert "Holm p = " in line[n] and "(not significant)" in line[n]
    assert "Holm p = " in line[names[3]] and "(not significant)" not in line[names[3]]
