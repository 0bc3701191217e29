"""The command line's flag options, readable without importing the flag modules.

The flag modules import torch, and ``bkbench run --help`` should print at once (issue 28:
2.6 s quiet, 13-23 s on a loaded machine). So the options the registry defines (one per flag,
one per flag setting) are written out here by ``python -m bkbench.flag_options``, from
:mod:`bkbench.flags.registry`, which stays the one source: a test checks that this file is
what the registry generates.
"""

from __future__ import annotations

# generated: begin
FLAG_HELP = {
    'use_analytic_gradient':
        'BK-Core backward by the exact O(N) adjoint sweep instead of autograd through the recurrence (resnet_bk)',
    'use_koopman':
        'Koopman auxiliary loss: a lifting phi, a linear operator K and a decoder with phi(h_{l+1}) ~ K phi(h_l) along the layers, weight warmed up (transformer, resnet_bk)',
    'use_physics_informed':
        'energy-conservation penalty: relative drift |E(h_{l+1}) - E(h_l)| / E(h_l) along the layers, E(h) = 1/2 |h|^2 / d per position, weight warmed up (transformer, resnet_bk)',
    'use_quantization':
        'quantization-aware training of every Linear (INT8 or INT4 symmetric per-channel weights, INT8 per-token activations, straight-through); integer weights at evaluation (transformer, resnet_bk)',
    'use_pruning':
        'gradual pruning after the LR warm-up on a cubic schedule: feed-forward hidden units removed for real (matrices shrink), or single weights zeroed with the masks folded into the weights; rarely used MoE experts removed; head and embedding kept (transformer, resnet_bk)',
    'use_mixed_precision':
        'torch.autocast in bfloat16 (CPU and CUDA); the BK mixers stay in float32/complex64 (transformer, resnet_bk)',
    'use_act':
        "adaptive computation time over depth: per-token halting units, halted tokens' feed-forward skipped by gathering the running rows; ponder cost N + R in the loss (resnet_bk)",
    'use_early_exit':
        "per-layer exits through the final norm and the shared LM head, trained on sampled positions; at evaluation a token exits once its hidden state saturates (cosine of consecutive layers' states), at a threshold calibrated on the validation split (resnet_bk)",
    'use_multi_scale':
        'causal hourglass: shift right by k-1, mean-pool by k before the middle blocks, which run on N/k positions, then upsample and add the residual (resnet_bk)',
    'use_sparse_bk':
        'Mixture-of-Depths routing of each block: a token whose own router logit is > 0 runs the block (MoE on the gathered rows, BK on the chain of routed tokens), the others keep their state (residual only) (resnet_bk)',
    'use_curriculum':
        "competence-based curriculum: each step's batch drawn from the easiest c(s) share of the windows, ranked by an n-gram NLL fitted on the training split (sqrt pacing) (transformer, resnet_bk)",
    'use_active_learning':
        "online batch selection by each window's latest training loss (no scoring pass): every k steps the top-loss fraction of the next pool of windows is trained on (a random share kept) (transformer, resnet_bk)",
}
SETTINGS = {
    'analytic_gradient_timing_repeats': ('int',
        'use_analytic_gradient: timed repetitions of the with/without BK-Core backward measurement (default: 7)'),
    'koopman_weight': ('float',
        'use_koopman: weight of the Koopman loss term (default: 0.01)'),
    'koopman_warmup': ('float',
        "use_koopman: fraction of the run's steps over which the weight ramps up linearly from 0 (0: full weight at once) (default: 0.1)"),
    'koopman_dim': ('int',
        'use_koopman: dimension m of the lifted space (default: 32)'),
    'koopman_record_windows': ('int',
        'use_koopman: held-out validation windows for the recorded prediction error (default: 16)'),
    'physics_informed_weight': ('float',
        'use_physics_informed: weight of the energy-drift penalty (default: 0.1)'),
    'physics_informed_warmup': ('float',
        "use_physics_informed: fraction of the run's steps over which the weight ramps up linearly from 0 (0: full weight at once) (default: 0.1)"),
    'physics_informed_record_windows': ('int',
        'use_physics_informed: held-out validation windows for the recorded energy drift (default: 16)'),
    'quantization_bits': ('int',
        'use_quantization: weight bits: 8 (INT8) or 4 (INT4) (default: 8)'),
    'quantization_record_windows': ('int',
        'use_quantization: test windows evaluated by the integer and the float model for the record (default: 8)'),
    'pruning_structure': ('str',
        "use_pruning: 'hidden_units': remove feed-forward hidden units (matrices shrink); 'weights': zero single weights (masks folded into the weights) (default: 'hidden_units')"),
    'pruning_target_sparsity': ('float',
        'use_pruning: final share of hidden units removed, or of zero weights, in each pruned layer (default: 0.75)'),
    'pruning_begin': ('float',
        'use_pruning: start of the schedule, as a fraction of the steps after the LR warm-up (default: 0.0)'),
    'pruning_end': ('float',
        'use_pruning: end of the schedule (target reached), as a fraction of the steps after the LR warm-up (default: 0.75)'),
    'pruning_frequency': ('int',
        'use_pruning: steps between schedule updates (default: 10)'),
    'pruning_include_head': ('bool',
        "use_pruning: also prune an untied LM head's weights (structure 'weights' only) (default: False)"),
    'pruning_expert_min_share': ('float',
        "use_pruning: remove MoE experts receiving less than this share of a layer's routed tokens (0: keep all) (default: 0.05)"),
    'pruning_expert_prune_at': ('float',
        'use_pruning: when experts are removed, as a fraction of the training steps (default: 0.5)'),
    'pruning_timing_repeats': ('int',
        'use_pruning: interleaved training steps timed pruned and unpruned for the record (default: 3)'),
    'mixed_precision_timing_steps': ('int',
        'use_mixed_precision: forward+backward passes per setting for the recorded tokens/s with and without (default: 3)'),
    'act_weight': ('float',
        'use_act: weight of the ponder cost N + R (default: 0.01)'),
    'act_eps': ('float',
        'use_act: a token halts once its cumulative halting probability reaches 1 - eps (default: 0.01)'),
    'act_bias_init': ('float',
        'use_act: initial bias of every halting unit (sigmoid of it: the initial halting probability per layer; -1 runs every layer of up to 4 at step 0, -3 of up to 21) (default: -1.0)'),
    'act_record_windows': ('int',
        'use_act: held-out validation windows for the recorded layers used and FLOPs (default: 16)'),
    'early_exit_weight': ('float',
        'use_early_exit: weight of the exits loss (default: 0.5)'),
    'early_exit_positions': ('float',
        "use_early_exit: share of a batch's positions whose exit losses train (split among the exits) (default: 0.125)"),
    'early_exit_candidates': ('str',
        "use_early_exit: saturation thresholds the validation calibration tries, highest first (default: '0.999,0.995,0.99,0.98,0.97,0.95,0.9')"),
    'early_exit_tolerance': ('float',
        'use_early_exit: relative validation perplexity increase the calibrated threshold may cost (default: 0.02)'),
    'early_exit_calibration_windows': ('int',
        'use_early_exit: validation windows the calibration evaluates (default: 16)'),
    'early_exit_record_windows': ('int',
        'use_early_exit: test windows evaluated with and without exits for the record (default: 8)'),
    'multi_scale_factor': ('int',
        'use_multi_scale: shortening factor k of the middle blocks (they run on ceil(N/k) positions) (default: 4)'),
    'multi_scale_outer_layers': ('int',
        'use_multi_scale: blocks at full resolution at each end (needs n_layers >= 2 * this + 1) (default: 1)'),
    'multi_scale_timing_repeats': ('int',
        'use_multi_scale: eval forwards timed with and without the hourglass for the record (default: 3)'),
    'sparse_bk_scope': ('str',
        "use_sparse_bk: 'block': route the whole block (MoE and BK mixer, Mixture-of-Depths); 'mixer': route the BK chain only (every token runs the MoE) (default: 'block')"),
    'sparse_bk_target_share': ('float',
        'use_sparse_bk: wanted fraction of tokens routed into the BK chain, in (0, 1] (default: 0.25)'),
    'sparse_bk_weight': ('float',
        'use_sparse_bk: weight of the share loss (share - target_share)^2 (0: no loss) (default: 0.1)'),
    'sparse_bk_record_windows': ('int',
        'use_sparse_bk: held-out validation windows for the recorded routed share (default: 16)'),
    'sparse_bk_timing_repeats': ('int',
        'use_sparse_bk: eval forwards timed with and without routing for the record (default: 3)'),
    'curriculum_score': ('str',
        "use_curriculum: difficulty score: mean NLL of a window's targets under an add-one-smoothed 'unigram' or 'bigram' model fitted on the training split (default: 'bigram')"),
    'curriculum_initial_competence': ('float',
        'use_curriculum: c0: the fraction of easiest windows sampled at step 0, in (0, 1] (default: 0.01)'),
    'curriculum_full_at': ('float',
        "use_curriculum: T as a fraction of the run's total steps: competence reaches 1 there, in (0, 1] (default: 0.5)"),
    'curriculum_target_perplexity': ('float',
        'use_curriculum: validation perplexity for the time-to-target record when no baseline run is compared (0: none) (default: 0.0)'),
    'active_learning_fraction': ('float',
        'use_active_learning: share of the candidate windows that is trained on, in (0, 1] (default: 0.75)'),
    'active_learning_random_share': ('float',
        'use_active_learning: share of the selected windows drawn at random from the rest of the pool instead of by top loss, in [0, 1) (default: 0.1)'),
    'active_learning_every': ('int',
        'use_active_learning: steps per selection round (k): one pool is ranked for k batches (default: 1)'),
    'active_learning_target_perplexity': ('float',
        'use_active_learning: validation perplexity for the time-to-target record when no baseline run is compared (0: none) (default: 0.0)'),
}
# generated: end


