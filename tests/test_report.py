"""Comparisons, the claims audit and the report, from hand-made results files."""

from __future__ import annotations

import copy
import json

import pytest

from bkbench.compare import (compare_results, format_comparison, write_comparison,
                             write_seed_comparisons)
from bkbench.report import audit_claims, build_report, report_main
from bkbench.results import BenchmarkResults

COMPONENTS = ("embedding", "mixer", "feed_forward", "lm_head", "loss", "other")


def _flops(fwd: float, bwd: float, opt: float, steps: int) -> dict:
    share = {"embedding": 0, "mixer": 0.1, "feed_forward": 0.2, "lm_head": 0.7, "loss": 0,
             "other": 0}
    f = {k: int(fwd * v) for k, v in share.items()}
    b = {k: int(bwd * v) for k, v in share.items()}
    f["lm_head"] += int(fwd) - sum(f.values())
    b["lm_head"] += int(bwd) - sum(b.values())
    by = {k: steps * (f[k] + b[k]) for k in COMPONENTS}
    by["optimizer"] = steps * int(opt)
    return {"forward_by_component": f, "backward_by_component": b,
            "optimizer_by_component": {"lm_head": int(opt)},
            "training": {"steps": steps, "by_component": by,
                         "total": steps * int(fwd + bwd + opt)},
            "uncounted": {"total": int(0.05 * (fwd + bwd)), "fraction_of_counted": 0.05,
                          "forward": {"softmax": int(0.03 * fwd)},
                          "backward": {"softmax": int(0.02 * bwd)},
                          "explanation": "elementwise ops are not counted"},
            "analytic": {"architecture": "transformer", "forward": fwd, "backward": bwd,
                         "forward_rel_diff": 0.0, "backward_rel_diff": 0.0, "notes": "mm"},
            "optimizer_name": "adamw", "optimizer_flops_per_parameter": 17,
            "optimizer_flops_per_parameter_without_decay": 16, "decayed_parameters": 900,
            "num_parameters": 1000, "optimizer_explanation": "AdamW 14 + clipping 3",
            "sources": {"forward": {"counted": int(fwd) - 12345, "formula": 12345},
                        "backward": {"counted": int(bwd) - 23456, "formula": 23456},
                        "optimizer": {"counted": 0, "formula": int(opt)},
                        "uncounted": {"counted": 0, "formula": int(0.05 * (fwd + bwd))},
                        "explanation": "counted: by the counter; formula: by hand"},
            "notes": []}


def make_result(name: str, *, ppl: float, fwd: float, bwd: float, tps: float, mem: float,
                n_seq: int = 2048, scheme: str = "official", analytic: bool = False,
                causal: bool | None = True) -> BenchmarkResults:
    arch = "transformer" if name.startswith("transformer") else "resnet_bk"
    steps = 100
    config = {"model_name": name, "architecture": arch, "d_model": 64, "n_layers": 4,
              "n_seq": n_seq, "batch_size": 32, "variant": "tokens", "split_scheme": scheme,
              "tokenizer": "word", "use_analytic_gradient": analytic, "epochs": 3}
    opt = 1e7
    return BenchmarkResults(
        model_name=name, config=config, final_loss=1.0, final_perplexity=ppl,
        best_perplexity=ppl * 0.95, test_loss=1.0, test_perplexity=ppl,
        test_bits_per_token=6.0, test_tokens=245_569, valid_loss=1.0,
        valid_perplexity=ppl * 0.95, valid_bits_per_token=6.0, valid_tokens=217_646,
        best_epoch=2, training_time=1e6 / tps, total_tokens=1_000_000, steps=steps,
        tokens_per_second=tps, epoch_losses=[6.0, 5.5, 5.2],
        epoch_perplexities=[ppl * 1.5, ppl * 1.1, ppl * 0.95], epoch_times=[10.0, 9.5, 9.7],
        eval_time=3.0, num_parameters=4_000_000,
        parameter_breakdown={"embedding": 2_000_000, "lm_head": 2_000_000},
        model_size_mb=16.0,
        data={"dataset": "wikitext-2", "scheme": scheme, "variant": "tokens",
              "num_tokens": {"test": 245_569}, "checksums": {"wiki.test.tokens": "abc123"}},
        forward_flops=int(fwd), backward_flops=int(bwd), optimizer_flops=int(opt),
        total_flops=steps * int(fwd + bwd + opt), flops=_flops(fwd, bwd, opt, steps),
        peak_memory_mb=mem,
        memory={"method": "cpu peak RSS above baseline", "peak_bytes": int(mem * 2**20)},
        causality=None if causal is None else {"causal": causal, "max_leak": 0.0},
        perplexity_valid_for_lm=causal is not False,
        environment={"device": "cpu", "cpu_model": "test cpu", "torch_version": "2.x"})


