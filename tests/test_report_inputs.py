"""Every JSON file the report reads is validated first: a bad one is named (file, where, what)
and skipped, never a traceback and never silently ignored (issue 26, item 5)."""

from __future__ import annotations

import json

import pytest

from bkbench.report import report_main

from test_report import passing_set

NAN_ROWS = ('{"rows": [{"row": "bk-baseline", "test_perplexity": NaN, "delta": Infinity}], '
            '"seeds": null}')


def _summary(mean):
    return {"mean": mean, "ci_low": None, "ci_high": None}


def valid_ablation() -> dict:
    row = {"row": "bk-baseline", "flags": [], "runs": ["bk-baseline"],
           "test_perplexity": _summary(120.0),
           "delta_vs_baseline": {"delta": 0.0, "relative": 0.0, "ci_low": None, "ci_high": None},
           "step_flops": _summary(1e9), "tokens_per_second": _summary(5000.0),
           "peak_memory_mb": _summary(600.0), "model_size_mb": _summary(16.0)}
    return {"kind": "bkbench ablation", "seeds": [0], "split_scheme": "official",
            "parallel_jobs": 1, "timing_note": None, "rows": [row]}


def valid_scale() -> dict:
    points = [{"model_name": m, "axis": "n_seq", "value": n, "batch_size": 2, "n_seq": n,
               "tokens_per_second": 1000.0, "seconds_per_token": 1e-3, "step_seconds": [0.1],
               "peak_memory_mb": 100.0 * n, "memory_method": "rss", "flops_per_token": 1e6,
               "mixer_flops_per_token": 1e5, "num_parameters": 1000}
              for m in ("transformer_baseline", "resnet_bk_full") for n in (64, 128)]
    fit = {"exponent": 1.0, "coefficient": 1.0, "r_squared": 1.0, "points": 2}
    metrics = ("seconds_per_token", "peak_memory_mb", "flops_per_token",
               "mixer_flops_per_token")
    return {"kind": "bkbench scale sweep", "axis": "n_seq", "values": [64, 128],
            "tokens_per_batch": None, "steps": 3, "warmup": 1, "vocab_size": 300,
            "configs": {}, "points": points,
            "fits": {m: {k: fit for k in metrics} for m in ("transformer_baseline",
                                                             "resnet_bk_full")}}


def _folder(tmp_path):
    for r in passing_set().values():
        r.save(tmp_path / f"{r.model_name}_results.json")
    return tmp_path


def _report(folder, capsys) -> tuple[int, str, str]:
    code = report_main(str(folder))
    err = capsys.readouterr().err
    md = (folder / "report.md").read_text() if (folder / "report.md").exists() else ""
    return code, err, md


def _tampered_ablations():
    wrong_types = valid_ablation()
    wrong_types["rows"][0]["test_perplexity"] = {"mean": "120"}
    wrong_seeds = valid_ablation()
    wrong_seeds["seeds"] = "0,1"
    no_rows = valid_ablation()
    no_rows["rows"] = []
    return {"nan and infinity": NAN_ROWS, "a list": "[]", "not json": "{rows: ",
            "mean as a string": json.dumps(wrong_types), "seeds a string": json.dumps(wrong_seeds),
            "no rows": json.dumps(no_rows)}


@pytest.mark.parametrize("case", list(_tampered_ablations()))
def test_a_tampered_ablation_json_is_named_and_skipped(tmp_path, capsys, case):
    folder = _folder(tmp_path)
    (folder / "ablation.json").write_text(_tampered_ablations()[case])
    code, err, md = _report(folder, capsys)
    assert code == 0
    assert "ablation.json skipped: " in err and "Traceback" not in err
    assert "ablation.json skipped: " in md and "## Ablation" not in md
    assert "## Summary" in md          # the rest of the report is built


def test_the_skip_says_where_and_what(tmp_path, capsys):
    folder = _folder(tmp_path)
    (folder / "ablation.json").write_text(NAN_ROWS)
    assert "holds NaN, which bkbench never writes" in _report(folder, capsys)[1]
    bad = valid_ablation()
    bad["rows"][0]["step_flops"]["mean"] = "lots"
    (folder / "ablation.json").write_text(json.dumps(bad))
    err = _report(folder, capsys)[1]
    assert "$.rows[0].step_flops.mean" in err and "'lots' is not of type 'number'" in err


@pytest.mark.parametrize("change", ["points", "fits", "values", "axis", "list"])
def test_a_scale_json_of_wrong_types_is_named_and_skipped(tmp_path, capsys, change):
    folder = _folder(tmp_path)
    scale = valid_scale()
    if change == "points":
        scale["points"][0]["peak_memory_mb"] = "100 MiB"
    elif change == "fits":
        scale["fits"]["resnet_bk_full"]["peak_memory_mb"] = {"exponent": "one"}
    elif change == "values":
        scale["values"] = "64,128"
    elif change == "axis":
        scale["axis"] = "n_heads"
    else:
        scale = [scale]
    (folder / "scale.json").write_text(json.dumps(scale))
    code, err, md = _report(folder, capsys)
    assert code == 0 and "Traceback" not in err
    assert "scale.json skipped: " in err and "scale.json skipped: " in md
    assert "## Scaling with" not in md


