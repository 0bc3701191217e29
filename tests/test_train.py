"""The training engine: determinism, learning, budgets, NaN detection, checkpoints."""


import pytest
import torch

from bkbench.config import BenchmarkConfig
from bkbench.models import build_model
from bkbench.train import Trainer, TrainingDivergedError, seed_everything

from conftest import make_corpus


def tiny_config(**changes):
    base = dict(model_name="transformer_t", d_model=16, n_layers=1, n_heads=2, n_seq=16,
                batch_size=8, epochs=2, lr=3e-3, warmup_steps=2, eval_batch_size=16, seed=3,
                dropout=0.1)
    return BenchmarkConfig(**{**base, **changes}).validate()


def train(config, corpus, **kwargs):
    seed_everything(config.seed)
    model = build_model("transformer", len(corpus.vocab), **config.model_kwargs())
    trainer = Trainer(config, model, corpus, torch.device("cpu"), progress=False, **kwargs)
    return trainer, trainer.fit()


def test_same_seed_gives_identical_numbers(tiny_corpus):
    cfg = tiny_config()
    _, a = train(cfg, tiny_corpus)
    _, b = train(cfg, tiny_corpus)
    assert a.step_losses == b.step_losses
    assert a.test.total_nll == b.test.total_nll
    _, c = train(cfg.replace(seed=4), tiny_corpus)
    assert c.step_losses != a.step_losses


def test_training_learns_and_reports_held_out_numbers(tiny_corpus):
    cfg = tiny_config(epochs=3)
    trainer, out = train(cfg, tiny_corpus)
    assert out.steps == 3 * trainer.steps_per_epoch
    assert len(out.epoch_losses) == len(out.epoch_perplexities) == len(out.epoch_times) == 3
    assert out.epoch_losses[-1] < out.epoch_losses[0]
    assert out.valid.num_tokens == tiny_corpus.valid.numel()
    assert out.test.num_tokens == tiny_corpus.test.numel()
    assert out.valid.perplexity < 32  # better than uniform over the 32-token vocabulary
    assert out.valid.perplexity == min(out.epoch_perplexities)  # best-validation weights
    assert out.total_tokens == out.steps * cfg.batch_size * cfg.n_seq


def test_step_and_token_budgets(tiny_corpus):
    trainer, out = train(tiny_config(epochs=5, max_steps=7), tiny_corpus)
    assert out.steps == 7
    trainer, out = train(tiny_config(epochs=5, max_tokens=8 * 16 * 3 + 1), tiny_corpus)
    assert out.steps == 4  # tokens budget rounded up to whole steps
    assert len(out.epoch_perplexities) == 1


def test_windows_cover_each_training_window_once_per_epoch(tiny_corpus):
    cfg = tiny_config()
    seed_everything(0)
    model = build_model("transformer", 32, **cfg.model_kwargs())
    trainer = Trainer(cfg, model, tiny_corpus, torch.device("cpu"), progress=False)
    order = trainer.epoch_order(0)
    assert sorted(order.tolist()) == list(range(trainer.num_windows))
    assert not torch.equal(order, trainer.epoch_order(1))
    x, y = trainer.batch(order, 0)
    assert x.shape == y.shape == (8, 16)
    assert torch.equal(x[:, 1:], y[:, :-1])


def test_nan_loss_stops_the_run_naming_the_step(tiny_corpus):
    cfg = tiny_config()
    seed_everything(0)
    model = build_model("transformer", 32, **cfg.model_kwargs())
    trainer = Trainer(cfg, model, tiny_corpus, torch.device("cpu"), progress=False)
    calls = {"n": 0}
    original = model.forward

    def poisoned(idx):
        calls["n"] += 1
        out = original(idx)
        return out * float("nan") if calls["n"] == 4 else out

    model.forward = poisoned
    # the 4th forward is step 4, numbered as train_log.jsonl numbers it (from 1)
    with pytest.raises(TrainingDivergedError, match=r"at step 4 \(epoch 1, batch 4\)"):
        trainer.fit()


def test_nan_gradient_stops_the_run(tiny_corpus):
    cfg = tiny_config()
    seed_everything(0)
    model = build_model("transformer", 32, **cfg.model_kwargs())
    trainer = Trainer(cfg, model, tiny_corpus, torch.device("cpu"), progress=False)
    model.lm_head.weight.register_hook(lambda g: g * float("inf"))
    with pytest.raises(TrainingDivergedError, match="gradient norm.*step 1 .*lm_head"):
        trainer.fit()


def test_too_small_training_split_is_a_config_error():
    corpus = make_corpus(n_train=50)
    with pytest.raises(ValueError, match="fewer than one batch"):
        train(tiny_config(), corpus)
