"""A new user's first hour (issue 18): results are never replaced by accident, variants get
their own names, the report compares like with like, the Python API computes what the CLI
computes, batch logs show settings and progress, and the command line starts fast."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest

from bkbench.cli import main
from bkbench.config import BenchmarkConfig, ConfigError, build_run_configs
from bkbench.report import build_report, like_for_like
from bkbench.runs import group_by_setup, setup_id, setup_of, variant_suffix
from bkbench.train import ProgressLines

from test_report import make_result, passing_set

SRC = Path(__file__).resolve().parents[1] / "src"


def bkbench(*args, cwd, stderr=subprocess.PIPE):
    return subprocess.run([sys.executable, "-m", "bkbench", *args], cwd=cwd, text=True,
                          stdout=subprocess.PIPE, stderr=stderr, timeout=600)


# --- never replace a finished result ---------------------------------------------------------

def _fake_finished_run(folder: Path, name: str, config: dict) -> dict[Path, bytes]:
    """A results file and a checkpoint of run ``name``; returns their bytes."""
    results = folder / f"{name}_results.json"
    ckpt = folder / "runs" / name / "checkpoints" / "step_00000100" / "model.safetensors"
    ckpt.parent.mkdir(parents=True)
    results.write_text(json.dumps({"model_name": name, "config": config}))
    ckpt.write_bytes(b"weights")
    return {results: results.read_bytes(), ckpt: ckpt.read_bytes()}


def _unchanged(files: dict[Path, bytes]) -> bool:
    return all(p.read_bytes() == content for p, content in files.items())


def test_finished_result_is_refused_naming_the_file_and_both_options(tmp_path, capsys):
    (config,) = build_run_configs("smoke", models=["transformer_baseline"])
    files = _fake_finished_run(tmp_path, "transformer_baseline", config.to_dict())
    args = ["run", "--preset", "smoke", "--models", "transformer_baseline",
            "--output-dir", str(tmp_path)]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "transformer_baseline_results.json" in err
    assert "--overwrite" in err and "--resume" in err
    assert _unchanged(files)

    # --resume keeps a finished run of another config too: it is not the same run
    assert main(args + ["--resume", "--lr", "0.5"]) == 2
    err = capsys.readouterr().err
    assert "another config" in err and "lr: finished run has 0.003, this one 0.5" in err
    assert _unchanged(files)
    assert main(args + ["--resume", "--overwrite"]) == 2  # contradictory
    assert _unchanged(files)


def test_checkpoints_of_an_unfinished_run_are_not_deleted_without_an_option(tmp_path, capsys):
    files = _fake_finished_run(tmp_path, "resnet_bk_full", {})
    next(iter(files)).unlink()  # no results: an unfinished run
    files = {p: c for p, c in files.items() if p.exists()}
    assert main(["run", "--preset", "smoke", "--models", "resnet_bk_full",
                 "--output-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "checkpoints" in err and "--resume" in err and "--overwrite" in err
    assert _unchanged(files)


def test_api_refuses_to_replace_a_finished_result(tmp_path):
    from bkbench import WikiText2Benchmark

    config = BenchmarkConfig.from_preset("smoke")
    files = _fake_finished_run(tmp_path, config.model_name, config.to_dict())
    with pytest.raises(ConfigError, match="--overwrite"):
        WikiText2Benchmark(tmp_path).run_benchmark(config)
    assert _unchanged(files)


@pytest.fixture(scope="module")
def quick_check(tmp_path_factory):
    """The README's quick check (one run, 2 steps), run after a main command's results exist
    in the default folder, from a fresh working directory, with stderr to a file."""
    from conftest import MISSING_DATA, SHARED_DATA, have_shared_data

    if not have_shared_data():
        pytest.skip(MISSING_DATA)
    cwd = tmp_path_factory.mktemp("user")
    default = cwd / "benchmark_results" / "wikitext2" / "default"
    default.mkdir(parents=True)
    (config,) = build_run_configs("default", models=["transformer_baseline"])
    main_files = _fake_finished_run(default, "transformer_baseline", config.to_dict())
    args = ["run", "--preset", "smoke", "--data-dir", str(SHARED_DATA), "--split-scheme",
            "proxy", "--models", "transformer_baseline", "--max-steps", "2", "--threads", "1"]
    log = cwd / "stderr.log"
    with open(log, "w") as err:
        proc = bkbench(*args, "--progress-interval", "0.001", cwd=cwd, stderr=err)
    assert proc.returncode == 0, log.read_text()[-3000:]
    results = cwd / "benchmark_results" / "wikitext2" / "smoke" / "transformer_baseline_results.json"
    return {"cwd": cwd, "args": args, "main_files": main_files, "log": log.read_text(),
            "results": results, "cli_result": json.loads(results.read_text())}


@pytest.mark.slow
@pytest.mark.xdist_group("quick_check")  # one worker runs the shared fixture once
def test_quick_check_after_the_main_command_leaves_its_results_intact(quick_check):
    assert _unchanged(quick_check["main_files"])
    assert json.loads(quick_check["results"].read_text())["steps"] == 2
    # the same quick check again is refused before any work; --overwrite replaces it
    before = quick_check["results"].read_bytes()
    again = bkbench(*quick_check["args"], "--quiet", cwd=quick_check["cwd"])
    assert again.returncode == 2
    assert "--overwrite" in again.stderr and "transformer_baseline_results.json" in again.stderr
    assert quick_check["results"].read_bytes() == before
    replaced = bkbench(*quick_check["args"], "--quiet", "--overwrite", "--max-steps", "1",
                       cwd=quick_check["cwd"])
    assert replaced.returncode == 0, replaced.stderr[-3000:]
    assert json.loads(quick_check["results"].read_text())["steps"] == 1
    assert _unchanged(quick_check["main_files"])


@pytest.mark.slow
@pytest.mark.xdist_group("quick_check")  # one worker runs the shared fixture once
def test_batch_log_echoes_the_settings_then_progress_lines_with_an_eta(quick_check):
    lines = quick_check["log"].splitlines()
    head = next(i for i, l in enumerate(lines) if "run transformer_baseline (architecture" in l)
    assert "setup " in lines[head]
    block = "\n".join(lines[head:head + 7])
    for expected in ("d_model=32", "flags: none", "max_steps=2", "warmup_steps=2",
                     "split_scheme=proxy", "tokenizer=byte", "smoke/transformer_baseline_results.json"):
        assert expected in block
    progress = [l for l in lines if "step " in l and "ETA" in l]
    assert [l.split("step ")[1].split(" ")[0] for l in progress] == ["1/2", "2/2"]
    assert all("tokens/s" in l and "loss " in l for l in progress)
    assert min(lines.index(l) for l in progress) > head
    assert "\r" not in quick_check["log"], "no progress bar in a log file"


@pytest.mark.slow
@pytest.mark.xdist_group("quick_check")  # one worker runs the shared fixture once
def test_python_api_computes_what_the_cli_computes(quick_check, tmp_path):
    from conftest import SHARED_DATA

    script = ("import json, sys\n"
              "from bkbench import BenchmarkConfig, WikiText2Benchmark\n"
              "config = BenchmarkConfig.from_preset('smoke', model_name='transformer_baseline',"
              f" split_scheme='proxy', data_dir={str(SHARED_DATA)!r}, max_steps=2)\n"
              "r = WikiText2Benchmark(sys.argv[1], progress=False, threads='1')"
              ".run_benchmark(config)\n")
    out = tmp_path / "api"
    proc = subprocess.run([sys.executable, "-c", script, str(out)], capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    api = json.loads((out / "transformer_baseline_results.json").read_text())
    cli = quick_check["cli_result"]
    assert api["config"] == cli["config"]
    for key in ("test_loss", "valid_loss", "epoch_losses", "epoch_perplexities",
                "test_tokens", "forward_flops", "backward_flops", "num_parameters"):
        assert api[key] == cli[key], key


def test_from_preset_is_the_cli_config():
    for name in ("transformer_baseline", "resnet_bk_baseline", "resnet_bk_full"):
        (cli,) = build_run_configs("default", models=[name])
        assert BenchmarkConfig.from_preset("default", model_name=name) == cli
    api = BenchmarkConfig.from_preset("default")
    assert api.warmup_steps == 20 and api.model_name == "transformer_baseline"
    (cli,) = build_run_configs("smoke", overrides={"d_model": 48}, models=["resnet_bk_full"])
    api = BenchmarkConfig.from_preset("smoke", model_name="resnet_bk_full", d_model=48)
    assert api == cli and api.model_name == "resnet_bk_full-d_model48"
    with pytest.raises(ConfigError, match="unknown preset"):
        BenchmarkConfig.from_preset("fast")


# --- variants get their own names -----------------------------------------------------------

def test_model_and_flag_overrides_name_a_variant_training_overrides_do_not():
    names = lambda **kw: [c.model_name for c in build_run_configs("default", **kw)]  # noqa: E731
    assert names(overrides={"d_model": 128}) == [
        "transformer_baseline-d_model128", "resnet_bk_baseline-d_model128",
        "resnet_bk_full-d_model128"]
    # a value equal to the run's own is no change; a setting the architecture ignores neither
    assert names(overrides={"d_model": 64, "bk_heads": 2}) == [
        "transformer_baseline", "resnet_bk_baseline-bk_heads2", "resnet_bk_full-bk_heads2"]
    assert names(overrides={"use_analytic_gradient": True},
                 models=["resnet_bk_baseline", "resnet_bk_full"]) == [
        "resnet_bk_baseline-use_analytic_gradient", "resnet_bk_full"]
    assert names(overrides={"tie_weights": True, "bk_h0": -1.5},
                 models=["resnet_bk_full"]) == ["resnet_bk_full-tie_weights-bk_h0-1.5"]
    assert names(overrides={"epochs": 1, "lr": 3e-4, "dropout": 0.0,
                            "split_scheme": "proxy"}) == [
        "transformer_baseline", "resnet_bk_baseline", "resnet_bk_full"]
    assert names(overrides={"d_model": 128}, run_suffix="wide") == [
        "transformer_baseline-wide", "resnet_bk_baseline-wide", "resnet_bk_full-wide"]
    with pytest.raises(ConfigError, match="run-suffix"):
        build_run_configs("default", run_suffix="a/b")
    assert variant_suffix({"use_x": True}, {"use_x": False}, ["use_x"]) == "-no_use_x"
    # every flag switched on from the command line: a name that still fits the 100-character
    # file-name limit (it was refused, for `bkbench run` and `bkbench audit` alike), the same
    # for the same overrides and different for others
    from bkbench.config import OPTIMIZATION_FLAGS
    many = names(overrides={f: True for f in OPTIMIZATION_FLAGS}, models=["resnet_bk_baseline"])
    fewer = names(overrides={f: True for f in OPTIMIZATION_FLAGS[:8]},
                  models=["resnet_bk_baseline"])
    assert many[0].startswith("resnet_bk_baseline-12changes-") and len(many[0]) <= 100
    assert fewer[0].startswith("resnet_bk_baseline-8changes-") and fewer[0][-8:] != many[0][-8:]
    assert many == names(overrides={f: True for f in OPTIMIZATION_FLAGS},
                         models=["resnet_bk_baseline"])


def test_default_output_folder_is_named_after_the_preset(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    smoke = tmp_path / "benchmark_results" / "wikitext2" / "smoke"
    (config,) = build_run_configs("smoke", models=["transformer_baseline"])
    files = _fake_finished_run(smoke, "transformer_baseline", config.to_dict())
    assert main(["run", "--preset", "smoke", "--models", "transformer_baseline"]) == 2
    assert "wikitext2/smoke/transformer_baseline_results.json" in capsys.readouterr().err
    assert _unchanged(files)


# --- the report compares like with like -----------------------------------------------------

def _mixed_folder() -> dict:
    results = passing_set()
    smoke = make_result("resnet_bk_full-byte", ppl=3.0, fwd=1e8, bwd=1e8, tps=9000, mem=10,
                        analytic=True)
    smoke.config["tokenizer"] = "byte"
    wide = make_result("resnet_bk_full-d_model128", ppl=90.0, fwd=1e11, bwd=1e11, tps=3000,
                       mem=800, analytic=True)
    wide.config["d_model"] = 128
    heads = make_result("resnet_bk_full-bk_heads2", ppl=110.0, fwd=5e10, bwd=2.5e10, tps=5000,
                        mem=600, analytic=True)
    heads.config["bk_heads"] = 2  # the run's own setting: same setup as the baseline
    other_data = copy.deepcopy(results["resnet_bk_baseline"])
    other_data.model_name = "resnet_bk_baseline-x"
    other_data.data["checksums"] = {"wiki.test.tokens": "different"}
    for r in (smoke, wide, heads, other_data):
        results[r.model_name] = r
    return results


def test_runs_are_compared_only_within_one_setup(tmp_path, capsys):
    results = _mixed_folder()
    groups = group_by_setup(results)
    assert sorted(groups[0]["runs"]) == ["resnet_bk_baseline", "resnet_bk_full",
                                         "resnet_bk_full-bk_heads2", "transformer_baseline"]
    assert len(groups) == 4
    comparisons, left_out = like_for_like(results)
    assert sorted((d["a"], d["b"]) for d in comparisons) == sorted([
        ("transformer_baseline", "resnet_bk_baseline"),
        ("transformer_baseline", "resnet_bk_full"),
        ("transformer_baseline", "resnet_bk_full-bk_heads2"),
        ("resnet_bk_baseline", "resnet_bk_full"),
        ("resnet_bk_baseline", "resnet_bk_full-bk_heads2")])
    why = {line.split(":")[0]: line for line in left_out}
    assert set(why) == {"resnet_bk_full-byte", "resnet_bk_full-d_model128", "resnet_bk_baseline-x"}
    assert "tokenizer: 'word' vs 'byte'" in why["resnet_bk_full-byte"]
    assert "d_model: 64 vs 128" in why["resnet_bk_full-d_model128"]
    assert "data files (sha256)" in why["resnet_bk_baseline-x"]

    for r in results.values():
        r.save(tmp_path / f"{r.model_name}_results.json")
    build_report(tmp_path)
    written = sorted(p.name for p in tmp_path.glob("comparison_*.json"))
    assert len(written) == 5 and not any("byte" in n or "d_model128" in n for n in written)
    report = (tmp_path / "report.md").read_text()
    assert "Left out of the comparisons" in report and "resnet_bk_full-byte" in report


def test_setup_ignores_the_runs_own_settings_and_bookkeeping():
    a = BenchmarkConfig.from_preset("default", model_name="transformer_baseline").to_dict()
    b = BenchmarkConfig.from_preset("default", model_name="resnet_bk_full", bk_heads=4,
                                    checkpoint_every=10, device="cpu").to_dict()
    assert setup_id(setup_of(a)) == setup_id(setup_of(b))
    c = BenchmarkConfig.from_preset("default", warmup_steps=0).to_dict()
    assert setup_id(setup_of(a)) != setup_id(setup_of(c))


# --- logs -----------------------------------------------------------------------------------

def test_progress_lines_come_at_least_every_interval(caplog):
    now = [0.0]
    lines = ProgressLines("run", total_steps=100, start_step=0, interval=30.0,
                          clock=lambda: now[0])
    printed = []
    with caplog.at_level("INFO", logger="bkbench.train"):
        for step in range(1, 101):
            now[0] += 7.0  # one step every 7 s
            if lines.step(step, 0, 1, 2.0, 1000.0):
                printed.append((step, now[0]))
    times = [t for _, t in printed]
    assert printed[0][0] == 1
    assert all(30.0 <= b - a <= 37.0 for a, b in zip(times, times[1:]))
    # the line at step 6: 42 s for 6 steps, 94 steps left at 7 s each: 658 s
    at6 = next(r.getMessage() for r in caplog.records if "step 6/100" in r.getMessage())
    assert "elapsed 0m42s" in at6 and "ETA 10m58s" in at6


# --- start-up and help ----------------------------------------------------------------------

def test_help_imports_no_torch_and_audit_help_has_no_training_options():
    code = ("import sys, contextlib, io\n"
            "from bkbench.cli import main\n"
            "for argv in (['--help'], ['--version'], ['-v', '--help']):\n"
            "    with contextlib.redirect_stdout(io.StringIO()), "
            "contextlib.redirect_stderr(io.StringIO()):\n"
            "        try: main(argv)\n"
            "        except SystemExit: pass\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & "
            "{'torch', 'numpy', 'matplotlib', 'numba'}))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    # the top-level help and version need no torch (the flag registry, whose modules import
    # it, is loaded only for a subcommand's options): `bkbench --help` takes ~0.1 s
    assert proc.stdout.strip() == "[]", proc.stdout
    audit = subprocess.run([sys.executable, "-m", "bkbench", "audit", "--help"],
                           capture_output=True, text=True, timeout=120).stdout
    for option in ("--lr", "--epochs", "--batch-size", "--warmup-steps", "--checkpoint-every",
                   "--output-dir", "--resume", "--overwrite"):
        assert option not in audit
    for option in ("--d-model", "--bk-heads", "--use-analytic-gradient", "--seed", "--dropout"):
        assert option in audit


# --- the project documents itself -----------------------------------------------------------

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_exactly_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    blocks = readme.split("```bash\n")
    test_block = next(b.split("```")[0] for b in blocks if "pytest" in b.split("```")[0])
    command = test_block.strip().split("&& ", 1)[1]
    ci = [l for l in (ROOT / ".ci" / "run").read_text().splitlines() if "pytest" in l]
    assert ci == [command]
    assert "-n auto" in command


def test_user_facing_text_points_to_the_projects_docs_not_outside_it():
    files = [ROOT / "README.md", *(ROOT / "src").rglob("*.py"), *(ROOT / "docs").glob("*.md")]
    for path in files:
        text = path.read_text()
        assert "shared/" not in text and "DESIGN.md" not in text, path
    # every relative link of the README and the docs names a file of the project
    # (docs/flags.md belongs to the flag registry and may land separately)
    import re

    for page in [ROOT / "README.md", *(ROOT / "docs").glob("*.md")]:
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", page.read_text()):
            if target.endswith("flags.md") and not (ROOT / "docs" / "flags.md").exists():
                continue
            assert (page.parent / target).exists(), f"{page.name} links to missing {target}"


class _Stream:
    """A stand-in for stderr: a terminal or a file."""

    def __init__(self, tty: bool):
        self.tty, self.text = tty, []

    def isatty(self):
        return self.tty

    def write(self, s):
        self.text.append(s)
        return len(s)

    def flush(self):
        pass


@pytest.mark.parametrize("tty", [True, False])
def test_terminal_gets_a_bar_a_file_gets_lines(tty, monkeypatch, caplog, tiny_corpus):
    import torch

    from bkbench.models import build_model
    from bkbench.train import Trainer, seed_everything

    config = BenchmarkConfig(model_name="transformer_t", d_model=16, n_layers=1, n_heads=2,
                             n_seq=16, batch_size=8, max_steps=4, lr=3e-3, seed=3).validate()
    seed_everything(config.seed)
    model = build_model("transformer", len(tiny_corpus.vocab), **config.model_kwargs())
    stream = _Stream(tty)
    monkeypatch.setattr(sys, "stderr", stream)
    with caplog.at_level("INFO", logger="bkbench.train"):
        Trainer(config, model, tiny_corpus, torch.device("cpu"), progress=True,
                progress_interval=1e-9).fit()
    lines = [r.getMessage() for r in caplog.records if "ETA" in r.getMessage()]
    bar = "".join(stream.text)
    if tty:
        assert "4/4" in bar and "\r" in bar and lines == []
    else:
        assert bar == "" and [l.split()[2] for l in lines] == ["1/4", "2/4", "3/4", "4/4"]


# --- the tests find their data (issue 28) ---------------------------------------------------

def test_tests_find_data_through_bkbench_data_dir_and_skips_name_it(tmp_path):
    import os

    code = "import conftest; print(conftest.SHARED_DATA); print(conftest.MISSING_DATA)"
    env = {**os.environ, "BKBENCH_DATA_DIR": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parent, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    folder, reason = proc.stdout.splitlines()
    assert Path(folder) == tmp_path
    assert "BKBENCH_DATA_DIR" in reason and str(tmp_path) in reason
    readme = (ROOT / "README.md").read_text()
    assert "BKBENCH_DATA_DIR=DIR python -m pytest" in readme


_NUMBER_WORDS = {w: i for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
    "fifteen sixteen".split())}


def test_docs_state_the_flag_count_and_full_run_of_the_registry():
    """What the README and docs say about how many flags there are and which resnet_bk_full
    turns on is the registry's and DEFAULT_RUNS' (docs/models.md once said one flag)."""
    import re

    from bkbench.config import DEFAULT_RUNS
    from bkbench.flags.registry import REGISTRY

    full = {k for k, v in DEFAULT_RUNS["resnet_bk_full"].items() if k.startswith("use_") and v}
    assert full == set(REGISTRY)
    counted = 0
    for page in [ROOT / "README.md", *(ROOT / "docs").glob("*.md")]:
        text = " ".join(page.read_text().split())
        for words in re.findall(r"\b(?:all|the) (\w+) optimi[sz]ation flags|`resnet_bk_full` \(all (\w+)\)", text):
            word = "".join(words)
            if word in _NUMBER_WORDS:
                assert _NUMBER_WORDS[word] == len(REGISTRY), f"{page.name}: '{word}' flags"
                counted += 1
        for row in re.findall(r"^\| `resnet_bk_full` \|.*$", page.read_text(), re.M):
            named = set(re.findall(r"`(use_\w+)`", row))
            assert not named or named == full, f"{page.name} names {named} for resnet_bk_full"
    assert counted >= 3


def test_dev_extra_installs_no_gpu_toolchain_and_gpu_does():
    tomllib = pytest.importorskip("tomllib")
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    names = {k: {d.split(";")[0].split("<")[0].split(">")[0].split("=")[0].strip() for d in v}
             for k, v in extras.items()}
    assert not names["dev"] & {"triton", "fla-core", "nvidia-cuda-runtime-cu12"}
    assert "triton" in names["gpu"]


def test_run_head_prints_only_the_settings_of_flags_that_are_on():
    from bkbench.runs import settings_lines

    (plain,) = build_run_configs("smoke", models=["resnet_bk_baseline"])
    head = "\n".join(settings_lines(plain.to_dict()))
    assert "flag_settings" not in head and "koopman" not in head and "flags: none" in head
    koopman = plain.replace(use_koopman=True, model_name="k").to_dict()
    koopman["flag_settings"]["koopman"]["weight"] = 0.25
    lines = settings_lines(koopman)
    assert "    use_koopman: weight=0.25 " in "\n".join(lines) + " "
    assert "flag_settings" not in "\n".join(lines) and "early_exit" not in "\n".join(lines)
    assert len(lines) == len(settings_lines(plain.to_dict())) + 1


def test_every_subcommand_help_imports_no_torch():
    """`bkbench run --help` imported the flag modules (hence torch) for its options: 2.6 s on
    a quiet machine, 13-23 s on a loaded one. The options now come from flag_options."""
    from bkbench import flag_options
    from bkbench.cli import build_parser

    assert (flag_options.FLAG_HELP, flag_options.SETTINGS) == flag_options.from_registry(), \
        "src/bkbench/flag_options.py is stale: python -m bkbench.flag_options"
    commands = list(next(a for a in build_parser(None)._actions
                         if isinstance(a, __import__("argparse")._SubParsersAction)).choices)
    assert {"run", "audit", "ablate", "scale", "report"} <= set(commands)
    code = ("import sys, contextlib, io\n"
            "from bkbench.cli import main\n"
            f"for command in {commands!r}:\n"
            "    out = io.StringIO()\n"
            "    with contextlib.redirect_stdout(out):\n"
            "        try: main([command, '--help'])\n"
            "        except SystemExit: pass\n"
            "    print(command, len(out.getvalue()), '--use-koopman' in out.getvalue(),\n"
            "          '--koopman-weight' in out.getvalue())\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'numpy'}))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    *rows, imported = proc.stdout.splitlines()
    assert imported == "[]", imported
    shown = {c: (int(n), flag == "True", setting == "True")
             for c, n, flag, setting in (r.split() for r in rows)}
    assert all(n > 200 for n, _, _ in shown.values())
    assert shown["run"][1:] == (True, True) and shown["audit"][1:] == (True, True)
    assert shown["ablate"][1:] == (False, True)  # its rows choose the flags
