"""Tests of bkbench.experiments.size_scaling: the saturating power-law fit against known
parameters, the gap verdicts, the sweep's configs, and the analysis of a small table."""

from __future__ import annotations

import numpy as np
import pytest

from bkbench.config import build_run_configs
from bkbench.experiments import size_scaling as ss


@pytest.mark.parametrize("seed", range(5))
def test_fit_recovers_random_known_parameters(seed):
    rng = np.random.default_rng(seed)
    e, alpha = rng.uniform(1.0, 4.0), rng.uniform(0.1, 0.8)
    a = rng.uniform(0.5, 3.0) * 1e5 ** alpha          # the reducible part is O(1) at x ~ 1e5
    xs = np.geomspace(1e4, 1e7, 6)
    fit = ss.fit_saturating_power_law(xs, e + a * xs ** -alpha)
    assert fit.irreducible == pytest.approx(e, rel=1e-4)
    assert fit.exponent == pytest.approx(alpha, rel=1e-4)
    assert fit.coefficient == pytest.approx(a, rel=1e-3)
    assert fit.r2 == pytest.approx(1.0, abs=1e-9) and (fit.points, fit.dof) == (6, 3)
    assert fit.predict(2e5) == pytest.approx(e + a * 2e5 ** -alpha, rel=1e-6)


def test_fit_with_noise_reports_imperfect_quality_and_refuses_too_few_sizes():
    rng = np.random.default_rng(0)
    xs = np.repeat(np.geomspace(1e4, 1e6, 4), 2)
    ys = 2.0 + 50 * xs ** -0.4 + rng.normal(0, 0.02, xs.size)
    fit = ss.fit_saturating_power_law(xs, ys)
    assert 0.5 < fit.r2 < 1.0 and fit.dof == 5
    with pytest.raises(ValueError, match="3 or more distinct"):
        ss.fit_saturating_power_law([1e4, 1e4, 1e5, 1e5], [3, 3.1, 2.5, 2.6])


def test_gap_verdicts():
    sizes = [64, 256]
    ref = {64: [5.0, 5.02], 256: [4.0, 4.02]}
    widening = {64: [5.1, 5.12], 256: [4.5, 4.52]}
    narrowing = {64: [5.6, 5.62], 256: [4.05, 4.07]}
    overlapping = {64: [5.1, 5.5], 256: [4.1, 4.6]}
    assert ss.gap_by_size(widening, ref, sizes)["verdict"] == "widens"
    g = ss.gap_by_size(narrowing, ref, sizes)
    assert g["verdict"] == "narrows"
    assert g["by_size"]["64"]["diff"] == pytest.approx(0.6)
    assert g["by_size"]["64"]["low"] < 0.6 < g["by_size"]["64"]["high"]
    assert ss.gap_by_size(overlapping, ref, sizes)["verdict"].startswith("not resolved")
    one_seed = ss.gap_by_size({64: [5.1], 256: [4.5]}, {64: [5.0], 256: [4.0]}, sizes)
    assert one_seed["verdict"].startswith("widens (one seed")


def test_sweep_configs_name_every_size_and_seed_and_need_a_budget():
    bases = build_run_configs("smoke", {}, {"max_tokens": 4096},
                              ["transformer_baseline", "resnet_bk_baseline"])
    planned = ss.sweep_configs(bases, "d_model", [16, 32], [0, 1])
    assert len(planned) == 8
    names = {c.model_name for *_, c in planned}
    assert "resnet_bk_baseline-d_model32-seed1" in names and len(names) == 8
    for model, v, s, c in planned:
        assert (c.d_model, c.seed, c.max_tokens, c.max_steps, c.epochs) == (v, s, 4096, None, 0)
    with pytest.raises(ValueError, match="--max-tokens or --budget-flops"):
        ss.sweep_configs(build_run_configs("smoke", {}, {}, ["transformer_baseline"]),
                         "d_model", [16], [0])
    with pytest.raises(ValueError, match="model size"):
        ss.sweep_configs(bases, "n_seq", [16], [0])


def test_analyse_fits_each_model_and_measures_gaps():
    points = []
    for model, e in (("transformer_baseline", 2.0), ("resnet_bk_baseline", 2.3)):
        for size, params in ((16, 1e4), (32, 4e4), (64, 1.6e5), (128, 6.4e5)):
            for seed, jitter in ((0, 0.0), (1, 0.01)):
                points.append({"model": model, "size": size, "seed": seed, "params": params,
                               "train_flops": params * 6e3, "train_tokens": 1000,
                               "test_loss": e + 30 * params ** -0.5 + jitter,
                               "test_bits_per_byte": None})
    table = ss.analyse(points, "d_model")
    assert table["reference"] == "transformer_baseline"
    fit = table["fits"]["resnet_bk_baseline"]["params"]
    assert fit["exponent"] == pytest.approx(0.5, abs=0.05) and fit["dof"] == 5
    assert "exponent" in table["fits"]["transformer_baseline"]["train_flops"]
    gap = table["gaps"]["resnet_bk_baseline"]
    assert gap["by_size"]["16"]["diff"] == pytest.approx(0.3)
    assert gap["verdict"].startswith("not resolved")   # a constant gap
    fits, gaps = ss.size_scaling_rows(table)
    assert len(fits) == 2 and len(gaps) == 4


def _exit_code(argv):
    from bkbench.cli import main
    try:
        return main(argv)
    except SystemExit as exc:
        return exc.code


@pytest.mark.parametrize("argv,message", [
    (["scale", "--d-model", "16,32", "--seeds", "0,1"], "scale --train` only"),
    (["scale", "--d-model", "16,32", "--threads", "1"], "scale --train` only"),
    (["scale", "--train", "--n-seq", "64,128", "--max-tokens", "1000"], "model size"),
    (["scale", "--train", "--d-model", "16,32"], "--max-tokens or --budget-flops"),
    (["scale", "--train", "--d-model", "16,32", "--max-tokens", "1000", "--dataset", "ptb",
      "--split-scheme", "proxy"], "only for wikitext-2"),
])
def test_scale_train_refuses_bad_invocations(tmp_path, capsys, argv, message):
    assert _exit_code(argv + ["--preset", "smoke", "--output-dir", str(tmp_path / "o")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_gap_verdict_is_written_once_per_model_on_its_largest_size():
    table = {"fits": {}, "gaps": {"m": {"by_size": {"64": {"diff": 0.1, "low": 0.0, "high": 0.2},
                                                    "256": {"diff": 0.5, "low": 0.4, "high": 0.6}},
                                        "verdict": "widens"}}}
    _, gaps = ss.size_scaling_rows(table)
    assert [row[3] for row in gaps] == ["", "widens"]
