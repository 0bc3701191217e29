"""Reliability (issue 15): checkpoints that cannot run code or lose progress, the run-folder
lock, workers that die with their parent, interrupts after training, keyed dropout, and bad
input that stops in one line with exit code 2 before any work."""

import json
import math
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bkbench.checkpoint import (CheckpointError, list_checkpoints, load_latest_checkpoint,
                                save_checkpoint, verify_checkpoint)
from bkbench.cli import main
from bkbench.config import BenchmarkConfig
from bkbench.models import build_model
from bkbench.models.dropout import DropoutKey, dropout_key, keep_mask
from bkbench.report import report_main
from bkbench.results import BenchmarkResults
from bkbench.train import Trainer, seed_everything

from conftest import make_corpus

ROOT = Path(__file__).resolve().parents[1]


def tiny_config(**changes):
    base = dict(model_name="transformer_t", d_model=16, n_layers=1, n_heads=2, n_seq=16,
                batch_size=8, epochs=0, max_steps=6, lr=3e-3, warmup_steps=2,
                eval_batch_size=16, seed=3, dropout=0.1, checkpoint_every=2, keep_checkpoints=2)
    return BenchmarkConfig(**{**base, **changes}).validate()


def fit(run_dir, resume=False, corpus=None, **changes):
    cfg = tiny_config(**changes)
    corpus = corpus or make_corpus()
    seed_everything(cfg.seed)
    model = build_model("transformer", len(corpus.vocab), **cfg.model_kwargs())
    trainer = Trainer(cfg, model, corpus, torch.device("cpu"), run_dir=run_dir, resume=resume,
                      data_fingerprint={"corpus": "synthetic"}, progress=False)
    return trainer, trainer.fit()


def exit_code(argv):
    try:
        return main(argv)
    except SystemExit as exc:
        return exc.code


# --- B4: a checkpoint cannot execute code -------------------------------------------------

class _Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _rewrite_manifest(ckpt: Path) -> None:
    import hashlib
    manifest = json.loads((ckpt / "manifest.json").read_text())
    for name, meta in manifest["files"].items():
        data = (ckpt / name).read_bytes()
        meta.update(sha256=hashlib.sha256(data).hexdigest(), bytes=len(data))
    (ckpt / "manifest.json").write_text(json.dumps(manifest))


def test_state_loads_without_unpickling_objects(tmp_path):
    fit(tmp_path)
    latest = list_checkpoints(tmp_path / "checkpoints")[-1]
    state = torch.load(latest / "state.pt", weights_only=True)  # tensors and plain values only
    assert state["progress"]["step"] == 6


def test_a_code_running_pickle_is_refused_and_the_previous_checkpoint_used(tmp_path, caplog):
    fit(tmp_path)
    older, latest = list_checkpoints(tmp_path / "checkpoints")
    marker = tmp_path / "pwned"
    torch.save({"optimizer": _Payload(marker)}, latest / "state.pt")
    _rewrite_manifest(latest)  # the attacker updates the hashes too
    found = load_latest_checkpoint(tmp_path / "checkpoints")
    assert not marker.exists(), "unpickling ran the payload"
    assert found is not None and found.path == older
    assert "cannot be loaded safely" in caplog.text


# --- B5: a tampered manifest is reported and the previous checkpoint used -----------------

@pytest.mark.parametrize("tamper", ["list", "no_files", "empty_files", "flipped_byte",
                                    "wrong_step", "extra_file", "bad_entry"])
