"""Flag default-setting sweeps: the rows, the validation-only rule, the file and its docs."""

import copy
import json
import shlex

import pytest

from bkbench.config import ConfigError, build_run_configs
from bkbench.experiments import flag_sweeps as fs
from bkbench.experiments.ablate import ablation_rows
from bkbench.flags.registry import REGISTRY, flags_doc_markdown
from bkbench.runs import config_changes


def smoke_base(**overrides):
    return build_run_configs("smoke", overrides={"split_scheme": "proxy", **overrides},
                             models=["resnet_bk_baseline"])[0]


def by_flag(flag):
    return next(s for s in fs.SWEEPS if s.flag == flag)


def test_every_registered_flag_is_swept_or_says_why_not():
    swept = [s.flag for s in fs.SWEEPS]
    assert len(set(swept)) == len(swept)
    assert set(swept) | set(fs.NOT_SWEPT) == set(REGISTRY)
    assert not set(swept) & set(fs.NOT_SWEPT)
    for s in fs.SWEEPS:
        assert 2 <= len(s.values) <= 3 and len(set(s.values)) == len(s.values), s.flag
        assert s.default in s.values, f"{s.flag}: the current default must be a candidate"
    saving = {s.short for s in fs.SWEEPS if s.goal == "saving"}
    assert saving == {"pruning", "early_exit", "sparse_bk", "multi_scale", "act"}


def test_each_candidate_differs_from_the_baseline_only_in_its_flag_and_setting():
    base = smoke_base()
    rows = fs.sweep_rows(base, fs.SWEEPS)
    assert len(rows) == 1 + sum(len(s.values) for s in fs.SWEEPS)
    baseline = rows[fs.BASELINE_ROW]
    assert baseline.enabled_flags() == []
    for s in fs.SWEEPS:
        for value in s.values:
            row = rows[fs.row_name(s, value)]
            assert row.enabled_flags() == [s.flag]
            diffs = config_changes(baseline.to_dict(), row.to_dict())
            changed = {line.split(":")[0] for line in diffs}
            assert changed == {"model_name", s.flag} | ({"flag_settings"} if value != s.default
                                                        else set())
            expected = copy.deepcopy(baseline.flag_settings)
            expected[s.short][s.setting] = value
            assert row.flag_settings == expected


def test_the_baseline_and_default_rows_are_the_ablations_rows():
    base = smoke_base()
    ablation = ablation_rows(base)
    rows = fs.sweep_rows(base, fs.SWEEPS)
    for s in fs.SWEEPS:
        name = fs.row_name(s, s.default)
        assert name == f"bk+{s.short}"
        assert config_changes(ablation[name].to_dict(), rows[name].to_dict()) == []
    assert config_changes(ablation["bk-baseline"].to_dict(), rows["bk-baseline"].to_dict()) == []


def test_a_rows_command_is_a_bkbench_run_of_the_same_config(shared_data_dir):
    from bkbench.cli import _configs_from_args, build_parser
    overrides = {"data_dir": str(shared_data_dir), "split_scheme": "proxy", "max_steps": 3}
    rows = fs.sweep_rows(smoke_base(**overrides), fs.SWEEPS)
    cases = [(None, None, fs.BASELINE_ROW)] + [(s, v, fs.row_name(s, v)) for s in fs.SWEEPS
                                               for v in s.values if v != s.default]
    for sweep, value, name in cases:
        words = shlex.split(fs.run_command("smoke", overrides, sweep, value))
        assert words[:2] == ["bkbench", "run"]
        args = build_parser("run").parse_args(words[1:])
        (config,) = _configs_from_args(args)
        assert config_changes(rows[name].to_dict(), config.to_dict()) == \
            [f"model_name: finished run has {name!r}, this one {config.model_name!r}"]


