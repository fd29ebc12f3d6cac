"""The figures of a run, as PNG bytes. Drawing only: callers read the run's files.

matplotlib is imported inside the functions (on the Agg backend, no display
needed): importing this module costs nothing, and a run that never draws does
not need matplotlib loaded.
"""

import io
import math


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def png(fig) -> bytes:
    """The figure as PNG bytes; the figure is closed."""
    plt = pyplot()
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()


# Minor ticks of a log axis that carry a label: 2x and 5x each power of ten. Labelling
# every minor tick puts 90 next to 100 (and 9 next to 10), where the labels overlap.
LABELLED_MINOR_MANTISSAS = (2, 5)


def minor_tick_label(value: float) -> str:
    """The label of a log axis' minor tick at `value`: '' unless its mantissa is 2 or 5."""
    if value <= 0:
        return ""
    mantissa = value / 10 ** math.floor(math.log10(value) + 1e-9)
    if any(abs(mantissa - m) < 1e-6 for m in LABELLED_MINOR_MANTISSAS):
        return f"{value:g}"
    return ""


def _log_ticks(axis) -> None:
    """Log scale with plain numbers: every power of ten, and 2x and 5x of each."""
    import matplotlib.ticker

    if axis.axis_name == "x":
        axis.axes.set_xscale("log")
    else:
        axis.axes.set_yscale("log")
    axis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    axis.set_minor_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: minor_tick_label(v)))
    axis.axes.tick_params(axis=axis.axis_name, which="minor", labelsize=7)


def accuracy_vs_density(results: dict, layer_densities: dict) -> bytes:
    """Test accuracy against density per branch (left) and per-layer densities (right).

    Args:
      results: {branch: {round: summary}} (lth_tf.rundir.finished_rounds).
      layer_densities: {round: {layer: density}} of the IMP rounds, in round order.

    Returns:
      The figure as PNG bytes.
    """
    plt = pyplot()
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for branch, rounds in results.items():
        pts = sorted((s["density"], s["test_accuracy"]) for s in rounds.values())
        ax.plot([100 * d for d, _ in pts], [100 * a for _, a in pts], "o-", label=branch)
    dense = results.get("imp", {}).get(0)
    if dense:
        ax.axhline(100 * dense["test_accuracy"], color="gray", ls="--", label="dense")
    _log_ticks(ax.xaxis)
    ax.invert_xaxis()
    ax.set_xlabel("weights remaining (%)")
    ax.set_ylabel("test accuracy (%)")
    ax.legend()
    ax.grid(alpha=0.3)
    for r, layers in layer_densities.items():
        ax2.plot(range(len(layers)), [100 * d for d in layers.values()], "o-", label=f"r{r}")
        ax2.set_xticks(range(len(layers)), list(layers), rotation=60, ha="right", fontsize=7)
    _log_ticks(ax2.yaxis)
    ax2.legend(fontsize=7, ncol=2)
    ax2.set_ylabel("layer density (%)")
    ax2.grid(alpha=0.3)
    return png(fig)


def _density_axis(ax):
    """Log-scale density, densest on the left (the papers' figures)."""
    _log_ticks(ax.xaxis)
    ax.invert_xaxis()
    ax.set_xlabel("weights remaining (%)")
    ax.grid(alpha=0.3)


# (metric, y label, scale) of the three panels against density.
_PANELS = (
    ("test_accuracy", "final test accuracy (%)", 100),
    ("test_accuracy_at_early_stopping", "test accuracy at early stopping (%)", 100),
    ("early_stopping_step", "early-stopping iteration", 1),
)


def accuracy_bands(series: list, dense: list, layer_densities: dict | None = None) -> bytes:
    """Accuracies and the early-stopping iteration against density, with min/max bands.

    Panels: final test accuracy; test accuracy at the early-stopping iteration;
    the early-stopping iteration (minimum validation loss; the 2019 paper's
    Figures 3-4); per-layer densities when given, else the legend. Each series is
    a line through its means with a band from min to max where replicates exist;
    the dense network is a horizontal line.

    Args:
      series: [{"label", "run" (index), "branch", "points": [point]}], a point as built by
        lth_tf.reporting.aggregate: {"density", metric: {"mean", "min", "max", "n"}}.
      dense: [{"label", "run", "point"}]: the dense network of each run.
      layer_densities: {round: {layer: density}} of one run's IMP rounds, or None.

    Returns:
      The figure as PNG bytes.
    """
    plt = pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    panels = axes.ravel()
    looks = series_looks(series)
    colors = {s["run"]: look[0] for s, look in reversed(list(zip(series, looks, strict=True)))}
    for ax, (metric, ylabel, scale) in zip(panels, _PANELS, strict=False):
        drawn = False
        for s, look in zip(series, looks, strict=True):
            drawn |= _series_with_band(ax, s, metric, scale, *look)
        _dense_lines(ax, dense, metric, scale, colors)
        if drawn:
            _density_axis(ax)
        else:
            _not_recorded(ax)
        ax.set_ylabel(ylabel)
    handles, labels = panels[0].get_legend_handles_labels()
    last = panels[3]
    if layer_densities:
        panels[0].legend(fontsize=8)
        _layer_densities(last, layer_densities)
    else:
        last.axis("off")
        if handles:
            last.legend(handles, labels, loc="center", fontsize=9)
    return png(fig)


# Line style and marker per branch in a comparison (a colour per run).
_STYLES = ("o-", "s--", "^:", "v-.", "D-", "P--", "X:", "*-.")