def test_tampered_manifest_falls_back_to_the_previous_checkpoint(tamper, tmp_path, caplog):
    fit(tmp_path)
    older, latest = list_checkpoints(tmp_path / "checkpoints")
    manifest = json.loads((latest / "manifest.json").read_text())
    if tamper == "list":
        manifest = []
    elif tamper == "no_files":
        manifest = {"step": manifest["step"]}
    elif tamper == "empty_files":
        manifest["files"] = {}
    elif tamper == "flipped_byte":
        manifest["files"] = {}
        weights = latest / "model.safetensors"
        data = bytearray(weights.read_bytes())
        data[-1] ^= 1
        weights.write_bytes(bytes(data))
    elif tamper == "wrong_step":
        manifest["step"] = 1
    elif tamper == "extra_file":
        (latest / "extra.pt").write_bytes(b"x")
    elif tamper == "bad_entry":
        manifest["files"]["state.pt"] = "abc"
    (latest / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError):
        verify_checkpoint(latest)
    found = load_latest_checkpoint(tmp_path / "checkpoints")
    assert found is not None and found.path == older
    assert f"skipping checkpoint {latest}" in caplog.text


# --- B6: progress is never lost -----------------------------------------------------------

def _fake_checkpoint(directory: Path, step: int) -> Path:
    path = directory / f"step_{step:09d}"
    path.mkdir(parents=True)
    (path / "model.safetensors").write_bytes(b"garbage")
    return path


def test_pruning_keeps_the_checkpoint_just_written_and_counts_only_verified_ones(tmp_path):
    d = tmp_path / "checkpoints"
    weights = {"w": torch.ones(3)}
    state = {"progress": {"step": 0}}
    for step in (1, 2):
        save_checkpoint(d, step, weights, None, state, keep=2)
    # corrupt leftovers of a later, abandoned continuation (the case of a resume that found
    # every newer checkpoint invalid and started over)
    _fake_checkpoint(d, 8)
    _fake_checkpoint(d, 10)
    path, _ = save_checkpoint(d, 5, weights, None, state, keep=2)
    assert [p.name for p in list_checkpoints(d)] == ["step_000000002", "step_000000005"]
    assert path.is_dir()
    # a corrupt older one never counts as kept: the verified step 2 stays beside step 6
    _fake_checkpoint(d, 4)
    save_checkpoint(d, 6, weights, None, state, keep=2)
    assert [p.name for p in list_checkpoints(d)] == ["step_000000005", "step_000000006"]