class Results:
    """A results file's numbers; reading a test-split field fails the test."""

    def __init__(self, valid, test, saving=None, flag=None, seed=7):
        self.valid_perplexity, self._test = valid, test
        self.total_flops, self.training_time, self.tokens_per_second = 1e12, 10.0, 5000.0
        self.seed, self.best_epoch = seed, 1
        self.config = {"split_scheme": "proxy", "n_layers": 4, "d_model": 64}
        self.environment = {"git_commit": "abc"}
        self.flags = {}
        if flag == "use_pruning":
            self.flags[flag] = {"measured": {"forward_flops_ratio": 1 - saving}}
        elif flag is not None:
            self.flags[flag] = {"measured": {}}

    def __getattr__(self, name):
        if name.startswith("test") or name.startswith("final"):
            raise AssertionError(f"the sweep read {name}, a test-split number")
        raise AttributeError(name)


def synthetic(sweep, numbers, baseline=100.0):
    """Results of the baseline and of ``sweep``'s values: value -> (valid, test, saving)."""
    out = {fs.BASELINE_ROW: Results(baseline, baseline)}
    for value, (valid, test, saving) in numbers.items():
        out[fs.row_name(sweep, value)] = Results(valid, test, saving, sweep.flag)
    return out


def build(sweep, results, tolerance=0.02):
    return fs.build_sweeps([sweep], results, preset="default", overrides={},
                           command="python -m bkbench.experiments.flag_sweeps", tolerance=tolerance)


def test_a_saving_flag_takes_the_largest_saving_within_the_tolerance_on_validation():
    pruning = by_flag("use_pruning")
    # 0.75 saves most but costs 5% validation ppl; its *test* ppl would have looked best
    results = synthetic(pruning, {0.25: (100.5, 120.0, 0.10), 0.5: (101.9, 130.0, 0.20),
                                  0.75: (105.0, 90.0, 0.30)})
    entry = build(pruning, results)["flags"]["use_pruning"]
    assert entry["chosen"] == 0.5
    assert [c["within_tolerance"] for c in entry["candidates"]] == [True, True, False]
    assert [c["saving"] for c in entry["candidates"]] == pytest.approx([0.10, 0.20, 0.30])
    assert "test" not in json.dumps(entry["candidates"])
    # a looser tolerance admits 0.75
    assert build(pruning, results, tolerance=0.06)["flags"]["use_pruning"]["chosen"] == 0.75


def test_a_saving_flag_with_no_value_within_tolerance_takes_the_lowest_validation_ppl():
    pruning = by_flag("use_pruning")
    results = synthetic(pruning, {0.25: (104.0, 90.0, 0.1), 0.5: (103.0, 99.0, 0.2),
                                  0.75: (110.0, 80.0, 0.3)})
    entry = build(pruning, results)["flags"]["use_pruning"]
    assert entry["chosen"] == 0.5 and "no value within 2%" in entry["why_chosen"]


def test_a_quality_flag_takes_the_lowest_validation_ppl_and_ties_go_to_the_default():
    koopman = by_flag("use_koopman")
    results = synthetic(koopman, {0.01: (99.0, 120.0, None), 0.1: (99.5, 80.0, None),
                                  1.0: (101.0, 70.0, None)})
    entry = build(koopman, results)["flags"]["use_koopman"]
    assert entry["chosen"] == 0.01 and entry["goal"] == "quality"
    assert [c["saving"] for c in entry["candidates"]] == [None] * 3
    tied = synthetic(koopman, {0.01: (99.0, 1.0, None), 0.1: (99.0, 2.0, None),
                               1.0: (99.0, 3.0, None)})
    assert build(koopman, tied)["flags"]["use_koopman"]["chosen"] == koopman.default


def test_equal_savings_go_to_the_lower_validation_ppl_then_the_default():
    pruning = by_flag("use_pruning")
    others = [v for v in pruning.values if v != pruning.default]
    ppl = {v: 101.0 for v in pruning.values}
    ppl[others[-1]] = 100.0                    # one value alone has the lowest perplexity
    results = synthetic(pruning, {v: (p, 1.0, 0.2) for v, p in ppl.items()})
    assert build(pruning, results)["flags"]["use_pruning"]["chosen"] == others[-1]
    results = synthetic(pruning, {v: (100.0, 1.0, 0.2) for v in pruning.values})
    assert build(pruning, results)["flags"]["use_pruning"]["chosen"] == pruning.default


