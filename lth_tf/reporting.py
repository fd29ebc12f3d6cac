"""The one reader and formatter of a run's JSON: tables, report.md and its plot.

Reads what the rounds, `lth_tf.stability` and `lth_tf.export` wrote (their
summary.json, sparsity.json, interpolation.json and export.json) and formats
it as Markdown. It never imports the training stack (models, rounds, train,
sparsity): a report is written, and tested, without building a model.
`python -m lth_tf.report` is its command line.
"""

import json

from lth_tf import files, paths, plots, rundir
from lth_tf.keras import tf


def _pct(x):
    return "" if x is None else f"{100 * x:.2f}"


def _round_names(directory: str) -> list:
    """The round_NN entries of a directory, sorted; [] when it does not exist."""
    if not tf.io.gfile.isdir(directory):
        return []
    names = (name.rstrip("/") for name in tf.io.gfile.listdir(directory))
    return sorted(name for name in names if paths.ROUND_RE.match(name))


# ---- readers -------------------------------------------------------------------------------


def layer_densities(run_dir: str, rounds) -> dict:
    """{round: sparsity.json} of the given IMP rounds that have one, in round order."""
    out = {}
    for r in sorted(rounds):
        path = paths.sparsity_file(paths.round_dir(run_dir, r))
        if files.exists(path):
            out[r] = files.read_json(path)
    return out


def stability_points(run_dir: str) -> list:
    """Every interpolation.json of `python -m lth_tf.stability`, by round then rewind step."""
    root = paths.join(run_dir, "stability")
    points = []
    for rname in _round_names(root):
        for kname in sorted(tf.io.gfile.listdir(paths.join(root, rname))):
            path = paths.join(root, rname, kname.rstrip("/"), "interpolation.json")
            if files.exists(path):
                points.append(files.read_json(path))
    return points


def export_reports(run_dir: str) -> list:
    """Every export.json of `python -m lth_tf.export`, by round."""
    reports = []
    for name in _round_names(paths.join(run_dir, "export")):
        path = paths.export_report_file(run_dir, int(paths.ROUND_RE.match(name).group(1)))
        if files.exists(path):
            reports.append(files.read_json(path))
    return reports


# ---- tables ----------------------------------------------------------------------------------


def accuracy_table(results: dict) -> str:
    """The accuracy-vs-density table, as Markdown.

    Args:
      results: {branch: {round: summary}} (lth_tf.rundir.finished_rounds). One
        row per finished IMP round; a control's cell is empty where that round
        of the control is not finished.
    """
    branches = [b for b in results if b != rundir.IMP]
    header = [
        "round",
        "density %",
        "IMP test acc %",
        "best val acc % (step)",
        "early-stop step",
    ] + [f"{b} test acc %" for b in branches]
    rows = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r, s in sorted(results.get(rundir.IMP, {}).items()):
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
    """Per-layer density (%) of every finished IMP round, as Markdown ('' if none)."""
    reports = layer_densities(run_dir, results.get(rundir.IMP, {}))
    if not reports:
        return ""
    first = next(iter(reports.values()))["layers"]
    rows = [
        "| layer | size | " + " | ".join(f"r{r}" for r in reports) + " |",
        "|---|---|" + "---|" * len(reports),
    ]
    for layer in first:
        cells = [f"{100 * rep['layers'][layer]['density']:.1f}" for rep in reports.values()]
        rows.append(f"| {layer} | {first[layer]['size']} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def stability_table(run_dir: str) -> str:
    """Markdown table of every stability point of a run ('' if none)."""
    rows = [
        "| round | density % | k | test barrier % | train barrier % | stable | "
        "copies' test acc % | data-order dist. | pruning dist. | BN |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in stability_points(run_dir):
        rows.append(
            f"| {p['round']} | {100 * p['density']:.2f} | {p['rewind_step']} | "
            f"{100 * p['test_barrier_mean']:.2f} ± {100 * p['test_barrier_std']:.2f} | "
            f"{100 * p['train_barrier_mean']:.2f} ± {100 * p['train_barrier_std']:.2f} | "
            f"{'yes' if p['stable'] else 'no'} | "
            f"{100 * p.get('test_accuracy_mean', float('nan')):.2f} | "
            f"{p['data_order_distance_mean']:.3f} | "
            f"{p.get('pruning_distance', float('nan')):.3f} | {p['batchnorm']} |"
        )
    return "\n".join(rows) if len(rows) > 2 else ""


def export_table(run_dir: str) -> str:
    """One line per exported round (python -m lth_tf.export), as Markdown ('' if none)."""
    reports = export_reports(run_dir)
    # TFLite columns only when some export wrote TFLite files (--tflite).
    tflite = any("tflite" in e for e in reports)
    rows = [
        "| round | density % (all kernels) | exported test acc % | recorded % | dense zip B | "
        "sparse zip B | zip ratio |"
        + (
            " dense TFLite B | sparse TFLite B | TFLite ratio | sparse int8 TFLite B |"
            if tflite
            else ""
        ),
        "|---|---|---|---|---|---|---|" + ("---|---|---|---|" if tflite else ""),
    ]
    for e in reports:
        row = (
            f"| {e['round']} | {100 * e['density_all_kernels']:.2f} | "
            f"{_pct(e['exported_test_accuracy'])} | {_pct(e['recorded_test_accuracy'])} | "
            f"{e['dense']['zip_bytes']:,} | {e['sparse']['zip_bytes']:,} | "
            f"{e['zip_ratio_sparse_over_dense']:.3f} |"
        )
        if tflite:
            t = e.get("tflite", {})
            row += (
                f" {t['dense']['bytes']:,} | {t['sparse']['bytes']:,} | "
                f"{t['sparse']['size_ratio_vs_dense']:.3f} |"
                if "sparse" in t
                else " - | - | - |"
            )
            row += f" {t['sparse_int8']['bytes']:,} |" if "sparse_int8" in t else " - |"
        rows.append(row)
    return "\n".join(rows) if len(rows) > 2 else ""


# ---- the report ------------------------------------------------------------------------------


def plot(run_dir: str, results: dict) -> bytes:
    """PNG: test accuracy against density per branch, and per-layer densities."""
    reports = layer_densities(run_dir, results.get(rundir.IMP, {}))
    layers = {
        r: {name: v["density"] for name, v in rep["layers"].items()} for r, rep in reports.items()
    }
    return plots.accuracy_vs_density(results, layers)


def write_report(run_dir: str, extra_sections=()) -> str:
    """Writes report.md and accuracy_vs_density.png into a run; returns the accuracy table.

    Args:
      run_dir: an lth_tf run directory.
      extra_sections: Markdown strings appended before the config section.

    Raises:
      RunDirError: run_dir is not a run (no config.json).
    """
    config = rundir.config_json(run_dir)
    results = rundir.finished_rounds(run_dir)
    text = accuracy_table(results)
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
    stable = stability_table(run_dir)
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
    parts += ["## Config\n", "```json", json.dumps(config, indent=2, sort_keys=True), "```", ""]
    files.write_text(paths.report_file(run_dir), "\n".join(parts))
    if results:
        files.write_bytes(paths.plot_file(run_dir), plot(run_dir, results))
    return text
