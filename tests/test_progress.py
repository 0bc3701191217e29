"""What a user sees while a command runs (issue 28): run k of n and the command's ETA, no
silent phase, finished flag records kept for --resume, a progress bar in any terminal, the
report of what finished after Ctrl-C, and the thread policy chosen from the machine's load."""

from __future__ import annotations

import json
import os
import pty
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bkbench import threads
from bkbench.benchmark import WikiText2Benchmark
from bkbench.config import BenchmarkConfig
from bkbench.progress import CommandProgress, Phases, bar_size


# --- run k of n, the command's ETA ----------------------------------------------------------

def test_command_eta_counts_later_runs_from_the_finished_ones():
    # run 2 of 4 after one 100 s run: 30 s left of this one, two later runs of 100 s each
    c = CommandProgress(2, 4, [100.0], run_started=0.0)
    assert c.eta(30.0, now=50.0) == 30.0 + 2 * 100.0
    assert c.suffix(30.0) == "run 2 of 4, command ETA 3m50s"
    # before any run finished: this run's projected total (20 s so far + 30 s left) each
    first = CommandProgress(1, 3, [], run_started=0.0)
    assert first.eta(30.0, now=20.0) == 30.0 + 2 * 50.0
    assert CommandProgress(3, 3, [5.0, 7.0]).eta(4.0) == 4.0


def test_phases_name_each_phase_and_say_it_still_runs(caplog):
    phases = Phases("m", interval=0.01, command=CommandProgress(1, 2))
    with caplog.at_level("INFO", logger="bkbench.progress"):
        with phases("slow part"):
            time.sleep(2.3)
        with pytest.raises(KeyError):
            with phases("failing part"):
                raise KeyError("x")
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == "m (run 1 of 2): slow part ..."
    assert sum("slow part still running" in l for l in lines) == 2   # at least 1 s apart
    assert "m (run 1 of 2): slow part done in 0m02s" in lines
    assert 2.3 <= phases.seconds["slow part"] < 3.5 and "failing part" in phases.seconds


@pytest.mark.parametrize("columns, lines, expected", [
    (120, 40, {"dynamic_ncols": True}),
    (0, 0, {"ncols": 80, "nrows": 24}),          # script -qfc, a pty opened without a size
])
def test_bar_gets_a_size_when_the_terminal_reports_none(columns, lines, expected, monkeypatch):
    monkeypatch.setattr(os, "get_terminal_size",
                        lambda *a: os.terminal_size((columns, lines)))
    monkeypatch.delenv("COLUMNS", raising=False)
    monkeypatch.delenv("LINES", raising=False)
    assert bar_size(sys.stderr) == expected


# --- thread policy --------------------------------------------------------------------------

@pytest.mark.parametrize("running, cpus, machine, want", [
    ([1] * 10, 2, 2, 2),          # only us: every CPU
    ([3] * 10, 2, 2, 1),          # two CPU-bound neighbours on 2 cores: one thread
    ([2, 3] * 5, 4, 4, 2),        # 1.5 others on 4 cores: round(2.5) = 2
    ([30] * 10, 2, 2, 1),         # never below one
    ([9] * 10, 2, 16, 1),         # a 2-CPU slice of a 16-CPU machine with 8 others: 1 share
])
def test_auto_threads_use_the_cpus_others_leave(running, cpus, machine, want, monkeypatch):
    samples = iter(running)
    monkeypatch.setattr(threads, "_procs_running", lambda: next(samples))
    monkeypatch.setattr(threads, "cpus_available", lambda: cpus)
    monkeypatch.setattr(os, "cpu_count", lambda: machine)
    monkeypatch.setattr(time, "sleep", lambda s: None)
    policy = threads.choose("auto")
    assert policy.threads == want
    assert policy.environ()["OMP_NUM_THREADS"] == str(want)
    assert (policy.environ().get("OMP_WAIT_POLICY") == "PASSIVE") == (want < cpus)