def test_early_exit_saving_is_read_from_the_best_epochs_validation_calibration():
    def table(layers_at_chosen):
        return [{"threshold": "no exit", "perplexity": 9.0, "mean_exit_layer": 4.0},
                {"threshold": 0.99, "perplexity": 9.1, "mean_exit_layer": layers_at_chosen},
                {"threshold": 0.9, "perplexity": 9.9, "mean_exit_layer": 1.5}]

    r = Results(100.0, 100.0)
    r.best_epoch = 2
    r.flags["use_early_exit"] = {"measured": {"calibrations": [
        {"epoch": 1, "chosen": 0.9, "table": table(3.5)},
        {"epoch": 2, "chosen": 0.99, "table": table(3.0)},
        {"epoch": 3, "chosen": "no exit", "table": table(2.0)}],
        "held_out_with_and_without": {"mean_layers_used": {"with": 1.0, "without": 4.0}}}}
    assert fs._early_exit_saving(r) == pytest.approx(1 - 3.0 / 4)


def small_sweeps_file():
    pruning, koopman = by_flag("use_pruning"), by_flag("use_koopman")
    results = synthetic(pruning, {0.25: (100.5, 1.0, 0.10), 0.5: (101.9, 1.0, 0.20),
                                  0.75: (105.0, 1.0, 0.30)})
    results.update(synthetic(koopman, {0.01: (99.0, 1.0, None), 0.1: (99.5, 1.0, None),
                                       1.0: (101.0, 1.0, None)}))
    return fs.build_sweeps([pruning, koopman], results, preset="default",
                           overrides={"split_scheme": "proxy"},
                           command="python -m bkbench.experiments.flag_sweeps --split-scheme proxy")


def section(doc, flag):
    start = doc.index(f"## `{flag}`")
    end = doc.find("\n## `", start + 1)
    return doc[start:end if end >= 0 else len(doc)]


def test_docs_render_each_flags_sweep_in_its_section(tmp_path, capsys):
    from bkbench.flags.__main__ import main
    path = tmp_path / "flag_sweeps.json"
    path.write_text(json.dumps(small_sweeps_file()))
    assert main(["--sweeps", str(path)]) == 0
    doc = capsys.readouterr().out
    pruning = section(doc, "use_pruning")
    assert "`pruning_target_sparsity` swept on the **validation** split" in pruning
    assert "PROXY split scheme, commit abc)" in pruning
    assert "python -m bkbench.experiments.flag_sweeps" in pruning
    sweep_part = pruning[pruning.index("Default settings:"):]
    lines = [line for line in sweep_part.splitlines() if line.startswith("| ")]
    assert lines[0].startswith("| value | valid ppl | vs baseline | saving | training FLOPs |")
    assert lines[1].startswith("| baseline (flag off) | 100.00 | +0.00% |")
    assert lines[2].startswith("| `0.25` | 100.50 | +0.50% | 0.1000 |")
    assert lines[3].startswith("| `0.5`") and "| 101.90 | +1.90% | 0.2000 |" in lines[3]
    assert lines[3].endswith("| **chosen** |") and not lines[4].endswith("**chosen** |")
    # the default when the sweep ran is marked
    marked = [line for line in lines[2:] if "(default when swept)" in line]
    assert len(marked) == 1 and marked[0].startswith(f"| `{by_flag('use_pruning').default!r}` (default")
    assert "within 2% of the baseline" in pruning
    koopman = section(doc, "use_koopman")
    assert "| `0.01`" in koopman and "| 99.00 | -1.00% |" in koopman
    assert "lowest validation perplexity" in koopman
    assert "not swept" in section(doc, "use_quantization")
    assert "swept" not in section(doc, "use_act")      # not in this file: no sweep text
    # without --sweeps the page is the registry's alone
    assert flags_doc_markdown() == flags_doc_markdown(None)
    assert "swept" not in flags_doc_markdown()