def passing_set(**overrides) -> dict[str, BenchmarkResults]:
    tf = make_result("transformer_baseline", ppl=100.0, fwd=1e12, bwd=2e12, tps=1000, mem=1000)
    kw = dict(ppl=120.0, fwd=5e10, bwd=2.5e10, tps=6000, mem=600, analytic=True)
    kw.update(overrides)
    bk = make_result("resnet_bk_full", **kw)
    base = make_result("resnet_bk_baseline", ppl=125.0, fwd=6e10, bwd=1e11, tps=4000, mem=700)
    return {r.model_name: r for r in (tf, base, bk)}


def verdicts(results) -> dict[str, str]:
    return {c.name: c.verdict for c in audit_claims(results)}


def test_all_claims_pass_when_met():
    assert verdicts(passing_set()) == {n: "PASS" for n in (
        "perplexity", "forward_flops", "backward_flops", "training_time", "peak_memory")}


def test_all_claims_fail_when_missed():
    results = passing_set(ppl=140.0, fwd=2e11, bwd=1e11, tps=2000, mem=950)
    assert set(verdicts(results).values()) == {"FAIL"}
    claims = {c.name: c for c in audit_claims(results)}
    assert claims["perplexity"].value == pytest.approx(1.4)
    assert claims["forward_flops"].value == pytest.approx(5.0)


def test_boundaries():
    v = verdicts(passing_set(ppl=130.0, fwd=1e11, bwd=4e10, tps=5000, mem=700))
    assert v == {n: "PASS" for n in v}      # 30%, 10x, 50x, 5x, 30% exactly
    v = verdicts(passing_set(ppl=130.1, fwd=1.01e11, bwd=4.01e10, tps=4990, mem=701))
    assert v == {n: "FAIL" for n in v}


def test_short_sequences_make_time_and_memory_untestable():
    tf = make_result("transformer_baseline", ppl=100, fwd=1e12, bwd=2e12, tps=1000, mem=1000,
                     n_seq=128)
    bk = make_result("resnet_bk_full", ppl=110, fwd=5e10, bwd=2e10, tps=9000, mem=100,
                     n_seq=128, analytic=True)
    claims = {c.name: c for c in audit_claims({r.model_name: r for r in (tf, bk)})}
    assert claims["training_time"].verdict == "UNTESTABLE"
    assert claims["peak_memory"].verdict == "UNTESTABLE"
    assert "2048" in claims["training_time"].reason and "128" in claims["training_time"].reason
    assert "9.00x" in claims["training_time"].measured       # still reported
    assert claims["perplexity"].verdict == "PASS"


def test_backward_claim_needs_the_analytic_gradient():
    claims = {c.name: c for c in audit_claims(passing_set(analytic=False))}
    assert claims["backward_flops"].verdict == "UNTESTABLE"
    assert "use_analytic_gradient" in claims["backward_flops"].reason


def test_causality_governs_the_perplexity_claim():
    assert verdicts(passing_set(causal=False))["perplexity"] == "FAIL"
    assert verdicts(passing_set(causal=None))["perplexity"] == "UNTESTABLE"
    results = passing_set()
    results["transformer_baseline"].causality = {"causal": False}
    assert verdicts(results)["perplexity"] == "UNTESTABLE"


def test_missing_runs_or_measurements_are_untestable():
    results = passing_set()
    del results["resnet_bk_full"]
    assert set(verdicts(results).values()) == {"UNTESTABLE"}
    results = passing_set()
    results["resnet_bk_full"].forward_flops = None
    results["resnet_bk_full"].peak_memory_mb = None
    v = verdicts(results)
    assert v["forward_flops"] == "UNTESTABLE" and v["peak_memory"] == "UNTESTABLE"
    results = passing_set()
    results["resnet_bk_full"].config["d_model"] = 128
    assert set(verdicts(results).values()) == {"UNTESTABLE"}
    results = passing_set()
    results["resnet_bk_full"].environment["device"] = "cuda:0"
    v = verdicts(results)
    assert v["training_time"] == "UNTESTABLE" and v["forward_flops"] == "PASS"