def test_threads_option_is_auto_or_a_positive_count():
    assert threads.parse_threads("auto") == "auto" and threads.parse_threads("03") == "3"
    for bad in ("0", "-1", "two", ""):
        with pytest.raises(ValueError, match="--threads"):
            threads.parse_threads(bad)
    assert threads.choose("3").threads == 3


# --- a slow flag record: named in the log; --resume keeps the finished ones -------------------

def _flag_config() -> BenchmarkConfig:
    return BenchmarkConfig(model_name="resnet_bk_t", architecture="resnet_bk", d_model=16,
                           n_layers=2, n_seq=16, batch_size=8, max_steps=3, lr=3e-3,
                           num_experts=2, eval_batch_size=64, seed=3, use_koopman=True,
                           use_physics_informed=True).validate()


def test_slow_record_is_named_in_the_log_and_resume_keeps_finished_records(
        tmp_path, monkeypatch, caplog, tiny_corpus):
    from bkbench.flags.koopman import Koopman
    from bkbench.flags.physics_informed import PhysicsInformed

    monkeypatch.setattr(WikiText2Benchmark, "load_data", lambda self, config: tiny_corpus)
    calls = {"koopman": 0, "physics": 0}
    koopman_record, physics_record = Koopman.record, PhysicsInformed.record

    def slow_koopman(self, run, outcome):
        calls["koopman"] += 1
        time.sleep(2.5)
        return koopman_record(self, run, outcome)

    def interrupted_physics(self, run, outcome):
        calls["physics"] += 1
        if calls["physics"] == 1:
            raise KeyboardInterrupt   # Ctrl-C during the second record
        return physics_record(self, run, outcome)

    monkeypatch.setattr(Koopman, "record", slow_koopman)
    monkeypatch.setattr(PhysicsInformed, "record", interrupted_physics)
    bench = WikiText2Benchmark(tmp_path, progress=True, progress_interval=0.5, threads="1")
    with caplog.at_level("INFO", logger="bkbench"), pytest.raises(KeyboardInterrupt):
        bench.run_benchmark(_flag_config())
    log = [r.getMessage() for r in caplog.records]
    assert "resnet_bk_t: use_koopman record ..." in log
    beats = [l for l in log if l.startswith("resnet_bk_t: use_koopman record still running")]
    assert len(beats) >= 2
    assert "resnet_bk_t: use_physics_informed record ..." in log
    for phase in ("warm-up", "build and causality audit", "test evaluation", "FLOPs count"):
        assert f"resnet_bk_t: {phase} ..." in log
    kept = json.loads((tmp_path / "runs" / "resnet_bk_t" / "flag_records.json").read_text())
    assert list(kept["records"]) == ["use_koopman"]

    caplog.clear()
    with caplog.at_level("INFO", logger="bkbench"):
        results = bench.run_benchmark(_flag_config(), resume=True)
    assert calls == {"koopman": 1, "physics": 2}      # koopman's record was not redone
    assert results.flags["use_koopman"]["measured"] == kept["records"]["use_koopman"]
    assert "resnet_bk_t: use_koopman record kept from the interrupted run" in \
        [r.getMessage() for r in caplog.records]
    assert {"use_koopman record", "use_physics_informed record", "run"} <= \
        set(results.phase_seconds)
    assert results.environment["thread_policy"]["threads"] == 1


# --- the command in a terminal, and interrupted ---------------------------------------------

def _smoke(data_dir: Path, out: Path, models: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "bkbench", "run", "--preset", "smoke", "--models", models,
            "--data-dir", str(data_dir), "--split-scheme", "proxy", "--output-dir", str(out),
            "--threads", "1", *extra]


