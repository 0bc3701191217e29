"""Cost measurements of a run: FLOPs (counted and by formula) and peak memory."""

from .flops import (FlopReport, analytic_flops_for, analytic_resnet_bk_flops,
                    analytic_transformer_flops, flops_result_fields, measure_forward_flops,
                    measure_step_flops, new_counter, optimizer_flops, plain_objective)
from .memory import PeakMemory, peak_rss_bytes, reset_peak_rss, rss_bytes

__all__ = ["FlopReport", "measure_step_flops", "measure_forward_flops", "optimizer_flops",
           "analytic_transformer_flops", "analytic_resnet_bk_flops", "analytic_flops_for",
           "flops_result_fields", "new_counter", "plain_objective", "PeakMemory", "rss_bytes",
           "peak_rss_bytes", "reset_peak_rss"]