@pytest.mark.parametrize("field,a,b", [("epochs", 3, 5), ("max_steps", None, 200),
                                        ("max_tokens", None, 10**6), ("lr", 1e-3, 3e-3),
                                        ("seed", 42, 43), ("dropout", 0.1, 0.0),
                                        ("batch_size", 32, 16), ("eval_stride", None, 64)])
def test_claims_need_the_same_training_recipe(field, a, b):
    results = passing_set()
    results["transformer_baseline"].config[field] = a
    results["resnet_bk_full"].config[field] = b
    claims = audit_claims(results)
    assert {c.verdict for c in claims} == {"UNTESTABLE"}
    assert all(f"{field}: {a!r} vs {b!r}" in c.reason for c in claims)


def test_flags_and_architecture_fields_may_differ():
    results = passing_set()
    bk = results["resnet_bk_full"].config
    bk.update(num_experts=4, top_k=1, bk_heads=1, moe_balance_weight=0.01, device="cuda",
              data_dir="/elsewhere", checkpoint_every=50)
    results["transformer_baseline"].config.update(n_heads=4, data_dir="/data")
    assert set(verdicts(results).values()) == {"PASS"}


def test_compare_results_ratios_and_nulls(tmp_path):
    results = passing_set()
    a, b = results["transformer_baseline"], results["resnet_bk_full"]
    d = compare_results(a, b)
    m = d["metrics"]
    assert m["forward_flops"]["ratio"] == pytest.approx(20.0)
    assert m["test_perplexity"]["ratio"] == pytest.approx(100 / 120)
    assert m["tokens_per_second"]["ratio"] == pytest.approx(1000 / 6000)
    assert m["peak_memory_mb"]["ratio"] == pytest.approx(1000 / 600)
    assert d["parameters"] == {a.model_name: a.num_parameters, b.model_name: b.num_parameters}
    b2 = copy.deepcopy(b)
    b2.peak_memory_mb = None
    b2.backward_flops = None
    m2 = compare_results(a, b2)["metrics"]
    assert m2["peak_memory_mb"]["ratio"] is None and m2["backward_flops"]["ratio"] is None
    assert m2["step_flops"]["ratio"] is None
    text = format_comparison(d)
    assert "transformer_baseline vs resnet_bk_full" in text and "n/a" not in text
    assert "n/a" in format_comparison(compare_results(a, b2))
    path = write_comparison(tmp_path, a, b)
    assert path.name == "comparison_transformer_baseline_vs_resnet_bk_full.json"
    assert json.loads(path.read_text())["metrics"]["forward_flops"]["ratio"] == pytest.approx(20)
    assert len(write_seed_comparisons(tmp_path, results)) == 3


@pytest.fixture
def results_dir(tmp_path):
    results = passing_set()
    for r in results.values():
        r.config["split_scheme"] = "proxy"
        r.save(tmp_path / f"{r.model_name}_results.json")
    write_seed_comparisons(tmp_path, results)
    return tmp_path