@pytest.mark.slow
def test_smoke_run_in_a_pseudo_terminal_shows_the_progress_bar(shared_data_dir, tmp_path):
    master, slave = pty.openpty()   # no size set: the terminal reports 0 x 0, as script -qfc
    proc = subprocess.Popen(_smoke(shared_data_dir, tmp_path / "out", "transformer_baseline",
                                   "--max-steps", "3"),
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=slave)
    os.close(slave)
    seen = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:   # the child closed its end
            break
        if not chunk:
            break
        seen += chunk
    assert proc.wait(timeout=600) == 0, seen.decode(errors="replace")[-2000:]
    os.close(master)
    text = seen.decode(errors="replace")
    assert "transformer_baseline [run 1 of 1]" in text
    assert "3/3" in text and "\r" in text.replace("\r\n", "")   # redrawn in place


@pytest.mark.slow
def test_ctrl_c_in_the_second_run_writes_the_report_of_the_first(shared_data_dir, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.Popen(_smoke(shared_data_dir, out, "transformer_baseline,resnet_bk_baseline",
                                   "--max-steps", "400", "--quiet"),
                            stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            start_new_session=True)
    # --quiet: no progress lines; wait for the second run's results head instead
    lines = []
    for line in proc.stderr:
        lines.append(line)
        if "run resnet_bk_baseline (architecture" in line:
            time.sleep(3.0)
            os.killpg(proc.pid, signal.SIGINT)   # Ctrl-C reaches the whole process group
            break
    stderr = "".join(lines) + proc.stderr.read()
    assert proc.wait(timeout=600) == 130, stderr[-3000:]
    assert "writing the report of the runs that finished" in stderr
    assert "Traceback" not in stderr
    assert (out / "transformer_baseline_results.json").is_file()
    assert not (out / "resnet_bk_baseline_results.json").exists()
    assert "transformer_baseline" in (out / "report.md").read_text()


# --- scale: vocabulary from the preset, contention marked, Ctrl-C and --resume ---------------

def test_scale_vocabulary_comes_from_the_preset():
    from bkbench.config import build_run_configs
    from bkbench.experiments.scale import preset_vocab_size

    (smoke,) = build_run_configs("smoke", models=["transformer_baseline"])
    (default,) = build_run_configs("default", models=["transformer_baseline"])
    assert preset_vocab_size(smoke) == 256            # byte-level: was 13,777 under smoke
    assert preset_vocab_size(default) == 33_278
    assert preset_vocab_size(default.replace(split_scheme="proxy")) == 13_777


def test_contended_sweep_points_make_the_time_claim_untestable():
    from bkbench.report import audit_claims
    from test_report import passing_set

    def point(model, n, spt, busy):
        return {"model_name": model, "value": n, "seconds_per_token": spt,
                "peak_memory_mb": 100.0 if model.startswith("t") else 50.0,
                "flops_per_token": 1.0, "mixer_flops_per_token": 1.0,
                "tokens_per_second": 1 / spt,
                "contention": {"contended": busy, "reasons": ["mean load 6 > 2.5"] if busy else []}}

    results = {k: v for k, v in passing_set().items()}
    for r in results.values():
        r.config["n_seq"] = 128            # the runs cannot test the time claim themselves
    verdict = {}
    for busy in (False, True):
        points = [point("transformer_baseline", n, 1e-6 * n, busy) for n in (512, 2048)] + \
                 [point("resnet_bk_full", n, 2e-5 / 8, False) for n in (512, 2048)]
        scale = {"axis": "n_seq", "values": [512, 2048], "points": points, "configs": {},
                 "fits": {}}
        claims = {c.name: c for c in audit_claims(results, scale=scale)}
        verdict[busy] = claims["training_time"]
        assert claims["peak_memory"].verdict == "PASS"    # memory does not care about load
    assert verdict[False].verdict == "PASS"
    assert verdict[True].verdict == "UNTESTABLE"
    assert "transformer_baseline at n_seq = 2048" in verdict[True].reason
    assert "mean load 6 > 2.5" in verdict[True].reason


@pytest.mark.slow
def test_scale_ctrl_c_keeps_finished_points_and_resume_measures_the_rest(tmp_path):
    out = tmp_path / "scale"
    args = [sys.executable, "-m", "bkbench", "scale", "--preset", "smoke", "--n-seq", "16,32",
            "--models", "transformer_baseline", "--steps", "1", "--warmup", "0",
            "--output-dir", str(out)]
    # as a terminal's Ctrl-C: a test run started in the background inherits SIGINT ignored,
    # and Python then installs no KeyboardInterrupt handler (the sweep would run on)
    proc = subprocess.Popen(args, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    lines = []
    for line in proc.stderr:
        lines.append(line)
        if "point 2 of 2: transformer_baseline n_seq=32 ..." in line:
            os.killpg(proc.pid, signal.SIGINT)
            break
    rest = proc.stderr.read()
    assert proc.wait(timeout=600) == 130, "".join(lines) + rest
    # the interrupted point's phase still logs its end; the user-facing message is one line
    assert [l for l in rest.strip().splitlines() if not l.startswith("INFO ")] == [
        f"bkbench scale: interrupted after 1 of 2 points; they are kept in {out / 'scale.json'}."
        " Run the same command with --resume to measure the rest."], rest
    partial = json.loads((out / "scale.json").read_text())
    assert partial["complete"] is False and [p["value"] for p in partial["points"]] == [16]
    assert partial["points"][0]["contention"]["timed_wall_s"] > 0
    assert partial["vocab_size"] == 256

    refused = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert refused.returncode == 2 and "--resume" in refused.stderr
    resumed = subprocess.run(args + ["--resume"], capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "point 1 of 2" not in resumed.stderr and "point 2 of 2" in resumed.stderr
    final = json.loads((out / "scale.json").read_text())
    assert final["complete"] is True and [p["value"] for p in final["points"]] == [16, 32]
    assert final["points"][0] == partial["points"][0]


def test_ablate_output_folder_is_per_preset(tmp_path, monkeypatch):
    import bkbench.experiments.ablate as ablate
    from bkbench.cli import main

    seen = {}

    def fake_run_ablation(base, output_dir, **kw):
        seen["dir"] = output_dir
        raise KeyboardInterrupt   # stop before any work; main turns it into exit 130
    monkeypatch.setattr(ablate, "run_ablation", fake_run_ablation)
    monkeypatch.chdir(tmp_path)
    assert main(["ablate", "--preset", "smoke"]) == 130
    assert seen["dir"] == Path("benchmark_results") / "ablation" / "smoke"


def test_run_all_numbers_the_runs_and_ablate_calls_them_rows(tmp_path, monkeypatch):
    from bkbench.config import build_run_configs

    seen = []

    def fake_isolated(self, config, resume, overwrite=False, command=None):
        seen.append((command.label(), list(command.finished_seconds)))
        return config.model_name
    monkeypatch.setattr(WikiText2Benchmark, "_run_isolated", fake_isolated)
    configs = build_run_configs("smoke")
    bench = WikiText2Benchmark(tmp_path, progress=False)
    assert bench.run_all(configs, isolate=True, unit="row") == [c.model_name for c in configs]
    assert [label for label, _ in seen] == ["row 1 of 3", "row 2 of 3", "row 3 of 3"]
    assert [len(done) for _, done in seen] == [0, 1, 2]   # each ETA knows the runs before it


def test_resume_starts_no_process_for_finished_runs_and_numbers_only_the_rest(tmp_path,
                                                                              monkeypatch):
    # a kept run would otherwise count as "row 1 of 3" and pull the command's ETA towards the
    # seconds a reuse takes
    from bkbench.config import build_run_configs

    configs = build_run_configs("smoke")
    kept_name = configs[1].model_name
    kept = object()
    monkeypatch.setattr(WikiText2Benchmark, "finished_result",
                        lambda self, c: kept if c.model_name == kept_name else None)
    seen = []

    def fake_isolated(self, config, resume, overwrite=False, command=None):
        seen.append((config.model_name, command.label()))
        return config.model_name
    monkeypatch.setattr(WikiText2Benchmark, "_run_isolated", fake_isolated)
    bench = WikiText2Benchmark(tmp_path, progress=False)
    out = bench.run_all(configs, resume=True, isolate=True, unit="row")
    assert out == [configs[0].model_name, kept, configs[2].model_name]
    assert seen == [(configs[0].model_name, "row 1 of 2"), (configs[2].model_name, "row 2 of 2")]
    seen.clear()   # without --resume a finished result is never consulted
    bench.run_all(configs, isolate=True, unit="row")
    assert [label for _, label in seen] == ["row 1 of 3", "row 2 of 3", "row 3 of 3"]


def test_parallel_rows_start_when_any_child_ends_not_the_oldest(tmp_path, monkeypatch):
    # two slots, a long first row: the third row must start as soon as the short second row
    # ends, not after the long one (a core idled in between before)
    from bkbench.experiments import ablate

    polls_left = {"resnet_bk_long": 6, "resnet_bk_short": 1, "resnet_bk_third": 1}
    events = []

    class FakeChild:
        def __init__(self, argv, pass_fds=(), env=None):
            self.name = json.loads(argv[-1])["config"]["model_name"]
            self.returncode = None
            events.append(("start", self.name))

        def poll(self):
            polls_left[self.name] -= 1
            if polls_left[self.name] <= 0 and self.returncode is None:
                self.returncode = 0
                events.append(("end", self.name))
            return self.returncode

        def wait(self):
            while self.poll() is None:
                pass
            return self.returncode

    monkeypatch.setattr(subprocess, "Popen", FakeChild)
    monkeypatch.setattr(ablate.time, "sleep", lambda s: None)
    configs = [BenchmarkConfig.from_dict(dict(model_name=n)).validate() for n in polls_left]
    ablate._run_parallel(configs, tmp_path, resume=False, jobs=2, threads="1")
    assert events.index(("start", "resnet_bk_third")) < events.index(("end", "resnet_bk_long"))
    assert events.index(("end", "resnet_bk_short")) < events.index(("start", "resnet_bk_third"))


def test_a_signal_to_a_parallel_ablation_stops_its_rows_and_starts_no_more(tmp_path, monkeypatch):
    # before, each child checkpointed and exited but the parent logged it "done" and started
    # the next rows, so SIGTERM did not stop the command
    from bkbench.benchmark import RunFailedError
    from bkbench.experiments import ablate

    names = [f"resnet_bk_r{i}" for i in range(4)]
    started, signalled = [], []

    class FakeChild:
        def __init__(self, argv, pass_fds=(), env=None):
            self.name = json.loads(argv[-1])["config"]["model_name"]
            self.returncode, self.polls = None, 0
            started.append(self.name)

        def send_signal(self, signum):
            signalled.append((self.name, signum))
            self.returncode = 128 + signum   # the worker checkpoints and exits so

        def poll(self):
            self.polls += 1
            if self.name == "resnet_bk_r0" and self.polls == 2:
                os.kill(os.getpid(), signal.SIGTERM)   # the user's kill reaches the parent
            return self.returncode

        def wait(self):
            return self.poll()

    monkeypatch.setattr(subprocess, "Popen", FakeChild)
    monkeypatch.setattr(ablate.time, "sleep", lambda s: None)
    configs = [BenchmarkConfig.from_dict(dict(model_name=n)).validate() for n in names]
    with pytest.raises(RunFailedError) as stopped:
        ablate._run_parallel(configs, tmp_path, resume=False, jobs=2, threads="1")
    assert stopped.value.exit_code == 128 + signal.SIGTERM
    assert started == names[:2]
    assert sorted(signalled) == [(n, signal.SIGTERM) for n in names[:2]]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL   # the handler is put back