def from_registry() -> tuple[dict[str, str], dict[str, tuple[str, str]]]:
    """(flag field -> help, flat setting name -> (type name, help)) from the registry."""
    from .flags import registry

    flags = {name: f"{spec.summary} ({', '.join(spec.architectures)})"
             for name, spec in registry.REGISTRY.items()}
    settings = {}
    for name, (spec, f) in registry.settings_fields().items():
        kind = registry.setting_type(spec.settings, f.name)
        settings[name] = (kind.__name__, f"{spec.name}: {f.metadata.get('help', f.name)} "
                                         f"(default: {f.default!r})")
    return flags, settings


def _source(flags: dict[str, str], settings: dict[str, tuple[str, str]]) -> str:
    lines = ["FLAG_HELP = {"]
    lines += [f"    {k!r}:\n        {v!r}," for k, v in flags.items()]
    lines += ["}", "SETTINGS = {"]
    lines += [f"    {k!r}: ({t!r},\n        {h!r})," for k, (t, h) in settings.items()]
    lines.append("}")
    return "\n".join(lines)


def regenerated(text: str) -> str:
    """This file's ``text`` with the generated block rebuilt from the registry."""
    head, rest = text.split("# generated: begin\n", 1)
    _, tail = rest.split("# generated: end\n", 1)
    return f"{head}# generated: begin\n{_source(*from_registry())}\n# generated: end\n{tail}"


if __name__ == "__main__":
    from pathlib import Path

    path = Path(__file__)
    path.write_text(regenerated(path.read_text()))