def test_a_bad_sweeps_file_is_refused_in_one_line_with_exit_2(tmp_path, capsys):
    from bkbench.flags.__main__ import main
    data = small_sweeps_file()
    data["selection_split"] = "test"
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    assert main(["--sweeps", str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.strip().splitlines()) == 1
    assert "selection_split" in captured.err and "not a flag sweeps file" in captured.err
    data = small_sweeps_file()
    data["flags"]["use_pruning"]["candidates"][0]["valid_perplexity"] = float("nan")
    path.write_text(json.dumps(data))
    assert main(["--sweeps", str(path)]) == 2
    assert "NaN" in capsys.readouterr().err


@pytest.mark.parametrize("args,message", [
    (["--flags", "quantization"], "quantization has no setting to sweep"),
    (["--flags", "pruning,nope"], "unknown flag 'nope'"),
    (["--flags", "act,act"], "names a flag twice"),
    (["--flags", " , "], "names no flag"),
    (["--jobs", "0"], "--jobs must be at least 1"),
    (["--tolerance", "1.5"], "--tolerance must be in [0, 1)"),
    (["--resume", "--overwrite"], "contradict each other"),
])
def test_bad_arguments_exit_2_in_one_line_writing_nothing(args, message, tmp_path, capsys):
    out_dir = tmp_path / "out"
    assert fs.main(["--preset", "smoke", *args, "--output-dir", str(out_dir)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not out_dir.exists()


@pytest.mark.slow
def test_a_smoke_sweep_of_one_flag_trains_its_rows_and_chooses_on_validation(shared_data_dir,
                                                                              tmp_path):
    from bkbench.flags.sweeps_doc import load_flag_sweeps
    from bkbench.results import BenchmarkResults
    sweep = fs.Sweep("use_multi_scale", "factor", (2, 4), "two factors",
                     "1 - forward_flops.ratio", fs._forward_flops_saving("use_multi_scale"))
    # a slice of WikiText-2 as a dir: corpus: whole-split evaluations of a few seconds each
    text = (shared_data_dir / "wiki.valid.tokens").read_text(encoding="utf-8")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for name, (start, end) in {"train": (0, 40_000), "valid": (40_000, 52_000),
                               "test": (52_000, 64_000)}.items():
        (corpus / f"{name}.txt").write_text(text[start:end], encoding="utf-8")
    overrides = {"dataset": f"dir:{corpus}", "max_steps": 2}
    out = tmp_path / "sweeps"
    data = fs.run_sweeps("smoke", overrides, out, sweeps=[sweep], progress=False)
    assert load_flag_sweeps(out / fs.SWEEPS_FILE) == json.loads(json.dumps(data))
    entry = data["flags"]["use_multi_scale"]
    runs = {name: BenchmarkResults.load(out / f"{name}_results.json")
            for name in ["bk-baseline"] + [c["row"] for c in entry["candidates"]]}
    assert data["baseline"]["valid_perplexity"] == runs["bk-baseline"].valid_perplexity
    for c in entry["candidates"]:
        r = runs[c["row"]]
        assert r.config["flag_settings"]["multi_scale"]["factor"] == c["value"]
        assert c["valid_perplexity"] == r.valid_perplexity
        assert c["training_flops"] == r.total_flops
        ratio = r.flags["use_multi_scale"]["measured"]["forward_flops"]["ratio"]
        assert c["saving"] == pytest.approx(1 - ratio) and 0 < c["saving"] < 1
    savings = {c["value"]: c["saving"] for c in entry["candidates"]}
    assert savings[4] > savings[2]          # the middle block runs on a quarter of the positions
    bound = data["baseline"]["valid_perplexity"] * 1.02
    within = [c for c in entry["candidates"] if c["valid_perplexity"] <= bound]
    expected = (max(within, key=lambda c: c["saving"]) if within
                else min(entry["candidates"], key=lambda c: c["valid_perplexity"]))["value"]
    assert entry["chosen"] == expected
    table = (out / "flag_sweeps.md").read_text()
    assert table.count("(default when swept)") == 1 and table.count("**chosen**") == 1
    assert "| `2`" in table and "| `4`" in table
    assert "Default settings: `multi_scale_factor` swept" in flags_doc_markdown(data)
    with pytest.raises(ConfigError, match="--resume"):
        fs.run_sweeps("smoke", overrides, out, sweeps=[sweep], progress=False)