def test_valid_ablation_and_scale_files_are_reported(tmp_path, capsys):
    folder = _folder(tmp_path)
    (folder / "ablation.json").write_text(json.dumps(valid_ablation()))
    (folder / "scale.json").write_text(json.dumps(valid_scale()))
    code, err, md = _report(folder, capsys)
    assert code == 0 and "skipped" not in err
    assert "## Ablation" in md and "## Scaling with n_seq" in md


@pytest.mark.parametrize("field, value", [
    ("flops", {"training": {"by_component": "lots"}}),
    ("flags", {"use_act": "on"}),
    ("epoch_losses", [1.0, "2"]),
    ("test_perplexity", "NaN"),
])
def test_a_results_file_of_wrong_types_is_named_and_skipped(tmp_path, capsys, field, value):
    folder = _folder(tmp_path)
    path = folder / "resnet_bk_baseline_results.json"
    data = json.loads(path.read_text())
    data[field] = value
    path.write_text(json.dumps(data))
    code, err, md = _report(folder, capsys)
    assert code == 0 and "Traceback" not in err
    assert f"resnet_bk_baseline_results.json skipped: at $.{field}" in err
    assert "resnet_bk_baseline_results.json skipped" in md
    assert "`resnet_bk_full`" in md     # the other runs are reported


def test_a_results_file_holding_nan_is_skipped(tmp_path, capsys):
    folder = _folder(tmp_path)
    path = folder / "resnet_bk_baseline_results.json"
    path.write_text(path.read_text().replace('"test_perplexity": 125.0',
                                             '"test_perplexity": NaN'))
    code, err, md = _report(folder, capsys)
    assert code == 0
    assert "resnet_bk_baseline_results.json skipped: holds NaN" in err


def _size_scaling_table() -> dict:
    from bkbench.experiments import size_scaling as ss
    points = [{"model": m, "size": size, "seed": seed, "params": params,
               "train_flops": params * 6e3, "train_tokens": 1000,
               "test_loss": e + 30 * params ** -0.5 + 0.01 * seed, "test_bits_per_byte": None}
              for m, e in (("transformer_baseline", 2.0), ("resnet_bk_baseline", 2.3))
              for size, params in ((16, 1e4), (32, 4e4), (64, 1.6e5)) for seed in (0, 1)]
    table = ss.analyse(points, "d_model")
    table["setup"] = {"dataset": "wikitext-2", "tokenizer": "bpe:8192", "split_scheme": "proxy",
                      "max_tokens": 4096, "budget_flops": None, "n_seq": 64, "batch_size": 8}
    return table


def test_a_size_sweep_in_the_folder_gets_its_section(tmp_path, capsys):
    folder = _folder(tmp_path)
    (folder / "size_scaling.json").write_text(json.dumps(_size_scaling_table()))
    code, err, md = _report(folder, capsys)
    assert code == 0 and "skipped" not in err
    section = md.split("## Quality against model size", 1)[1]
    assert "resnet_bk_baseline" in section and "+0.300" in section   # the gap at every size


def test_a_size_sweep_of_wrong_types_is_named_and_skipped(tmp_path, capsys):
    folder = _folder(tmp_path)
    table = _size_scaling_table()
    table["gaps"]["resnet_bk_baseline"]["by_size"]["16"]["diff"] = "0.3"
    (folder / "size_scaling.json").write_text(json.dumps(table))
    code, err, md = _report(folder, capsys)
    assert code == 0 and "Traceback" not in err
    assert "size_scaling.json skipped: " in err and "Quality against model size" not in md


def test_run_names_are_ordered_by_the_numbers_in_them(tmp_path):
    # a size sweep's runs: string order put d_model128 before d_model64 in every table
    import dataclasses

    from bkbench.report.inputs import load_results_dir

    template = next(iter(passing_set().values()))
    names = ["resnet_bk_baseline-d_model128", "resnet_bk_baseline-d_model64",
             "resnet_bk_baseline-d_model256", "bk-seed10", "bk-seed2"]
    for name in names:
        dataclasses.replace(template, model_name=name).save(tmp_path / f"{name}_results.json")
    results, problems = load_results_dir(tmp_path)
    assert problems == []
    assert list(results) == ["bk-seed2", "bk-seed10", "resnet_bk_baseline-d_model64",
                             "resnet_bk_baseline-d_model128", "resnet_bk_baseline-d_model256"]