def test_report_from_json_files(results_dir, capsys):
    paths = build_report(results_dir)
    for key in ("training_curves", "flops_breakdown", "report_md", "report_html"):
        assert paths[key].is_file() and paths[key].stat().st_size > 0
    for png in ("training_curves.png", "flops_breakdown.png"):
        assert (results_dir / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (results_dir / "report.md").read_text()
    for text in ("PROXY", "Claims audit", "PASS", "abc123", "training_curves.png",
                 "resnet_bk_full", "Causality audit", "Not counted"):
        assert text in md, text
    # every FLOP figure is labelled counted or formula
    assert "opt FLOPs/step (formula)" in md and "fwd FLOPs/step (counted+formula)" in md
    assert "| figure | counted | formula |" in md
    assert "| backward / step | 2.000e+12 | 2.346e+04 |" in md      # 2e12 - 23456 counted
    assert "for each of 900 parameters with weight decay, 16 for each of 100 without" in md
    page = (results_dir / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 2
    assert "<img src=\"training_curves.png\"" not in page      # self-contained
    assert "PROXY" in page and 'class="pass"' in page
    assert report_main(str(results_dir)) == 0
    out = capsys.readouterr().out
    assert "report.html" in out and "Claims audit" in out


def test_report_main_errors(tmp_path, capsys):
    assert report_main(str(tmp_path / "nope")) != 0
    assert "does not exist" in capsys.readouterr().err
    assert report_main(str(tmp_path)) != 0
    assert "no readable" in capsys.readouterr().err


def test_report_recomputes_comparisons_from_the_results_files(results_dir):
    # a comparison left over from an earlier run must not survive a rerun of one model
    stale = results_dir / "comparison_transformer_baseline_vs_resnet_bk_full.json"
    stale.write_text('{"a": "transformer_baseline", "b": "resnet_bk_full", "metrics": {}}')
    build_report(results_dir)
    fresh = json.loads(stale.read_text())
    assert fresh["metrics"]["test_perplexity"]["ratio"] is not None
    assert len(list(results_dir.glob("comparison_*.json"))) == 3


def test_peers_table_and_comparisons_appear_only_with_peer_results(tmp_path):
    results = passing_set()
    build_report_dir = tmp_path / "seed"
    build_report_dir.mkdir()
    for r in results.values():
        r.save(build_report_dir / f"{r.model_name}_results.json")
    build_report(build_report_dir)
    assert "Among the peer baselines" not in (build_report_dir / "report.md").read_text()

    for name, arch, ppl in (("gla_baseline", "gla", 110.0), ("lstm_baseline", "lstm", 150.0)):
        peer = make_result(name, ppl=ppl, fwd=8e11, bwd=1.6e12, tps=2000, mem=800)
        peer.config["architecture"] = arch
        peer.num_parameters = 4_100_000
        results[name] = peer
        peer.save(tmp_path / f"{name}_results.json")
    for r in passing_set().values():
        r.save(tmp_path / f"{r.model_name}_results.json")
    build_report(tmp_path)
    md = (tmp_path / "report.md").read_text()
    section = md[md.index("Among the peer baselines"):md.index("Claims audit")]
    # every run, ordered by test perplexity, parameters relative to the Transformer
    order = [section.index(f"| {n} ") for n in ("transformer_baseline", "gla_baseline",
                                                 "resnet_bk_full", "resnet_bk_baseline",
                                                 "lstm_baseline")]
    assert order == sorted(order)
    assert "4,100,000 (+2.5%)" in section
    for peer in ("gla_baseline", "lstm_baseline"):
        assert f"resnet_bk_full vs {peer}" in section
        d = json.loads((tmp_path / f"comparison_resnet_bk_full_vs_{peer}.json").read_text())
        assert d["metrics"]["test_perplexity"]["ratio"] == pytest.approx(
            120.0 / results[peer].test_perplexity)


def test_summary_says_more_flops_where_a_run_counts_more_than_the_transformer(tmp_path):
    for r in passing_set(fwd=4e12).values():  # the Transformer counts 1e12
        r.save(tmp_path / f"{r.model_name}_results.json")
    md = build_report(tmp_path)["report_md"].read_text()
    summary = md[md.index("## Summary"):md.index("## Setup")]
    assert "`resnet_bk_full` against the Transformer: forward FLOPs/step 4.00x more," in summary


def test_summary_opens_the_report_with_the_numbers_and_seed_intervals(tmp_path):
    results = passing_set()
    for r in results.values():
        r.save(tmp_path / f"{r.model_name}_results.json")
    md = build_report(tmp_path)["report_md"].read_text()
    summary = md[md.index("## Summary"):md.index("## Setup")]
    assert md.index("## Summary") < md.index("## Setup") < md.index("| field | value |")
    assert "`resnet_bk_full` 120.00 (1.20x the Transformer's)" in summary
    assert "forward FLOPs/step 20.00x fewer, backward 80.00x fewer" in summary
    assert "measured speed 6.00x the Transformer's training tokens/s" in summary
    assert "peak memory 600.0 vs 1,000.0 MiB (0.60x the Transformer's, 40.0% lower)" in summary
    assert summary.count("- **PASS** ") == 5 and "over repeated seeds" not in summary.lower()

    # repeated seeds: means with their 95% intervals, ratios of the means
    seeded = tmp_path / "seeds"
    seeded.mkdir()
    for seed, ppl in ((1, 100.0), (2, 104.0), (3, 102.0)):
        for r in passing_set().values():
            if r.model_name == "resnet_bk_baseline":
                continue
            r.model_name = f"{r.model_name}-seed{seed}"
            r.config["model_name"] = r.model_name
            r.seed = r.config["seed"] = seed
            r.test_perplexity *= ppl / 100
            r.save(seeded / f"{r.model_name}_results.json")
    md = build_report(seeded)["report_md"].read_text()
    summary = md[md.index("## Summary"):md.index("## Setup")]
    assert "`transformer_baseline` 102.00 (n = 3, 95% CI" in summary
    assert "`resnet_bk_full` 122.40 (n = 3, 95% CI" in summary and "1.20x" in summary
    assert "-seed1" not in summary
    # each run once: no single-number line that names the seed means without their intervals
    assert "Test perplexity:" not in summary and "(seed mean)" not in summary


# --- report details (issue 28, item 10) ---------------------------------------------------

def test_memory_wording_follows_the_sign(tmp_path):
    """A peak memory above the Transformer's reads "x% higher", never "-x% lower"."""
    results = passing_set(mem=1706.0)
    memory = {c.name: c for c in audit_claims(results)}["peak_memory"]
    assert "1,706.0 vs 1,000.0 MiB: 70.6% higher" in memory.measured
    assert memory.verdict == "FAIL" and "-70.6%" not in memory.measured
    lower = {c.name: c for c in audit_claims(passing_set())}["peak_memory"]
    assert "600.0 vs 1,000.0 MiB: 40.0% lower" in lower.measured
    for r in results.values():
        r.save(tmp_path / f"{r.model_name}_results.json")
    md = build_report(tmp_path)["report_md"].read_text()
    summary = md[md.index("## Summary"):md.index("## Setup")]
    assert "1.71x the Transformer's, 70.6% higher" in summary
    assert "0.70x the Transformer's, 30.0% lower" in summary      # resnet_bk_baseline
    assert "-70.6% lower" not in md


def _with_selection(r: BenchmarkResults, passes: int) -> BenchmarkResults:
    r.flops["selection"] = {"total": passes, "by_flag": {"use_active_learning": passes}}
    r.total_flops += passes
    return r


def test_training_flops_bar_equals_the_tables_total():
    """The bar stacks the steps' components and the selection passes; its height is the
    Results table's training FLOPs (selection included), which the steps alone fall short of."""
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    from bkbench.report import training_flops_stack
    from bkbench.report.plots import _training_flops_bars

    results = passing_set()
    _with_selection(results["resnet_bk_full"], 1_348_000_000)
    stack = training_flops_stack(results["resnet_bk_full"])
    assert stack["selection"] == 1_348_000_000
    assert sum(stack.values()) == results["resnet_bk_full"].total_flops
    fig, ax = plt.subplots()
    _training_flops_bars(ax, results)
    heights = {}
    for patch in ax.patches:
        x = round(patch.get_x() + patch.get_width() / 2)
        heights[x] = max(heights.get(x, 0.0), patch.get_y() + patch.get_height())
    plt.close(fig)
    for i, r in enumerate(results.values()):
        assert heights[i] == pytest.approx(r.total_flops, rel=1e-12)


def test_one_epoch_runs_are_marked_points_and_said_so():
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    from bkbench.report.plots import _curves

    results = passing_set()
    for r in results.values():
        r.epoch_losses, r.epoch_perplexities, r.epoch_times = [5.0], [150.0], [9.0]
    fig, axes = plt.subplots(1, 3)
    _curves(axes, results)
    for ax in axes:
        assert "one epoch: one point per run" in ax.get_title()
        assert list(ax.get_xticks()) == [1]
        for line in ax.get_lines():
            assert line.get_marker() == "D" and line.get_linestyle() == "None"
            assert line.get_label().endswith("(1 epoch)")
    plt.close(fig)


def test_flag_measurements_are_readable_lines_with_nothing_cut(tmp_path):
    results = passing_set()
    long_value = "a description that is far longer than sixty characters, to be shown whole"
    results["resnet_bk_full"].flags = {"use_act": {
        "settings": {"weight": 0.01, "eps": 0.01},
        "measured": {"layers_used": {"mean": 2.5, "histogram": {"1": 10, "4": 30}},
                     "note": long_value, "validation_curve": [{"epoch": 1}]}}}
    for r in results.values():
        r.save(tmp_path / f"{r.model_name}_results.json")
    md = build_report(tmp_path)["report_md"].read_text()
    section = md[md.index("## Optimisation flags"):md.index("## Claims audit")]
    row = next(line for line in section.splitlines() if line.startswith("| `use_act`"))
    assert "weight: 0.01<br>eps: 0.01" in row
    assert "layers_used:<br>  mean: 2.5<br>  histogram:<br>    1: 10<br>    4: 30" in row
    assert f"note: {long_value}" in row
    assert "..." not in row and "{" not in row and "validation_curve" not in row
