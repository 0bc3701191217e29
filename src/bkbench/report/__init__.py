"""The benchmark report, rebuilt from the JSON files of a results folder alone.

``build_report(results_dir)`` reads every ``*_results.json`` (and ``scale.json``,
``ablation.json`` when present, each validated first: :mod:`.inputs`) and writes the seed's
comparisons, ``training_curves.png``, ``flops_breakdown.png``, ``report.md`` and a
self-contained ``report.html`` (the images embedded) into the same folder.

The parts: :mod:`.inputs` (reading and validating the files), :mod:`.claims` (the claims
audit), :mod:`.tables` and :mod:`.targets` (the sections), :mod:`.plots` (the figures),
:mod:`.html` (the document model, rendered to Markdown and HTML) and :mod:`.document` (the
report in reading order, ``build_report`` and ``report_main``).
"""

from .claims import Claim, audit_claims, format_claims, recipe_differences
from .common import LONG_SEQUENCE_N, ReportError
from .document import build_doc, build_report, like_for_like, report_main
from .inputs import load_ablation_table, load_results_dir, load_scale_sweep
from .plots import plot_flops_breakdown, plot_training_curves, training_flops_stack
from .targets import time_to_target_rows

__all__ = ["Claim", "audit_claims", "build_report", "report_main", "format_claims",
           "LONG_SEQUENCE_N", "load_results_dir", "load_scale_sweep", "load_ablation_table",
           "ReportError", "like_for_like", "recipe_differences", "build_doc",
           "plot_training_curves", "plot_flops_breakdown", "training_flops_stack",
           "time_to_target_rows"]
