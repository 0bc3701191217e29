"""The data-side flags (issue 12): curriculum and active learning change which windows train."""

import dataclasses
import math
import os
import signal

import pytest
import torch

from bkbench.cli import main
from bkbench.config import BenchmarkConfig, ConfigError
from bkbench.data_selection import target
from bkbench.data_selection.curriculum import competence, difficulty_scores
from bkbench.flags import build_model
from bkbench.metrics.flops import measure_forward_flops
from bkbench.train import Trainer, TrainingInterrupted, seed_everything

from conftest import make_corpus

V = 32


def config(arch="transformer", **changes):
    base = dict(model_name=f"{arch}_t", d_model=16, n_layers=1, n_heads=2, n_seq=16,
                batch_size=8, epochs=2, lr=3e-3, warmup_steps=1, eval_batch_size=16, seed=3,
                dropout=0.1, num_experts=4)
    return BenchmarkConfig.from_dict({**base, **changes}).validate()


def corpus(seed=0):
    return make_corpus(vocab_size=V, n_train=2000, n_eval=300, seed=seed)


def trainer(cfg, data=None, **kw):
    seed_everything(cfg.seed)
    model, flags = build_model(cfg, V)
    return Trainer(cfg, model, data or corpus(), torch.device("cpu"), progress=False,
                   flags=flags, **kw)


# --- curriculum -----------------------------------------------------------------------------

def test_curriculum_ranks_by_score_and_paces_the_first_batches_to_the_easiest():
    t = trainer(config(use_curriculum=True, curriculum_initial_competence=0.2))
    flag = t.flags.flags["use_curriculum"]
    order = t.epoch_order(0)
    scores = flag.scores
    # the ranking is monotone in the score (easiest first), and ranks every window once
    assert torch.all(scores[flag.ranking][1:] >= scores[flag.ranking][:-1])
    assert sorted(flag.ranking.tolist()) == list(range(t.num_windows))
    # step 0: c = c0, every window of the first batch is among the easiest ceil(c0 * N)
    pool = math.ceil(0.2 * t.num_windows)
    easiest = set(flag.ranking[:pool].tolist())
    assert set(order[:8].tolist()) <= easiest
    # not the trainer's random order, and easier than it on average over the epoch
    g = torch.Generator().manual_seed(t.config.seed * 100_003 + 0)
    plain = torch.randperm(t.num_windows, generator=g)
    assert not torch.equal(order[:plain.numel()], plain)
    n = t.steps_per_epoch * 8
    assert scores[order[:n]].mean() < scores[plain[:n]].mean()


