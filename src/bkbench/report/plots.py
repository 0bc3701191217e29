"""The report's figures: training curves with total training FLOPs, and the per-step FLOPs
breakdown. Each is written atomically as a PNG."""

from __future__ import annotations

import io
from pathlib import Path

from ..atomic import write_bytes_atomic
from ..compare import as_finite
from ..results import BenchmarkResults
from .common import COMPONENT_COLORS, COMPONENT_ORDER, RUN_COLORS, is_proxy

PROXY_NOTE = "PROXY split scheme (not official WikiText-2 numbers)"


def _plt():
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    return plt


def _finish_figure(fig, path: Path, title: str, proxy_note: str | None, fontsize: int) -> Path:
    """Title (with the PROXY label when it applies), layout, atomic PNG write, close."""
    fig.suptitle(title + (f"  --  {proxy_note}" if proxy_note else ""), fontsize=fontsize,
                 fontweight="bold")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    _plt().close(fig)
    write_bytes_atomic(path, buf.getvalue())
    return path


def training_flops_stack(r: BenchmarkResults) -> dict[str, float] | None:
    """The run's training FLOPs by component, adding up to ``total_flops`` (the Results
    table's figure): the steps' components, the data-selection passes, and any remainder the
    record does not split as ``unattributed``."""
    total = as_finite(r.total_flops)
    by = ((r.flops or {}).get("training") or {}).get("by_component")
    stack = ({k: float(v) for k, v in by.items() if as_finite(v)} if isinstance(by, dict)
             else {})
    selection = as_finite(((r.flops or {}).get("selection") or {}).get("total"))
    if selection:
        stack["selection"] = selection
    if total is not None and total - sum(stack.values()) > 0:
        stack["unattributed"] = total - sum(stack.values())
    return stack or None


def _step_by_component(r: BenchmarkResults) -> dict[str, dict[str, float]] | None:
    flops = r.flops or {}
    fwd, bwd = flops.get("forward_by_component"), flops.get("backward_by_component")
    if not isinstance(fwd, dict) or not isinstance(bwd, dict) or not fwd or not bwd:
        return None
    opt = flops.get("optimizer_by_component") or {}
    return {"forward": {k: float(v) for k, v in fwd.items()},
            "backward": {k: float(v) for k, v in bwd.items()},
            "optimizer": {k: float(v) for k, v in opt.items()}
            if opt else {"optimizer": float(as_finite(r.optimizer_flops) or 0)}}


def _epoch_curve(ax, values: list[float], color: str, name: str) -> None:
    """One run's per-epoch values; a run of one epoch is one labelled point, not a line."""
    xs = range(1, len(values) + 1)
    if len(values) == 1:
        ax.plot(xs, values, color=color, marker="D", markersize=9, linestyle="none",
                label=f"{name} (1 epoch)")
        ax.annotate(f"{values[0]:.3g}", (1, values[0]), textcoords="offset points",
                    xytext=(8, 0), va="center", fontsize=8, color=color)
    else:
        ax.plot(xs, values, color=color, marker="o", label=name, linewidth=2)


def _curves(axes, results: dict[str, BenchmarkResults]) -> None:
    ax_loss, ax_ppl, ax_time = axes
    colors = {n: RUN_COLORS[i % len(RUN_COLORS)] for i, n in enumerate(results)}
    for n, r in results.items():
        for ax, values in ((ax_loss, r.epoch_losses), (ax_ppl, r.epoch_perplexities),
                           (ax_time, r.epoch_times)):
            if values:
                _epoch_curve(ax, values, colors[n], n)
    single = max((len(r.epoch_losses or []) for r in results.values()), default=0) <= 1
    note = "\n(one epoch: one point per run)" if single else ""
    ax_loss.set(title="Training loss per epoch (cross-entropy, dropout on)" + note,
                xlabel="epoch", ylabel="loss (nats / token)")
    ax_ppl.set(title="Validation perplexity per epoch (held-out, eval mode)" + note,
               xlabel="epoch", ylabel="perplexity (log scale)")
    ax_ppl.set_yscale("log")
    ax_time.set(title="Training time per epoch" + note, xlabel="epoch", ylabel="seconds")
    # a time axis that starts at 0 shows differences at their size; headroom for the markers
    ax_time.set_ylim(0, ax_time.get_ylim()[1] * 1.08)
    for ax in axes:
        ax.grid(True, alpha=0.3, which="both")
        if ax.get_lines():
            ax.legend(fontsize=9)
        ax.xaxis.get_major_locator().set_params(integer=True)
        if single:
            ax.set_xlim(0.5, 1.5)
            ax.set_xticks([1])


