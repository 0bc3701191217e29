"""bkbench.size_estimate: the sizes measured on the meta device against the real model's."""

import dataclasses

import pytest
import torch

from bkbench.config import build_run_configs
from bkbench.flags import build_model
from bkbench.size_estimate import _forward, _MetaTrace, estimate

VOCAB = 97
RUNS = ["transformer_baseline", "resnet_bk_baseline", "resnet_bk_full", "gla_baseline",
        "lstm_baseline"]


def smoke(run, **changes):
    config = build_run_configs("smoke", {}, {"batch_size": 2, "eval_batch_size": 3, **changes},
                               [run], run_suffix="t")[0]
    return dataclasses.replace(config, dropout=0.0)


def real_sizes(config):
    """Parameters, largest tensor and the training forward's counted matrix-product FLOPs
    (``torch.utils.flop_counter``, the counter the FLOP budget uses) of the real model."""
    from torch.utils.flop_counter import FlopCounterMode
    torch.manual_seed(0)
    model, _ = build_model(config, VOCAB)
    trace, counter = _MetaTrace(), FlopCounterMode(display=False)
    g = torch.Generator().manual_seed(1)
    with trace:
        with counter:
            _forward(model.train(), torch.randint(VOCAB, (config.batch_size, config.n_seq),
                                                  generator=g))
        with torch.no_grad():
            _forward(model.eval(), torch.randint(VOCAB, (config.eval_batch_size, config.n_seq),
                                                 generator=g))
    params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    return params, trace.largest, counter.get_total_flops()


@pytest.mark.parametrize("run", RUNS)
def test_meta_estimate_counts_the_real_parameters_and_bounds_the_real_sizes(run):
    config = smoke(run)
    est = estimate(config, VOCAB)
    params, largest, flops = real_sizes(config)
    assert est.traced_to_the_end
    assert est.parameters == params
    # lower bounds (value-dependent routing may differ), exact where nothing depends on values
    assert 0 < est.largest_tensor_bytes <= largest
    if run in ("transformer_baseline", "gla_baseline"):   # (the CPU LSTM adds a workspace)
        assert est.largest_tensor_bytes == largest
    if est.forward_flops is not None:   # the Linear layers' share of the counted forward
        assert est.forward_flops <= flops
    if run == "transformer_baseline":   # its projections and MLPs are most of it
        assert est.forward_flops >= 0.5 * flops


def test_flag_and_model_sizes_reach_the_estimate_without_allocating():
    # each of these allocated for 16-99 s before failing; on the meta device they cost nothing
    koopman = estimate(smoke("resnet_bk_baseline", use_koopman=True, koopman_dim=10**8), VOCAB)
    assert koopman.parameters > 10**16   # the dim x dim operator K
    chunk = estimate(smoke("gla_baseline", gla_chunk_size=10**6), VOCAB)
    assert chunk.largest_tensor_bytes >= 4 * 10**12        # a chunk x chunk float32 matrix
    factor = estimate(smoke("resnet_bk_baseline", use_multi_scale=True,
                            multi_scale_factor=10**6), VOCAB)
    assert factor.largest_tensor_bytes >= 4 * 2 * 10**6 * 32   # batch x factor x d_model