def test_each_batch_is_drawn_from_the_easiest_competence_share_as_documented():
    """Oracle: batch b of epoch e is batch_size windows drawn without replacement from the
    easiest max(bs, ceil(c(s) N)) windows, by the documented generator. A curriculum that
    did nothing (the trainer's permutation) or drew from the wrong pool fails, at partial
    competence and at full competence alike."""
    for c0, full_at in ((0.2, 1.0), (1.0, 0.5)):
        t = trainer(config(use_curriculum=True, curriculum_initial_competence=c0,
                           curriculum_full_at=full_at, epochs=2))
        flag = t.flags.flags["use_curriculum"]
        n, bs, spe = t.num_windows, 8, t.steps_per_epoch
        for epoch in range(2):
            order = t.epoch_order(epoch)
            g = torch.Generator().manual_seed(t.config.seed * 1_000_003 + 7919 * epoch + 17)
            expected = []
            for b in range(spe):
                c = competence(epoch * spe + b, c0, max(1.0, full_at * t.total_steps))
                pool = min(n, max(bs, math.ceil(c * n)))
                expected.append(flag.ranking[torch.randperm(pool, generator=g)[:bs]])
            assert torch.equal(order, torch.cat(expected)), (c0, epoch)
    # at full competence the draws are from every window: the hard half is fed about as
    # often as the easy half (with replacement across steps, unlike the trainer's order)
    t = trainer(config(use_curriculum=True, curriculum_initial_competence=1.0, epochs=4))
    flag = t.flags.flags["use_curriculum"]
    assert flag.competence_at(t.context, 0) == 1.0
    seen = torch.cat([t.epoch_order(e) for e in range(4)])
    rank_of = torch.empty(t.num_windows, dtype=torch.long)
    rank_of[flag.ranking] = torch.arange(t.num_windows)
    hard_share = (rank_of[seen] >= t.num_windows // 2).float().mean().item()
    assert 0.4 < hard_share < 0.6


def test_competence_schedule_equals_the_formula():
    c0, T = 0.1, 40.0
    for s in (0, 1, 10, 39):
        assert competence(s, c0, T) == pytest.approx(math.sqrt(s * (1 - c0 ** 2) / T + c0 ** 2))
    assert competence(40, c0, T) == 1.0 and competence(1000, c0, T) == 1.0
    t = trainer(config(use_curriculum=True, curriculum_full_at=0.5,       # 30 steps: T = 15
                       curriculum_initial_competence=0.1))
    flag = t.flags.flags["use_curriculum"]
    assert flag.full_steps(t.context) == 15.0
    assert flag.competence_at(t.context, 5) == pytest.approx(math.sqrt(5 * 0.99 / 15 + 0.01))
    out = t.fit()
    rec = flag.record(t.context, out)
    for sample in rec["competence_samples"]:
        assert sample["competence"] == pytest.approx(competence(sample["step"] - 1, 0.1, 15.0))


def test_difficulty_scores_read_the_training_split_only():
    data = corpus()
    scores = difficulty_scores(data.train, 16, V, "bigram")
    assert scores.shape == ((data.train.numel() - 1) // 16,)
    # a window's score is its mean add-one bigram NLL, checked by hand for window 3
    tr = data.train
    pairs = {}
    for a, b in zip(tr[:-1].tolist(), tr[1:].tolist()):
        pairs[(a, b)] = pairs.get((a, b), 0) + 1
    ctx = torch.bincount(tr[:-1], minlength=V).tolist()
    w = tr[3 * 16: 4 * 16 + 1].tolist()
    nll = [-math.log((pairs.get((w[j], w[j + 1]), 0) + 1) / (ctx[w[j]] + V)) for j in range(16)]
    assert scores[3].item() == pytest.approx(sum(nll) / 16, rel=1e-5)
    # the flag's order does not move when validation and test text change
    other = corpus(seed=9)
    changed = dataclasses.replace(data, valid=other.valid, test=other.test)
    cfg = config(use_curriculum=True)
    a, b = trainer(cfg, data).epoch_order(1), trainer(cfg, changed).epoch_order(1)
    assert torch.equal(a, b)
    changed_train = dataclasses.replace(data, train=other.train)
    assert not torch.equal(a, trainer(cfg, changed_train).epoch_order(1))


# --- active learning ------------------------------------------------------------------------

def test_active_learning_selects_by_the_training_steps_own_losses():
    """No scoring forward: the model runs once per step on the batch it trains on; the table
    holds each fed window's NLL under the weights of the step that trained on it; each round
    feeds its pool's highest latest losses (unseen windows first)."""
    from bkbench.eval import target_nll
    cfg = config(use_active_learning=True, active_learning_fraction=0.25, dropout=0.0,
                 active_learning_every=2, active_learning_random_share=0.0)
    t = trainer(cfg)
    flag = t.flags.flags["use_active_learning"]
    rows = [0]
    t.model.register_forward_hook(lambda m, args, out: rows.__setitem__(0, rows[0] + args[0].shape[0]))
    rounds, oracle = [], {}
    select = flag._select_round

    def spy_round(run, epoch, order, rnd):
        at = rnd * 2 * 8
        pool = order[(at + torch.arange(64)) % order.numel()]
        before = flag.table.priority(pool).clone() if flag.table is not None else None
        chosen = select(run, epoch, order, rnd)
        rounds.append((pool, before, chosen))
        return chosen
    flag._select_round = spy_round
    step = t.train_step

    def spy_step(inputs, targets):
        with torch.no_grad():
            t.model.eval()
            nll = target_nll(t.model, inputs, targets, reduction="none").mean(dim=1)
        oracle[t.progress.step] = (flag.fed_now.clone(), nll)
        counted = rows[0]
        out = step(inputs, targets)
        assert rows[0] - counted == inputs.shape[0]          # one forward of the batch
        return out
    t.train_step = spy_step
    out = t.fit()
    rec = flag.record(t.context, out)
    checked = 0
    for s, (windows, nll) in oracle.items():
        if torch.equal(flag.table.step[windows], torch.full((8,), s)):   # not fed again since
            assert torch.allclose(flag.table.loss[windows].float(), nll, rtol=1e-5, atol=1e-6)
            checked += 1
    assert checked >= 5
    # random_share 0: a round feeds the top 16 of its pool of 64 by latest loss
    for pool, before, chosen in rounds[1:]:
        picked = torch.isin(pool, chosen)
        assert before[picked].min() >= before[~picked].max()
    assert rec["selection_flops"] == 0 and rec["scoring_passes"] == 0
    assert rec["windows_fed"] == out.steps * 8 and rec["fraction_actual"] == 0.25
    assert rec["windows_considered"] == rec["rounds"] * 64   # the last round is cut by the epoch
    assert 0 < rec["selected_by_known_loss_share"] <= 1


def test_active_learning_selects_within_the_curriculums_pacing():
    """Declared composition: the pool is the curriculum's order at the round's position, so
    no window is fed before the curriculum admits it (the pool of the old flag, drawn from the
    whole epoch, fed hard windows at the first steps)."""
    cfg = config(use_curriculum=True, use_active_learning=True, curriculum_initial_competence=0.1,
                 curriculum_full_at=1.0, active_learning_random_share=0.5, epochs=2)
    t = trainer(cfg)
    cur, al = t.flags.flags["use_curriculum"], t.flags.flags["use_active_learning"]
    fed = []
    batch_windows = al.batch_windows

    def spy(run, epoch, order, index):
        w = batch_windows(run, epoch, order, index)
        fed.append((t.progress.step, w.clone()))
        return w
    al.batch_windows = spy
    t.fit()
    pool_batches = al.settings.pool_batches()
    n = t.num_windows
    for step, windows in fed:
        last = min(step + pool_batches - 1, t.total_steps - 1)
        eligible = cur.ranking[:max(8, math.ceil(cur.competence_at(t.context, last) * n))]
        assert torch.isin(windows, eligible).all(), step
    # the first steps feed only a small easy share: the pacing is felt
    assert math.ceil(cur.competence_at(t.context, pool_batches) * n) < n / 2


# --- both -----------------------------------------------------------------------------------

@pytest.mark.parametrize("flag,extra", [
    ("use_curriculum", {}),
    ("use_active_learning", {"active_learning_every": 4}),   # step 7 is inside a round
])
def test_kill_and_resume_is_bit_identical(flag, extra, tmp_path):
    data = corpus()
    cfg = config("resnet_bk", **{flag: True}, **extra, checkpoint_every=3)
    ref = trainer(cfg, data, run_dir=tmp_path / "ref")
    out_ref = ref.fit()
    t = trainer(cfg, data, run_dir=tmp_path / "cut")
    hook = t.flags.after_optimizer_step

    def interrupt_at_step_7(run, terms):
        hook(run, terms)
        if run.progress.step + 1 == 7:
            os.kill(os.getpid(), signal.SIGTERM)
    t.flags.after_optimizer_step = interrupt_at_step_7
    with pytest.raises(TrainingInterrupted):
        t.fit()
    resumed = trainer(cfg, data, run_dir=tmp_path / "cut", resume=True)
    out = resumed.fit()
    assert out.resumed_from_step == 7
    assert out.step_losses == out_ref.step_losses
    assert out.test.total_nll == out_ref.test.total_nll
    for a, b in zip(resumed.model.state_dict().items(), ref.model.state_dict().items()):
        assert a[0] == b[0] and torch.equal(a[1], b[1]), a[0]
    timing = {"scoring_seconds", "selection_seconds", "selection_seconds_share",
              "validation_curve", "time_to_target", "selection_flops_share"}
    rec_a = resumed.flags.record(resumed.context, out)[flag]["measured"]
    rec_b = ref.flags.record(ref.context, out_ref)[flag]["measured"]
    assert {k: v for k, v in rec_a.items() if k not in timing} == \
        {k: v for k, v in rec_b.items() if k not in timing}


@pytest.mark.parametrize("setting,value", [
    ("active_learning_fraction", 0.0), ("active_learning_fraction", 1.5),
    ("active_learning_random_share", 1.0), ("active_learning_every", 0),
    ("curriculum_initial_competence", 0.0), ("curriculum_full_at", 2.0),
    ("curriculum_score", "trigram"),
])
def test_bad_settings_are_refused_naming_the_setting(setting, value):
    flag = "use_" + ("active_learning" if setting.startswith("active") else "curriculum")
    with pytest.raises(ConfigError, match=setting):
        config(**{flag: True, setting: value})


def test_bad_fraction_exits_2_on_the_command_line(tmp_path, capsys):
    code = main(["run", "--preset", "smoke", "--models", "transformer_baseline",
                 "--use-active-learning", "--active-learning-fraction", "1.5",
                 "--output-dir", str(tmp_path / "o")])
    assert code == 2 and "active_learning_fraction" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("flag", ["use_curriculum", "use_active_learning"])
@pytest.mark.parametrize("arch", ["transformer", "resnet_bk"])
def test_a_tiny_run_records_what_the_flag_did(flag, arch):
    t = trainer(config(arch, **{flag: True}, **{flag[4:] + "_target_perplexity": 1e6}))
    out = t.fit()
    rec = t.flags.record(t.context, out)[flag]
    assert rec["settings"] and rec["measured"]
    tt = rec["measured"]["time_to_target"]
    # a target every epoch meets: reached at the end of the first epoch
    assert tt["reached"] and tt["epoch"] == 1 and tt["steps"] == t.steps_per_epoch
    assert tt["tokens"] == t.steps_per_epoch * 8 * 16 and tt["seconds"] == out.epoch_times[0]


def test_time_to_target_is_the_first_epoch_at_or_below_it():
    curve = target.validation_curve([30.0, 20.0, 15.0], [1.0, 2.0, 3.0], 10, 25, 128)
    assert [p["steps"] for p in curve] == [10, 20, 25]
    assert target.time_to_target(curve, 20.0) == {"target": 20.0, "reached": True, "epoch": 2,
                                                  "steps": 20, "tokens": 2560, "seconds": 3.0}
    assert target.time_to_target(curve, 10.0)["reached"] is False
    assert target.time_to_target(curve, None) is None


def test_report_lists_each_runs_flags_and_a_time_to_target_table(tmp_path):
    from test_report import passing_set

    from bkbench.report import build_report
    results = passing_set()
    bk = results["resnet_bk_full"]
    curve = [{"epoch": e + 1, "steps": s, "tokens": s * 32 * 2048, "seconds": t, "valid_perplexity": p}
             for e, (s, t, p) in enumerate(zip([33, 66, 100], [10.0, 20.0, 30.0],
                                               [150.0, 110.0, 100.0]))]
    bk.flags = {"use_curriculum": {"settings": {"score": "bigram", "target_perplexity": 0.0},
                                   "measured": {"score_summary": {"mean": 5.0},
                                                "validation_curve": curve}},
                "use_active_learning": {"settings": {"fraction": 0.5, "target_perplexity": 0.0},
                                        "measured": {"selection_flops": 1000,
                                                     "validation_curve": curve}}}
    bk.flops["selection"] = {"total": 1000, "by_flag": {"use_active_learning": 1000}}
    for r in results.values():
        r.save(tmp_path / f"{r.model_name}_results.json")
    build_report(tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert "### resnet_bk_full" in md and "`use_curriculum`" in md and "score_summary" in md
    assert "Selection passes: " in md
    # the baseline's best validation ppl (118.75) is first met by the flagged run at epoch 2
    assert ("| resnet_bk_full | `use_curriculum`, `use_active_learning` | 118.75 | baseline "
            "`resnet_bk_baseline` | 2 | 66 |") in md
    assert "| resnet_bk_baseline (baseline) | none | 118.75 | its own best epoch | 3 | 100 |" in md
    assert "Time to target" in (tmp_path / "report.html").read_text()


@pytest.mark.slow
def test_results_file_has_a_selection_flops_line_in_total_flops(shared_data_dir, tmp_path):
    from bkbench.benchmark import WikiText2Benchmark
    from bkbench.config import build_run_configs
    base = build_run_configs("smoke", overrides={"max_steps": 2, "data_dir": str(shared_data_dir),
                                                 "split_scheme": "proxy"},
                             models=["transformer_baseline"])[0]
    cfg = base.replace(model_name="transformer_al", use_active_learning=True)
    r = WikiText2Benchmark(tmp_path, progress=False).run_benchmark(cfg)
    measured = r.flags["use_active_learning"]["measured"]
    sel = r.flops["selection"]
    # no scoring forward: the selection reuses the training steps' own losses
    assert sel["total"] == measured["selection_flops"] == measured["scoring_passes"] == 0
    assert r.total_flops == r.flops["training"]["total"]
