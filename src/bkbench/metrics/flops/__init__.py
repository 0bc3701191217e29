"""FLOPs of one real training step, measured with torch's FlopCounterMode.

The parts: :mod:`.counter` (the counter with bkbench's formulas, and the census of what it
does not count), :mod:`.attribution` (counts by component and by source), :mod:`.optimizer`
and :mod:`.analytic` (formulas), :mod:`.measure` (the step and evaluation measurements).

What is counted
---------------
:func:`measure_step_flops` runs one training step of the model as configured (random tokens,
train mode, dropout on) through the objective that trains it -- the trainer's
``compute_loss`` where there is one (flags' loss terms and autocast included), else
:func:`plain_objective` (the fused LM head and loss of ``eval.target_nll`` plus the model's
auxiliary loss) -- and counts

* the **forward** (model + loss) and the **backward** separately, with
  ``torch.utils.flop_counter.FlopCounterMode``. The counter knows matrix products (mm, addmm,
  bmm, baddbmm, convolutions, the fused attention kernels) and any op registered with
  ``register_flop_formula`` -- the BK-Core registers its own per-position formula. This module
  adds a formula for ``aten._scaled_dot_product_flash_attention_for_cpu`` (and its backward),
  the kernel PyTorch picks on the CPU when attention dropout is off (evaluation, dropout=0),
  which torch's table does not cover; without it attention would be invisible there; and
  for torch's fused LSTM kernels (``aten.mkldnn_rnn_layer`` on the CPU, ``aten._cudnn_rnn``
  on CUDA, and their backwards: 2 x the gate matmuls). Like
  torch's own attention formulas it charges the full T x T score matrix even for causal
  attention (the math kernel really computes it; a causal flash kernel skips about half).
* the **optimizer** by formula, per parameter per step (:data:`OPTIMIZER_FLOPS_PER_PARAM`,
  :data:`WEIGHT_DECAY_FLOPS_PER_PARAM` for the parameters of the run's param groups that
  have weight decay, :data:`GRAD_CLIP_FLOPS_PER_PARAM`).

Every figure says where it comes from (``FlopReport.sources``, ``flops["sources"]`` in the
results): ``counted`` is what the counter derived from the ops that ran (matrix products from
their shapes); ``formula`` is a hand-derived count charged per element or per position --
bkbench's own registered ops (the BK-Core's per-position count on both gradient paths, the
GLA score markers), the optimizer and the estimate of what the counter does not see.

FLOPs are attributed to the model's components (``LanguageModel.COMPONENTS``: embedding,
mixer, feed_forward, lm_head) with the counter's own formulas, op by op: in the forward by the
module that runs the op; in the backward by the module whose forward created the autograd node
being run (each node is tagged when it is created). The counter's own per-module breakdown is
not used: in the backward it follows module hooks, which mis-attribute work as soon as a module
returns its input unchanged (dropout with p = 0). Whatever runs outside the model (the
cross-entropy and the auxiliary-loss sum) is the ``loss`` component, and ops of a module that
belongs to no component are ``other``. The LM head fused with the loss
(``bkbench.ops.lm_loss``, what training and evaluation run) is one op with a registered
formula: its head products are charged to ``lm_head`` -- 2·N·d·V in the forward, 4·N·d·V in
the backward, exactly what the unfused head is charged -- and the log-softmax/NLL inside it is
estimated as uncounted, as the unfused ops would be. The components add up to the counter's global total
(any difference would be put under ``other`` and noted).

What is not counted
-------------------
The counter sees no elementwise arithmetic, activations (GELU), normalisation (LayerNorm),
softmax/log-softmax (attention probabilities and the loss), dropout, reductions, bias
additions, residual additions or the embedding gather/scatter. So that nobody mistakes the
count for more than it is, a census of every aten op actually dispatched during the step is
taken alongside the counter, and each op the counter skips is charged a per-element cost by
formula (:data:`UNCOUNTED_COST`). That estimate is reported as ``uncounted`` -- beside the
count, never added to it.
"""

from .analytic import (analytic_flops_for, analytic_gla_flops, analytic_lstm_flops,
                       analytic_resnet_bk_flops, analytic_transformer_flops)
from .counter import SOURCES_EXPLANATION, UNCOUNTED_COST, UNCOUNTED_EXPLANATION, new_counter
from .measure import (FlopReport, flops_result_fields, measure_forward_flops,
                      measure_step_flops, plain_objective)
from .optimizer import (GRAD_CLIP_FLOPS_PER_PARAM, OPTIMIZER_FLOPS_PER_PARAM,
                        WEIGHT_DECAY_FLOPS_PER_PARAM, optimizer_flops)

__all__ = [
    "FlopReport",
    "measure_step_flops",
    "measure_forward_flops",
    "plain_objective",
    "new_counter",
    "optimizer_flops",
    "analytic_transformer_flops",
    "analytic_resnet_bk_flops",
    "analytic_gla_flops",
    "analytic_lstm_flops",
    "analytic_flops_for",
    "flops_result_fields",
    "OPTIMIZER_FLOPS_PER_PARAM",
    "WEIGHT_DECAY_FLOPS_PER_PARAM",
    "GRAD_CLIP_FLOPS_PER_PARAM",
    "UNCOUNTED_COST",
    "UNCOUNTED_EXPLANATION",
    "SOURCES_EXPLANATION",
]
