"""The command line: bad input stops before any work with exit 2; a smoke run writes results."""

import json
import subprocess
import sys

import pytest

from bkbench.cli import main
from bkbench.config import ConfigError, build_run_configs


def exit_code(argv):
    try:
        return main(argv)
    except SystemExit as exc:  # argparse's own errors
        return exc.code


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "bkbench", *args], capture_output=True,
                          text=True, cwd=cwd, timeout=600)


@pytest.mark.parametrize("args,message", [
    (["--d-model", "-4"], "d_model must be a positive integer"),
    (["--n-layers", "0"], "n_layers must be a positive integer"),
    (["--models", "mamba_baseline"], "unknown model"),
    (["--lr", "0"], "lr must be > 0"),
    (["--top-k", "9", "--num-experts", "2"], "top_k (9) cannot exceed"),
    (["--use-act", "--models", "transformer_baseline"], "use_act applies to resnet_bk"),
    (["--use-analytic-gradient", "--models", "transformer_baseline"], "applies to resnet_bk"),
    (["--data-dir", "/nonexistent/wikitext"], "does not exist"),
    (["--eval-stride", "500"], "eval_stride"),
    (["--bk-eps", "0"], "bk_eps must be > 0"),
])
def test_bad_values_exit_2_with_one_line(args, message, tmp_path, capsys):
    out_dir = tmp_path / "results"
    assert exit_code(["run", "--preset", "smoke", "--output-dir", str(out_dir), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err
    assert len(err.splitlines()) == 1 or err.startswith("usage:")
    assert not out_dir.exists(), "nothing may be written when the input is bad"


def test_unknown_field_in_yaml_is_named_with_a_suggestion(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("d_modle: 32\n")
    assert exit_code(["run", "--config", str(cfg), "--output-dir", str(tmp_path / "o")]) == 2
    assert "did you mean 'd_model'" in capsys.readouterr().err


def test_missing_config_file(tmp_path, capsys):
    assert exit_code(["run", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_official_scheme_without_train_split_points_to_proxy(shared_data_dir, tmp_path, capsys):
    assert exit_code(["run", "--preset", "smoke", "--data-dir", str(shared_data_dir),
              "--output-dir", str(tmp_path / "o")]) == 2
    assert "--split-scheme proxy" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_context_longer_than_the_training_split_allows(shared_data_dir, tmp_path, capsys):
    code = exit_code(["run", "--preset", "smoke", "--data-dir", str(shared_data_dir),
                      "--split-scheme", "proxy", "--n-seq", "200000", "--output-dir",
                      str(tmp_path / "o")])
    assert code == 2
    assert "fewer than one batch" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_existing_results_untouched_by_a_bad_invocation(tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    existing = out / "transformer_baseline_results.json"
    existing.write_text('{"kept": true}')
    assert exit_code(["run", "--output-dir", str(out), "--n-seq", "-1"]) == 2
    assert existing.read_text() == '{"kept": true}'


def test_precedence_preset_file_override(tmp_path):
    values = {"d_model": 48, "runs": {"transformer_small": {"n_layers": 1}}}
    (cfg,) = build_run_configs("smoke", values, {"n_layers": 3})
    assert cfg.model_name == "transformer_small-n_layers3"  # a size override names a variant
    assert cfg.d_model == 48 and cfg.n_layers == 3 and cfg.n_seq == 64


def test_yaml_values_are_type_checked(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("lr: 1e-3\nmax_steps: 2\n")  # YAML reads 1e-3 as a string; accepted as float
    (config,) = build_run_configs("smoke", {"lr": "1e-3"}, models=["transformer_baseline"])
    assert config.lr == 1e-3
    with pytest.raises(ConfigError, match="n_layers must be an integer"):
        build_run_configs("smoke", {"n_layers": 2.5})
    with pytest.raises(ConfigError, match="tie_weights must be true or false"):
        build_run_configs("smoke", {"tie_weights": "yes please"})


def test_help_explains_every_config_field():
    proc = run_cli("run", "--help")
    assert proc.returncode == 0
    for f in ("--d-model", "--use-analytic-gradient", "--split-scheme", "--data-dir",
              "--preset", "--models", "--resume", "--bk-heads", "--num-experts"):
        assert f in proc.stdout


def test_smoke_run_writes_results_with_held_out_numbers(shared_data_dir, tmp_path):
    out = tmp_path / "results"
    proc = run_cli("run", "--preset", "smoke", "--data-dir", str(shared_data_dir),
                   "--split-scheme", "proxy", "--models", "transformer_baseline",
                   "--output-dir", str(out), "--max-steps", "3", "--quiet", "--tensorboard")
    assert proc.returncode == 0, proc.stderr
    res = json.loads((out / "transformer_baseline_results.json").read_text())
    assert res["data"]["scheme"] == "proxy"
    # the smoke preset is byte-level: valid + test are the official test file's bytes, halved
    assert res["valid_tokens"] + res["test_tokens"] == (shared_data_dir / "wiki.test.tokens").stat().st_size
    assert res["steps"] == 3
    assert res["test_perplexity"] == pytest.approx(2.718281828 ** res["test_loss"])
    assert res["environment"]["torch_version"]
    assert res["schema_version"] == 1
    assert "transformer_baseline" in proc.stdout and "PROXY" in proc.stdout
    assert list((out / "runs" / "transformer_baseline" / "tensorboard").glob("events.out.tfevents.*"))

    # --resume skips a run whose results are complete
    before = (out / "transformer_baseline_results.json").stat().st_mtime_ns
    again = run_cli("run", "--preset", "smoke", "--data-dir", str(shared_data_dir),
                    "--split-scheme", "proxy", "--models", "transformer_baseline",
                    "--output-dir", str(out), "--max-steps", "3", "--quiet", "--tensorboard",
                    "--resume")
    assert again.returncode == 0, again.stderr
    assert "skipping" in again.stderr
    assert (out / "transformer_baseline_results.json").stat().st_mtime_ns == before


def test_audit_command_exit_code_says_whether_every_model_is_causal(capsys):
    small = ["--preset", "smoke", "--vocab-size", "50", "--d-model", "16"]
    assert main(["audit", *small]) == 0
    out = capsys.readouterr().out
    assert out.count("CAUSAL: max leak 0.0") == 3
    assert main(["audit", *small, "--models", "resnet_bk_baseline", "--bk-mode", "bidirectional"]) == 1
    assert "resnet_bk_baseline-d_model16-bk_modebidirectional: NOT CAUSAL" in capsys.readouterr().out


def test_noncausal_model_is_refused_unless_allowed(shared_data_dir, tmp_path):
    out = tmp_path / "results"
    common = ["run", "--preset", "smoke", "--data-dir", str(shared_data_dir), "--split-scheme",
              "proxy", "--models", "resnet_bk_baseline", "--bk-mode", "bidirectional",
              "--output-dir", str(out), "--max-steps", "2", "--quiet"]
    refused = run_cli(*common)
    assert refused.returncode == 2
    assert "not causal" in refused.stderr and "--allow-noncausal" in refused.stderr
    variant = out / "resnet_bk_baseline-bk_modebidirectional_results.json"
    assert not list(out.glob("*_results.json"))

    allowed = run_cli(*common, "--allow-noncausal")
    assert allowed.returncode == 0, allowed.stderr
    res = json.loads(variant.read_text())
    assert res["perplexity_valid_for_lm"] is False
    assert res["causality"]["causal"] is False and res["causality"]["max_leak"] > 0
    assert "NO" in allowed.stdout  # the summary's causal column