def _training_flops_bars(ax, results: dict[str, BenchmarkResults]) -> None:
    stacks = {n: s for n, r in results.items() if (s := training_flops_stack(r))}
    ax.set(title="Total training FLOPs (counted + formula; steps x per-step + selection)",
           ylabel="FLOPs")
    ax.grid(True, axis="y", alpha=0.3)
    if not stacks:
        ax.text(0.5, 0.5, "FLOPs not measured", ha="center", va="center",
                transform=ax.transAxes)
        return
    keys = [k for k in (*COMPONENT_ORDER, "selection", "unattributed")
            if any(k in s for s in stacks.values())]
    keys += sorted({k for s in stacks.values() for k in s} - set(keys))
    x = list(range(len(stacks)))
    bottom = [0.0] * len(stacks)
    for k in keys:
        vals = [stacks[n].get(k, 0.0) for n in stacks]
        if not any(vals):
            continue
        ax.bar(x, vals, bottom=bottom, label=k.replace("_", " "),
               color=COMPONENT_COLORS.get(k, None), edgecolor="white")
        bottom = [b + v for b, v in zip(bottom, vals)]
    for xi, total in zip(x, bottom):
        ax.annotate(f"{total:.3e}", (xi, total), ha="center", va="bottom", fontsize=9)
    ax.set_xticks(x, list(stacks), rotation=10)
    ax.legend(fontsize=8, title="component", title_fontsize=8)
    ax.set_ylim(0, max(bottom) * 1.12)


def plot_training_curves(results: dict[str, BenchmarkResults], path: Path) -> Path:
    plt = _plt()
    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    (ax_loss, ax_ppl), (ax_time, ax_flops) = axes
    _curves((ax_loss, ax_ppl, ax_time), results)
    _training_flops_bars(ax_flops, results)
    return _finish_figure(fig, path, "WikiText-2 training curves",
                          PROXY_NOTE if is_proxy(results) else None, fontsize=14)


def _step_bars(ax, steps: dict[str, dict[str, dict[str, float]]], keys: list[str]) -> None:
    labels, stacks, x = [], [], []
    for i, s in enumerate(steps.values()):
        for j, phase in enumerate(("forward", "backward", "optimizer")):
            labels.append(phase)
            stacks.append(s[phase])
            x.append(4 * i + j)
    bottom = [0.0] * len(labels)
    for k in keys:
        vals = [st.get(k, 0.0) for st in stacks]
        if not any(vals):
            continue
        ax.bar(x, vals, bottom=bottom, color=COMPONENT_COLORS.get(k),
               label=k.replace("_", " "), edgecolor="white")
        bottom = [b + v for b, v in zip(bottom, vals)]
    for xi, total in zip(x, bottom):
        ax.annotate(f"{total:.2e}", (xi, total), ha="center", va="bottom", fontsize=7)
    ax.set_xticks(x, labels, fontsize=8, rotation=30)
    from matplotlib.transforms import blended_transform_factory
    trans = blended_transform_factory(ax.transData, ax.transAxes)
    for i, n in enumerate(steps):
        ax.text(4 * i + 1, -0.2, n, transform=trans, ha="center", va="top",
                fontsize=9, fontweight="bold")
    ax.set(title="FLOPs per training step, by phase and component (counted)",
           ylabel="FLOPs / step")
    ax.set_ylim(0, max(bottom) * 1.12 if max(bottom) else 1)
    ax.legend(fontsize=8)
    ax.grid(True, axis="y", alpha=0.3)


def _share_bars(ax, steps: dict[str, dict[str, dict[str, float]]], keys: list[str],
                results: dict[str, BenchmarkResults]) -> None:
    names = list(steps)
    totals = {n: {k: sum(p.get(k, 0.0) for p in steps[n].values()) for k in keys}
              for n in names}
    left = [0.0] * len(names)
    for k in keys:
        shares = [100 * totals[n][k] / (sum(totals[n].values()) or 1) for n in names]
        if not any(shares):
            continue
        ax.barh(names, shares, left=left, color=COMPONENT_COLORS.get(k),
                label=k.replace("_", " "), edgecolor="white")
        for yi, (l, s) in enumerate(zip(left, shares)):
            if s >= 6:
                ax.text(l + s / 2, yi, f"{s:.0f}%", ha="center", va="center",
                        fontsize=8, color="white", fontweight="bold")
        left = [l + s for l, s in zip(left, shares)]
    ax.set(title="Share of each step's counted FLOPs", xlabel="% of FLOPs / step", xlim=(0, 100))
    ax.invert_yaxis()
    notes = []
    for n in names:
        unc = ((results[n].flops or {}).get("uncounted") or {}).get("fraction_of_counted")
        if as_finite(unc) is not None:
            notes.append(f"{n}: ~{100 * unc:.1f}%")
    if notes:
        ax.text(0, -0.2, "Not counted (elementwise, softmax, norms; estimate,\n"
                "% of counted): " + "\n".join(notes), transform=ax.transAxes,
                fontsize=8, va="top")


def plot_flops_breakdown(results: dict[str, BenchmarkResults], path: Path) -> Path:
    plt = _plt()
    steps = {n: s for n, r in results.items() if (s := _step_by_component(r))}
    fig, (ax_abs, ax_share) = plt.subplots(1, 2, figsize=(14, 5.5),
                                           gridspec_kw={"width_ratios": [3, 2]})
    if not steps:
        for ax in (ax_abs, ax_share):
            ax.text(0.5, 0.5, "FLOPs not measured", ha="center", va="center",
                    transform=ax.transAxes)
    else:
        keys = [k for k in COMPONENT_ORDER
                if any(k in p for s in steps.values() for p in s.values())]
        _step_bars(ax_abs, steps, keys)
        _share_bars(ax_share, steps, keys, results)
    return _finish_figure(fig, path, "FLOPs breakdown",
                          "PROXY split scheme" if is_proxy(results) else None, fontsize=13)
