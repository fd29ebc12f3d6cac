"""Tables and plots of a run: `python -m lth_tf.report --run_dir=...`.

Writes report.md (accuracy-vs-density table for IMP and each control, per-layer
densities) and accuracy_vs_density.png into the run directory, and prints the
table.
"""

import io
import sys

from absl import app, flags

from lth_tf import files, flagdefs, paths
from lth_tf.keras import tf


def collect(run_dir: str) -> dict:
    """{branch: {round: summary}} of the finished rounds of a run."""
    out = {}

    def scan(directory, branch):
        if not tf.io.gfile.isdir(directory):
            return
        for name in sorted(tf.io.gfile.listdir(directory)):
            name = name.rstrip("/")
            match = paths.ROUND_RE.match(name)
            path = paths.summary_file(paths.join(directory, name))
            if match and files.exists(path):
                out.setdefault(branch, {})[int(match.group(1))] = files.read_json(path)

    scan(run_dir, "imp")
    branches = paths.join(run_dir, "branches")
    if tf.io.gfile.isdir(branches):
        for branch in sorted(tf.io.gfile.listdir(branches)):
            scan(paths.join(branches, branch.rstrip("/")), branch.rstrip("/"))
    return out


def _pct(x):
    return "" if x is None else f"{100 * x:.2f}"


def table(results: dict) -> str:
    """The accuracy-vs-density table, as Markdown."""
    branches = [b for b in results if b != "imp"]
    header = [
        "round",
        "density %",
        "IMP test acc %",
        "best val acc % (step)",
        "early-stop step",
    ] + [f"{b} test acc %" for b in branches]
    rows = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r, s in sorted(results.get("imp", {}).items()):
        cells = [
            str(r),
            f"{100 * s['density']:.2f}",
            _pct(s["test_accuracy"]),
            f"{_pct(s['best_validation_accuracy'])} ({s['best_validation_step']})",
            str(s.get("early_stopping_step")),
        ]
        cells += [_pct(results[b].get(r, {}).get("test_accuracy")) for b in branches]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def layer_table(run_dir: str, results: dict) -> str:
    rounds = sorted(results.get("imp", {}))
    reports = {}
    for r in rounds:
        path = paths.sparsity_file(paths.round_dir(run_dir, r))
        if files.exists(path):
            reports[r] = files.read_json(path)
    if not reports:
        return ""
    layers = list(next(iter(reports.values()))["layers"])
    rows = [
        "| layer | size | " + " | ".join(f"r{r}" for r in reports) + " |",
        "|---|---|" + "---|" * len(reports),
    ]
    for layer in layers:
        size = next(iter(reports.values()))["layers"][layer]["size"]
        cells = [f"{100 * rep['layers'][layer]['density']:.1f}" for rep in reports.values()]
        rows.append(f"| {layer} | {size} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def png(plt, fig) -> bytes:
    """The figure as PNG bytes (then closed)."""
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()


def plot(run_dir: str, results: dict) -> bytes:
    """PNG: test accuracy against density per branch, and per-layer densities."""
    import matplotlib.ticker

    plt = pyplot()

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for branch, rounds in results.items():
        pts = sorted((s["density"], s["test_accuracy"]) for s in rounds.values())
        ax.plot([100 * d for d, _ in pts], [100 * a for _, a in pts], "o-", label=branch)
    dense = results.get("imp", {}).get(0)
    if dense:
        ax.axhline(100 * dense["test_accuracy"], color="gray", ls="--", label="dense")
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax.tick_params(axis="x", which="minor", labelsize=7)
    ax.invert_xaxis()
    ax.set_xlabel("weights remaining (%)")
    ax.set_ylabel("test accuracy (%)")
    ax.legend()
    ax.grid(alpha=0.3)
    for r in sorted(results.get("imp", {})):
        path = paths.sparsity_file(paths.round_dir(run_dir, r))
        if files.exists(path):
            rep = files.read_json(path)["layers"]
            ax2.plot(
                range(len(rep)), [100 * v["density"] for v in rep.values()], "o-", label=f"r{r}"
            )
            ax2.set_xticks(range(len(rep)), list(rep), rotation=60, ha="right", fontsize=7)
    ax2.set_yscale("log")
    ax2.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax2.legend(fontsize=7, ncol=2)
    ax2.set_ylabel("layer density (%)")
    ax2.grid(alpha=0.3)
    return png(plt, fig)


def export_table(run_dir: str) -> str:
    """One line per exported round (python -m lth_tf.export)."""
    directory = paths.join(run_dir, "export")
    if not tf.io.gfile.isdir(directory):
        return ""
    rows = [
        "| round | density % (all kernels) | exported test acc % | recorded % | dense zip B | "
        "sparse zip B | zip ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in sorted(tf.io.gfile.listdir(directory)):
        match = paths.ROUND_RE.match(name.rstrip("/"))
        if not match:
            continue
        path = paths.export_report_file(run_dir, int(match.group(1)))
        if not files.exists(path):
            continue
        e = files.read_json(path)
        rows.append(
            f"| {e['round']} | {100 * e['density_all_kernels']:.2f} | "
            f"{_pct(e['exported_test_accuracy'])} | {_pct(e['recorded_test_accuracy'])} | "
            f"{e['dense']['zip_bytes']:,} | {e['sparse']['zip_bytes']:,} | "
            f"{e['zip_ratio_sparse_over_dense']:.3f} |"
        )
    return "\n".join(rows) if len(rows) > 2 else ""


def write_report(run_dir: str, extra_sections=()) -> str:
    """Writes report.md and the plot; returns the accuracy table."""
    if not files.exists(paths.config_file(run_dir)):
        raise FileNotFoundError(f"{run_dir} is not an lth_tf run (no config.json).")
    results = collect(run_dir)
    text = table(results)
    parts = [
        f"# lth_tf run report\n\nRun: `{run_dir}`\n",
        "## Test accuracy against density\n",
        text,
        "",
        "![accuracy vs density](accuracy_vs_density.png)",
        "",
        "## Per-layer density (%)\n",
        layer_table(run_dir, results),
        "",
    ]
    from lth_tf import stability  # late: stability imports this module

    stable = stability.table(run_dir)
    if stable:
        parts += [
            "## Stability (instability = test-error barrier on the linear path)\n",
            stable,
            "",
        ]
    exports = export_table(run_dir)
    if exports:
        parts += ["## Sparse exports (SavedModel)\n", exports, ""]
    parts.extend(extra_sections)
    config_text = files.read_json(paths.config_file(run_dir))
    parts += ["## Config\n", "```json", str(config_text), "```", ""]
    files.write_text(paths.report_file(run_dir), "\n".join(parts))
    if results:
        files.write_bytes(paths.plot_file(run_dir), plot(run_dir, results))
    return text


def main(argv):
    del argv
    try:
        print(write_report(flags.FLAGS.run_dir))
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(
        f"\nWrote {paths.report_file(flags.FLAGS.run_dir)} and {paths.plot_file(flags.FLAGS.run_dir)}"
    )


def define_flags() -> None:
    """Defines this entry point's flags (lth_tf/flagdefs.py; idempotent)."""
    flagdefs.define_report_flags()


def run():
    define_flags()
    flagdefs.declare_key_flags(flagdefs.flag_names(flagdefs.define_report_flags))
    flags.mark_flag_as_required("run_dir")
    app.run(main)


if __name__ == "__main__":
    run()