def series_looks(series: list) -> list:
    """(colour, style) of each series: every series of a figure is told apart.

    One run: a colour per series, all "o-". Several runs: a colour per run and a line
    style and marker per branch, so a run's IMP and its controls differ by style and
    the same branch of two runs by colour.
    """
    runs = sorted({s["run"] for s in series})
    if len(runs) <= 1:
        return [(f"C{i % 10}", "o-") for i in range(len(series))]
    branches = list(dict.fromkeys(s.get("branch", s["label"]) for s in series))
    return [
        (
            f"C{runs.index(s['run']) % 10}",
            _STYLES[branches.index(s.get("branch", s["label"])) % len(_STYLES)],
        )
        for s in series
    ]


def _series_with_band(ax, s, metric, scale, color, style) -> bool:
    """One series' means against density, min/max error bars and band; False if no point."""
    pts = sorted((p for p in s["points"] if p[metric]["n"]), key=lambda p: -p["density"])
    if not pts:
        return False
    x = [100 * p["density"] for p in pts]
    ax.plot(x, [scale * p[metric]["mean"] for p in pts], style, color=color, label=s["label"], ms=4)
    spread = [p for p in pts if p[metric]["n"] > 1]
    if spread:
        # Error bars show min/max at every point (also a lone one); the band joins them.
        ax.errorbar(
            [100 * p["density"] for p in spread],
            [scale * p[metric]["mean"] for p in spread],
            yerr=[
                [scale * (p[metric]["mean"] - p[metric]["min"]) for p in spread],
                [scale * (p[metric]["max"] - p[metric]["mean"]) for p in spread],
            ],
            fmt="none",
            ecolor=color,
            capsize=3,
            lw=1,
        )
        ax.fill_between(
            x,
            [scale * p[metric]["min"] for p in pts],
            [scale * p[metric]["max"] for p in pts],
            color=color,
            alpha=0.15,
            lw=0,
        )
    return True


def _dense_lines(ax, dense, metric, scale, colors) -> None:
    """The dense network of each run as a horizontal line (one run: with dense - 0.2)."""
    for d in dense:
        mean = d["point"][metric]["mean"]
        if mean is None:
            continue
        color = "gray" if len(dense) == 1 else colors.get(d["run"], "gray")
        ax.axhline(scale * mean, color=color, ls="-.", lw=1, label=d["label"])
        if len(dense) == 1 and scale == 100:
            ax.axhline(
                scale * mean - 0.2, color="gray", ls=":", lw=1, label="dense - 0.2 (matching)"
            )


def _not_recorded(ax) -> None:
    ax.text(
        0.5,
        0.5,
        "not recorded\n(run with --test_every_period)",
        ha="center",
        va="center",
        transform=ax.transAxes,
        color="gray",
    )
    ax.set_xticks([])
    ax.set_yticks([])


def _layer_densities(ax, layer_densities: dict) -> None:
    """Per-layer density (log scale) of each IMP round."""
    for r, layers in layer_densities.items():
        ax.plot(range(len(layers)), [100 * d for d in layers.values()], "o-", label=f"r{r}")
        ax.set_xticks(range(len(layers)), list(layers), rotation=60, ha="right", fontsize=7)
    _log_ticks(ax.yaxis)
    ax.legend(fontsize=7, ncol=2)
    ax.set_ylabel("layer density (%)")
    ax.grid(alpha=0.3)


def interpolation_path(result: dict) -> bytes:
    """Test and train error along the linear path between two copies (one point's result)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for rep in result["repeats"]:
        ax.plot(rep["alpha"], [100 * e for e in rep["test_error"]], "C0-", alpha=0.8)
        ax.plot(rep["alpha"], [100 * e for e in rep["train_error"]], "C1--", alpha=0.8)
    ax.plot([], [], "C0-", label="test")
    ax.plot([], [], "C1--", label="train")
    ax.set_xlabel("alpha (W = alpha W1 + (1 - alpha) W2)")
    ax.set_ylabel("error (%)")
    ax.set_title(
        f"round {result['round']}, k = {result['rewind_step']}: "
        f"barrier {100 * result['test_barrier_mean']:.2f}%"
    )
    ax.legend()
    ax.grid(alpha=0.3)
    return png(fig)


def barrier_vs_k(results: list, stable_barrier: float) -> bytes:
    """Instability and accuracy against the rewind step k (the papers' figures).

    Args:
      results: the points of a sweep, in k order (interpolation.json contents).
      stable_barrier: the barrier under which a point counts as stable (a line).
    """
    plt = pyplot()
    fig, (ax, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.5))
    ks = [r["rewind_step"] for r in results]
    linthresh = max(1, min([k for k in ks if k > 0], default=1))
    ax_acc.errorbar(
        ks,
        [100 * r.get("test_accuracy_mean", float("nan")) for r in results],
        yerr=[100 * (r.get("test_accuracy_std") or 0.0) for r in results],
        fmt="o-",
    )
    ax_acc.set_xlabel("rewind step k")
    ax_acc.set_ylabel("test accuracy of the trained copies (%)")
    ax_acc.set_xscale("symlog", linthresh=linthresh)
    ax_acc.grid(alpha=0.3)
    ax.errorbar(
        ks,
        [100 * r["test_barrier_mean"] for r in results],
        yerr=[100 * (r["test_barrier_std"] or 0.0) for r in results],  # None: one repeat
        fmt="o-",
        label="test",
    )
    ax.errorbar(
        ks,
        [100 * r["train_barrier_mean"] for r in results],
        yerr=[100 * (r["train_barrier_std"] or 0.0) for r in results],
        fmt="s--",
        label="train",
    )
    ax.axhline(
        100 * stable_barrier, color="gray", ls=":", label=f"{100 * stable_barrier:g}% (stable)"
    )
    ax.set_xlabel("rewind step k")
    ax.set_ylabel("instability: error barrier (%)")
    ax.set_xscale("symlog", linthresh=linthresh)
    ax.legend()
    ax.grid(alpha=0.3)
    return png(fig)
