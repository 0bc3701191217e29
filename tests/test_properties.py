"""Property tests (issues 15 and 26): any config, valid or not, and any choice of optimisation
flags and their settings, either trains one step of a tiny model or stops with a ConfigError
of one short line, never a traceback, a hang or a file.

Each example is written as a YAML file and goes the way of ``bkbench run --config``: the file
is loaded, the runs assembled over the smoke preset and validated, then the run trains one step
on a small synthetic corpus.
"""

import math

import pytest
import torch
import yaml

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, event, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from bkbench.config import ConfigError, build_run_configs, load_yaml  # noqa: E402
from bkbench.flags import build_model  # noqa: E402
from bkbench.flags.registry import REGISTRY, setting_type, settings_fields  # noqa: E402
from bkbench.train import Trainer, seed_everything, steps_per_epoch  # noqa: E402
from bkbench.validation import (check_model_size, check_selection_pool,  # noqa: E402
                                check_settings_have_their_flags)

from conftest import make_corpus  # noqa: E402

CORPUS = make_corpus(vocab_size=24, n_train=400, n_eval=60)
# sizes of the fields a drawn config leaves out (the smoke preset's are too big for CORPUS)
TINY = dict(d_model=8, n_layers=1, n_seq=8, n_heads=2, batch_size=2, num_experts=2)

# junk any field may get instead of a good value
JUNK = st.one_of(st.none(), st.booleans(), st.text(max_size=12), st.just(float("nan")),
                 st.just(float("inf")), st.integers(-10**30, 10**30), st.floats(-1e6, 1e6),
                 st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=3),
                                                                       st.integers(), max_size=2))


def field(good):
    """A good value, or junk one time in ten: with a dozen fields drawn, about a third of the
    configs are valid and train, the rest are refused."""
    return st.integers(0, 9).flatmap(lambda r: JUNK if r == 0 else good)


CONFIG = st.fixed_dictionaries({}, optional={
    "d_model": field(st.sampled_from([8, 12, 16])),
    "n_layers": field(st.integers(1, 2)),
    "n_seq": field(st.integers(2, 12)),
    "n_heads": field(st.integers(1, 4)),
    "dropout": field(st.floats(0, 0.5)),
    "tie_weights": field(st.booleans()),
    "num_experts": field(st.integers(1, 3)),
    "top_k": field(st.integers(1, 3)),
    "bk_heads": field(st.integers(1, 2)),
    "bk_mode": field(st.just("causal")),
    "v_max": field(st.floats(0.5, 4)),
    "bk_h0": field(st.floats(-3, 3)),
    "bk_t": field(st.floats(0.1, 2)),
    "bk_eps": field(st.floats(0.5, 2)),
    "batch_size": field(st.integers(1, 4)),
    "lr": field(st.floats(1e-5, 1e-2)),
    "weight_decay": field(st.floats(0, 0.1)),
    "grad_clip": field(st.floats(0.1, 2)),
    "warmup_steps": field(st.integers(0, 3)),
    "min_lr_ratio": field(st.floats(0, 1)),
    "seed": field(st.integers(0, 2**32 - 1)),
    "eval_stride": field(st.one_of(st.none(), st.integers(1, 4))),
    "device": field(st.just("cpu")),
    "use_analytic_gradient": field(st.booleans()),
    "model_name": field(st.sampled_from(["transformer_p", "resnet_bk_p", "resnet_bk_q.1"])),
})


def train_one_step_or_refuse(values, folder):
    """Write ``values`` as a YAML config of one run, make `bkbench run`'s checks, and train one
    step; a refusal must be one short line and leave nothing behind."""
    path = folder / "config.yaml"
    name = values.pop("model_name", "transformer_p")  # the run's name is its key under runs
    if not isinstance(name, (str, int, float, bool, type(None))):
        name = repr(name)
    doc = {**TINY, **values, "max_steps": 1, "eval_batch_size": 64, "runs": {name: {}}}
    path.write_text(yaml.safe_dump(doc))
    try:  # the checks `bkbench run` makes before any work
        file_values = load_yaml(path)
        (config,) = build_run_configs("smoke", file_values)
        check_settings_have_their_flags(file_values, [config])
        steps_per_epoch(config, CORPUS.train.numel())
        check_selection_pool(config, (CORPUS.train.numel() - 1) // config.n_seq)
        check_model_size(config, len(CORPUS.vocab), torch.device("cpu"))
    except ConfigError as exc:
        message = str(exc)
        assert "\n" not in message and 0 < len(message) < 400, message
        assert sorted(p.name for p in folder.iterdir()) == ["config.yaml"]
        event("refused in one line")
        return
    event("trained one step")
    seed_everything(config.seed)
    model, flags = build_model(config, len(CORPUS.vocab))
    trainer = Trainer(config, model, CORPUS, torch.device("cpu"), progress=False, flags=flags)
    outcome = trainer.fit()
    assert outcome.steps == 1 and math.isfinite(outcome.step_losses[0])
    assert math.isfinite(outcome.test.loss) and outcome.test.num_tokens == CORPUS.test.numel()


@pytest.mark.slow
@settings(max_examples=200, deadline=None, derandomize=True, database=None,
          phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate],  # shrinking: ~15 min in CI
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(values=CONFIG)
def test_any_config_trains_one_step_or_fails_in_one_line(values, tmp_path_factory):
    train_one_step_or_refuse(values, tmp_path_factory.mktemp("prop"))


def setting_values(spec, f):
    """Good values of a flag setting, from its type alone (every setting of every registered
    flag, none named): small sizes and counts, fractions and weights in [0, 1], the default."""
    kind, default = setting_type(spec.settings, f.name), f.default
    if kind is bool:
        good = st.booleans()
    elif kind is int:   # sizes and repeats kept small: a one-step example must stay fast
        good = st.integers(0, 4) | (st.just(default) if default <= 8 else st.nothing())
    elif kind is float:
        good = st.floats(0, 1) | st.just(default)
    else:
        good = st.just(default)
    return field(good)


@st.composite
def flag_choices(draw):
    """A run with a few flags on, each setting of theirs drawn or left at its default; one
    time in ten also a flag that does not apply to the architecture, or a setting of a flag
    that is off (both must be refused)."""
    arch = draw(st.sampled_from(["transformer", "resnet_bk"]))
    applicable = [n for n, s in REGISTRY.items() if arch in s.architectures]
    on = draw(st.lists(st.sampled_from(applicable), unique=True, max_size=4))
    if draw(st.integers(0, 9)) == 0:
        on.append(draw(st.sampled_from(sorted(REGISTRY))))
    values = {"model_name": f"{arch}_p", "n_layers": draw(st.integers(1, 3)),
              **{name: True for name in on}}
    fields = settings_fields()
    for flat, (spec, f) in fields.items():
        if spec.name in on and draw(st.booleans()):
            values[flat] = draw(setting_values(spec, f))
    if draw(st.integers(0, 9)) == 0:
        flat = draw(st.sampled_from(sorted(fields)))
        values[flat] = draw(setting_values(*fields[flat]))
    return values


@pytest.mark.slow
@settings(max_examples=300, deadline=None, derandomize=True, database=None,
          phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate],
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(values=flag_choices())
def test_any_flags_and_settings_train_one_step_or_fail_in_one_line(values, tmp_path_factory):
    train_one_step_or_refuse(values, tmp_path_factory.mktemp("flags"))