def test_resume_without_a_usable_checkpoint_says_so_loudly(tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    fit(tmp_path, resume=True)
    assert "TRAINING STARTS FROM STEP 0" in caplog.text and "there is none" in caplog.text
    caplog.clear()
    for ckpt in list_checkpoints(tmp_path / "checkpoints"):
        (ckpt / "manifest.json").unlink()
    trainer, _ = fit(tmp_path, resume=True)
    assert trainer.resumed_from_step is None
    assert "all 2 checkpoint(s) there failed verification" in caplog.text


# --- B7: an interrupt during the test evaluation ------------------------------------------

DRIVER = ROOT / "tests" / "train_driver.py"


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_during_test_evaluation_checkpoints_and_hints(sig, tmp_path):
    args = [sys.executable, str(DRIVER), str(tmp_path), "--steps", "6"]
    ref = subprocess.run([*args[:2], str(tmp_path / "ref"), "--steps", "6"], capture_output=True,
                         text=True, timeout=300)
    assert ref.returncode == 0, ref.stderr
    hit = subprocess.run([*args, "--signal-in-test-eval", str(int(sig))], capture_output=True,
                         text=True, timeout=300)
    assert hit.returncode == 128 + sig, hit.stderr
    assert "Traceback" not in hit.stderr
    assert signal.Signals(sig).name in hit.stderr and "--resume" in hit.stderr
    resumed = subprocess.run([*args, "--resume"], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    a, b = json.loads(ref.stdout.splitlines()[-1]), json.loads(resumed.stdout.splitlines()[-1])
    assert b["test_loss"] == a["test_loss"] and b["step_losses"] == a["step_losses"]


# --- A2: the run-folder lock --------------------------------------------------------------

def test_a_second_run_on_a_busy_folder_exits_2_naming_the_pid(shared_data_dir, tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from bkbench.runlock import RunLock; "
         f"RunLock({str(out)!r}).acquire(); print('locked', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        start = time.perf_counter()
        code = exit_code(["run", "--preset", "smoke", "--models", "transformer_baseline",
                          "--max-steps", "2", "--data-dir", str(shared_data_dir),
                          "--split-scheme", "proxy", "--output-dir", str(out), "--quiet"])
        err = capsys.readouterr().err.strip()
        assert code == 2 and f"PID {holder.pid}" in err and len(err.splitlines()) == 1
        assert time.perf_counter() - start < 5  # at once: before the data is read
    finally:
        holder.kill()
        holder.wait()
    assert [p.name for p in out.iterdir()] == [".bkbench.lock"]


# --- A1: no orphaned worker ---------------------------------------------------------------

def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(c) for c in text.split()]


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs /proc")
def test_kill_9_of_bkbench_run_leaves_no_worker_and_resume_finishes(shared_data_dir, tmp_path):
    common = ["run", "--preset", "smoke", "--models", "transformer_baseline", "--max-steps",
              "30", "--checkpoint-every", "2", "--data-dir", str(shared_data_dir),
              "--split-scheme", "proxy", "--quiet", "--threads", "1"]
    # one thread in both runs: --threads auto may pick another count for the resumed run,
    # and the thread count changes results in their last bits
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ref = subprocess.run([sys.executable, "-m", "bkbench", *common, "--output-dir",
                          str(tmp_path / "ref")], capture_output=True, text=True, timeout=600,
                         env=env)
    assert ref.returncode == 0, ref.stderr[-2000:]
    out = tmp_path / "o"
    parent = subprocess.Popen([sys.executable, "-m", "bkbench", *common, "--output-dir", str(out)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    log = out / "runs" / "transformer_baseline" / "train_log.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (log.exists() and log.read_text().count('"train"') >= 5):
        time.sleep(0.05)
    workers = _children(parent.pid)
    assert workers, "no worker found"
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.time() + 5
    while time.time() < deadline and any(_alive(w) for w in workers):
        time.sleep(0.05)
    assert not any(_alive(w) for w in workers), "the worker outlived bkbench run by 5 s"
    resumed = subprocess.run([sys.executable, "-m", "bkbench", *common, "--output-dir", str(out),
                              "--resume"], capture_output=True, text=True, timeout=600, env=env)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a = json.loads((tmp_path / "ref" / "transformer_baseline_results.json").read_text())
    b = json.loads((out / "transformer_baseline_results.json").read_text())
    assert b["test_loss"] == a["test_loss"] and b["epoch_losses"] == a["epoch_losses"]


# --- A3: keyed dropout --------------------------------------------------------------------

def test_dropout_masks_depend_only_on_seed_step_site_and_global_position():
    shape = torch.Size([8, 5, 7])
    cpu = torch.device("cpu")
    whole = keep_mask(shape, 0.3, 11, cpu, DropoutKey(4, 9, None))
    # two ranks of a batch of 8 hold positions 0,2,4,6 and 1,3,5,7
    even = keep_mask(torch.Size([4, 5, 7]), 0.3, 11, cpu, DropoutKey(4, 9, range(0, 8, 2)))
    odd = keep_mask(torch.Size([4, 5, 7]), 0.3, 11, cpu, DropoutKey(4, 9, range(1, 8, 2)))
    assert torch.equal(whole[0::2], even) and torch.equal(whole[1::2], odd)
    for other in (DropoutKey(5, 9, None), DropoutKey(4, 10, None)):
        assert not torch.equal(whole, keep_mask(shape, 0.3, 11, cpu, other))
    assert not torch.equal(whole, keep_mask(shape, 0.3, 12, cpu, DropoutKey(4, 9, None)))
    assert not torch.equal(whole[0], whole[1])  # samples differ from each other
    big = keep_mask(torch.Size([64, 4096]), 0.1, 1, cpu, DropoutKey(0, 0, None))
    assert abs(big.float().mean().item() - 0.9) < 0.005


def test_model_in_train_mode_on_a_rank_shard_equals_the_single_process_rows():
    model = build_model("transformer", 40, d_model=16, n_layers=2, n_heads=2, n_seq=12,
                        dropout=0.2).train()
    idx = torch.randint(0, 40, (6, 12))
    with torch.no_grad(), dropout_key(1, 7, range(6)):
        full = model(idx)
    with torch.no_grad(), dropout_key(1, 7, range(1, 6, 2)):
        shard = model(idx[1::2])
    torch.testing.assert_close(shard, full[1::2], rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        assert not torch.equal(full, model.eval()(idx))


# --- C: bad input: one line, exit 2, before any work --------------------------------------

def _yaml_cases(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    levels = ['a: &a ["x","x","x","x","x","x","x","x","x"]']
    for prev, cur in zip("abcdefgh", "bcdefghi"):
        levels.append(f"{cur}: &{cur} [" + ",".join([f"*{prev}"] * 9) + "]")
    cases = {
        "alias_bomb": ("\n".join(levels) + "\nlr: *i\n", "aliases"),
        "deep": ("a: " + "[" * 5000 + "]" * 5000 + "\n", "nesting deeper"),
        "runs_int": ("runs: {transformer_baseline: 5}\n", "must map config fields"),
        "invalid": ("lr: [1, 2\nfoo: : bar\n", "not valid YAML"),
        "nul_name": ('runs: {"transformer_\\0x": {}}\n', "model_name"),
        "long_name": ("runs: {transformer_" + "x" * 300 + ": {}}\n", "model_name"),
        "list": ("- 1\n- 2\n", "must hold a mapping"),
    }
    paths = {}
    for name, (text, message) in cases.items():
        p = tmp_path / f"{name}.yaml"
        p.write_text(text)
        paths[name] = (p, message)
    p = tmp_path / "random.yaml"
    p.write_bytes(bytes(range(128, 256)) * 16)
    paths["undecodable"] = (p, "not UTF-8")
    (tmp_path / "folder.yaml").mkdir()
    paths["directory"] = (tmp_path / "folder.yaml", "not a regular file")
    return paths


def test_hostile_config_files_exit_2_in_one_short_line(tmp_path, capsys):
    for name, (path, message) in _yaml_cases(tmp_path).items():
        start = time.perf_counter()
        code = exit_code(["run", "--preset", "smoke", "--config", str(path), "--output-dir",
                          str(tmp_path / "o")])
        err = capsys.readouterr().err.strip()
        assert code == 2, (name, err)
        assert message in err, (name, err)
        assert len(err.splitlines()) == 1 and len(err) < 400, (name, err[:500])
        assert time.perf_counter() - start < 5, name
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("args,message", [
    (["--lr", "inf"], "lr must be a finite number"),
    (["--lr", "5"], "lr must be <= 1"),
    (["--weight-decay", "nan"], "weight_decay must be a finite number"),
    (["--bk-h0", "nan"], "bk_h0 must be a finite number"),
    (["--seed", "100000000000000000000000"], "seed must be in"),
    (["--device", "cuda:abc"], "device must be"),
    (["--models", ""], "names no run"),
    (["--n-seq", "1"], "n_seq must be at least 2"),
])
def test_bad_values_stop_before_any_work(args, message, tmp_path, capsys):
    out = tmp_path / "o"
    assert exit_code(["run", "--preset", "smoke", "--output-dir", str(out), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a CPU-only machine")
def test_cuda_without_cuda_stops_before_the_data_is_read(tmp_path, capsys):
    # a data folder that does not exist would be reported if the data were read first
    assert exit_code(["run", "--preset", "smoke", "--device", "cuda", "--split-scheme", "proxy",
                      "--output-dir", str(tmp_path / "o")]) == 2
    assert "CUDA is not available" in capsys.readouterr().err


def test_unwritable_or_file_output_dir_stops_before_any_work(shared_data_dir, tmp_path, capsys):
    common = ["run", "--preset", "smoke", "--models", "transformer_baseline", "--max-steps", "2",
              "--data-dir", str(shared_data_dir), "--split-scheme", "proxy"]
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert exit_code([*common, "--output-dir", str(a_file)]) == 2
    assert "is a file" in capsys.readouterr().err
    assert exit_code([*common, "--output-dir", ""]) == 2
    assert "empty path" in capsys.readouterr().err
    if os.geteuid() != 0:  # root writes anywhere
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        try:
            assert exit_code([*common, "--output-dir", str(ro / "sub")]) == 2
            assert "not writable" in capsys.readouterr().err
        finally:
            ro.chmod(0o755)


def test_a_model_too_large_for_memory_stops_before_allocation(shared_data_dir, tmp_path, capsys):
    code = exit_code(["run", "--preset", "smoke", "--models", "transformer_baseline",
                      "--d-model", "100000000", "--n-heads", "1", "--data-dir",
                      str(shared_data_dir), "--split-scheme", "proxy", "--output-dir",
                      str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "parameters need at least" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("args", [["--vocab-size", "0"], ["--sequences", "0"],
                                  ["--sequences", "-3"], ["--n-seq", "1"]])
def test_audit_refuses_arguments_that_test_nothing(args, capsys):
    assert exit_code(["audit", "--preset", "smoke", "--vocab-size", "50", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("bkbench: error:") and len(err.splitlines()) == 1


def test_oversized_data_file_is_refused_before_it_is_read(tmp_path):
    from bkbench.data import DataError, verify_file
    big = tmp_path / "wiki.valid.tokens"
    with open(big, "wb") as f:
        f.truncate(3 << 30)  # sparse: 3 GB that would be read whole
    with pytest.raises(DataError, match="expected a size of 1,121,681"):
        verify_file(big)
    unknown = tmp_path / "wiki.train.tokens"
    with open(unknown, "wb") as f:
        f.truncate(3 << 30)
    with pytest.raises(DataError, match="far more than any WikiText-2 file"):
        verify_file(unknown)


# --- C12: malformed results files are skipped and named -----------------------------------

def test_malformed_results_files_are_skipped_and_named(tmp_path, capsys):
    from bkbench.results import SCHEMA_VERSION
    (tmp_path / "a_results.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="JSON object"):
        BenchmarkResults.load(tmp_path / "a_results.json")
    (tmp_path / "b_results.json").write_text(json.dumps(
        {"schema_version": SCHEMA_VERSION, "model_name": "b", "epoch_perplexities": "abc"}))
    with pytest.raises(ValueError):
        BenchmarkResults.load(tmp_path / "b_results.json")
    assert report_main(str(tmp_path)) == 2
    err = capsys.readouterr().err
    assert "a_results.json skipped" in err and "b_results.json skipped" in err
    assert len(err.strip().splitlines()) == 1


# --- issue 26: settings that cannot work or mean nothing stop up front ---------------------

@pytest.mark.parametrize("args,message", [
    (["--models", "resnet_bk_full", "--act-bias-init", "nan"], "act_bias_init must be a finite"),
    (["--models", "resnet_bk_baseline", "--use-physics-informed",
      "--physics-informed-weight", "inf"], "physics_informed_weight must be a finite"),
    (["--models", "resnet_bk_full", "--koopman-weight=-inf"], "koopman_weight must be a finite"),
    (["--models", "transformer_baseline", "--koopman-dim", "0"],
     "koopman_dim is a setting of use_koopman, which is off in every run here"),
    (["--models", "resnet_bk_baseline", "--pruning-target-sparsity", "0.3"],
     "add --use-pruning"),
    (["--seeds", "1,,2"], "has an empty entry"),
    (["--seeds", "1,2,"], "has an empty entry"),
])
def test_meaningless_or_nonfinite_settings_stop_before_any_work(args, message, tmp_path, capsys):
    out = tmp_path / "o"
    assert exit_code(["run", "--preset", "smoke", "--output-dir", str(out), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not out.exists()


def test_a_flag_setting_from_the_config_file_needs_its_flag_too(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("runs:\n  plain: {architecture: transformer, koopman_dim: 8}\n")
    assert exit_code(["run", "--preset", "smoke", "--config", str(cfg),
                      "--output-dir", str(tmp_path / "o")]) == 2
    assert "add --use-koopman" in capsys.readouterr().err
    # with the flag on in some run the setting means something: accepted (audit: no data)
    cfg.write_text("runs:\n  k: {architecture: transformer, use_koopman: true}\n"
                   "  plain: {architecture: transformer}\nkoopman_dim: 8\n")
    assert exit_code(["audit", "--preset", "smoke", "--config", str(cfg),
                      "--vocab-size", "50"]) == 0


def test_ablate_refuses_resume_with_overwrite(tmp_path, capsys):
    out = tmp_path / "a"
    assert exit_code(["ablate", "--preset", "smoke", "--resume", "--overwrite",
                      "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "contradict" in err and len(err.splitlines()) == 1
    assert not out.exists()


@pytest.mark.parametrize("value", ["", ",", " "])
def test_scale_with_an_empty_sweep_exits_2_in_one_line(value, tmp_path, capsys):
    assert exit_code(["scale", "--preset", "smoke", "--n-seq", value,
                      "--output-dir", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err.strip()
    assert "--n-seq takes comma-separated positive integers" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("args", [
    ["--models", "resnet_bk_baseline", "--use-koopman", "--koopman-dim", "100000000"],
    ["--models", "resnet_bk_baseline", "--use-multi-scale", "--multi-scale-factor", "1000000"],
    ["--models", "gla_baseline", "--gla-chunk-size", "1000000"],
])
def test_flag_and_model_sizes_beyond_memory_stop_before_allocation(args, shared_data_dir,
                                                                   tmp_path, capsys):
    out = tmp_path / "o"
    code = exit_code(["run", "--preset", "smoke", *args, "--data-dir", str(shared_data_dir),
                      "--split-scheme", "proxy", "--output-dir", str(out), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "GiB of cpu" in err and len(err.splitlines()) == 1, err
    assert not out.exists()


def test_a_flop_budget_below_one_step_stops_before_the_audit(shared_data_dir, tmp_path, capsys):
    out = tmp_path / "o"
    code = exit_code(["run", "--preset", "smoke", "--models", "transformer_baseline",
                      "--budget-flops", "1000", "--data-dir", str(shared_data_dir),
                      "--split-scheme", "proxy", "--output-dir", str(out), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "less than one training forward" in err and len(err.splitlines()) == 1
    assert not out.exists()   # refused from the estimate: no run folder, no audit, no count


# --- issue 26: every command that writes into a folder holds its lock ------------------------

def _hold_lock(folder: Path) -> subprocess.Popen:
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from bkbench.runlock import RunLock; "
         f"RunLock({str(folder)!r}).acquire(); print('locked', flush=True); time.sleep(120)"],
        stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    return holder


@pytest.mark.parametrize("command", [
    ["ablate", "--preset", "smoke", "--max-steps", "1", "--split-scheme", "proxy", "--quiet"],
    ["scale", "--preset", "smoke", "--models", "transformer_baseline", "--n-seq", "8,16",
     "--steps", "1", "--warmup", "0", "--vocab-size", "50", "--quiet"],
])
def test_ablate_and_scale_refuse_a_folder_another_process_holds(command, shared_data_dir,
                                                                tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    holder = _hold_lock(out)
    try:
        data = ["--data-dir", str(shared_data_dir)] if command[0] == "ablate" else []
        code = exit_code([*command, *data, "--output-dir", str(out)])
        err = capsys.readouterr().err.strip()
        assert code == 2 and f"PID {holder.pid}" in err and len(err.splitlines()) == 1, err
    finally:
        holder.kill()
        holder.wait()
    assert [p.name for p in out.iterdir()] == [".bkbench.lock"]   # nothing written


def test_report_refuses_a_folder_another_process_holds(tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    holder = _hold_lock(out)
    try:
        assert exit_code(["report", str(out)]) == 2
        assert f"PID {holder.pid}" in capsys.readouterr().err
    finally:
        holder.kill()
        holder.wait()
    assert [p.name for p in out.iterdir()] == [".bkbench.lock"]


@pytest.mark.slow
def test_a_run_into_the_folder_of_a_running_ablation_is_refused(shared_data_dir, tmp_path,
                                                                capsys):
    out = tmp_path / "abl"
    ablate = subprocess.Popen(
        [sys.executable, "-m", "bkbench", "ablate", "--preset", "smoke", "--max-steps", "50",
         "--data-dir", str(shared_data_dir), "--split-scheme", "proxy", "--quiet",
         "--output-dir", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        lock = out / ".bkbench.lock"
        deadline = time.time() + 120
        while not (lock.exists() and lock.read_text().strip() == str(ablate.pid)):
            assert ablate.poll() is None and time.time() < deadline, "the ablation took no lock"
            time.sleep(0.1)
        code = exit_code(["run", "--preset", "smoke", "--models", "transformer_baseline",
                          "--max-steps", "1", "--data-dir", str(shared_data_dir),
                          "--split-scheme", "proxy", "--output-dir", str(out), "--quiet"])
        err = capsys.readouterr().err.strip()
        assert code == 2 and f"PID {ablate.pid}" in err and len(err.splitlines()) == 1, err
        assert not list(out.glob("transformer_baseline*"))
    finally:
        ablate.send_signal(signal.SIGTERM)
        ablate.wait(timeout=120)


def test_an_active_learning_pool_larger_than_the_split_stops_before_any_work(shared_data_dir,
                                                                            tmp_path, capsys):
    out = tmp_path / "o"
    code = exit_code(["run", "--preset", "smoke", "--models", "resnet_bk_baseline",
                      "--use-active-learning", "--active-learning-fraction", "0.0001",
                      "--data-dir", str(shared_data_dir), "--split-scheme", "proxy",
                      "--output-dir", str(out), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "scores a pool of" in err and len(err.splitlines()) == 1, err
    assert not out.exists()


@pytest.mark.parametrize("flag", ["use_early_exit", "use_koopman", "use_physics_informed"])
def test_layer_state_flags_train_with_an_hourglass_that_pools_the_first_block(flag):
    # multi_scale_outer_layers=0 pools the first block's input; the per-layer states were read
    # at the pooled length (early exit: "Expected input batch_size (8) to match target (16)")
    from bkbench.flags import build_model as build_with_flags
    corpus = make_corpus()
    cfg = BenchmarkConfig(model_name="bk_hourglass", architecture="resnet_bk", d_model=8,
                          n_layers=2, n_seq=8, batch_size=2, num_experts=2, epochs=0,
                          max_steps=1, eval_batch_size=16, dropout=0.0, use_multi_scale=True,
                          **{flag: True},
                          flag_settings={"multi_scale": {"outer_layers": 0}}).validate()
    seed_everything(0)
    model, flags = build_with_flags(cfg, len(corpus.vocab))
    trainer = Trainer(cfg, model, corpus, torch.device("cpu"), progress=False, flags=flags)
    outcome = trainer.fit()
    assert outcome.steps == 1 and all(map(math.isfinite, outcome.step_losses))
    states = next(f for f in flags.flags.values() if hasattr(f, "states")).states
    model.train()(torch.zeros(3, cfg.n_seq, dtype=torch.long))
    full = states.full_resolution()
    assert [tuple(s.shape[:2]) for s in full] == [(3, cfg.n_seq)] * (cfg.n_layers + 1)
    assert states.states[0].shape[1] < cfg.n_seq   # the first block really ran pooled
