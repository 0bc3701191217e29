"""The presets: each builds valid configs for the benchmark's runs, and the byte-level preset
keeps the LM head a minority of every model's counted forward (its reason to exist)."""

import pytest
import torch

from bkbench.config import DEFAULT_RUNS, PRESETS, build_run_configs
from bkbench.flags import build_model
from bkbench.metrics.flops import measure_step_flops


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_builds_the_three_runs(preset):
    configs = build_run_configs(preset, overrides=dict(device="cpu"))
    assert [c.model_name for c in configs] == list(DEFAULT_RUNS)
    assert len({(c.d_model, c.n_layers, c.n_seq, c.seed) for c in configs}) == 1


def test_bytes_preset_spends_most_forward_flops_outside_the_lm_head():
    for config in build_run_configs("bytes", overrides=dict(device="cpu")):
        assert config.tokenizer == "byte"
        torch.manual_seed(0)
        model, _ = build_model(config, 256)
        # the share per token does not depend on the batch: two windows are enough
        flops = measure_step_flops(model, 2, config.n_seq, 256)
        by_component = flops.forward_by_component
        head_share = by_component["lm_head"] / sum(by_component.values())
        assert head_share < 0.5, (config.model_name, head_share)
