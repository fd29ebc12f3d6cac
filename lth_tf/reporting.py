"""The one reader and formatter of a run's JSON: tables, report.md and its plot.

Reads what the rounds, `lth_tf.stability` and `lth_tf.export` wrote (their
summary.json, sparsity.json, interpolation.json and export.json) and formats
it as Markdown and JSON: the report of one run, of a replicate group (mean,
std and min/max over the replicates, lth_tf.rundir.replicate_dirs) and the
comparison of several runs or groups on one table and one figure. It never
imports the training stack (models, rounds, train, sparsity): a report is
written, and tested, without building a model.
`python -m lth_tf.report` is its command line.
"""

import hashlib
import json
import os
import re
import statistics

from lth_tf import files, paths, plots, rundir
from lth_tf.config import NON_IDENTITY_FIELDS
from lth_tf.keras import tf

# The per-round numbers aggregated over replicates, in the order of the table's columns.
METRICS = (
    "test_accuracy",
    "test_accuracy_at_early_stopping",
    "early_stopping_step",
    "best_validation_accuracy",
    "best_validation_step",
)
ACCURACY_METRICS = METRICS[:2]  # those that can be "matching"
STD = "sample standard deviation (ddof=1); null where fewer than 2 replicates finished"
MATCHING = (
    "mean accuracy at least the dense network's mean (IMP round 0 of the same run or group) "
    "minus 0.2 points, compared column by column"
)


# One-shot branches of lth_tf.branch, one per density: oneshot_<k>it_d<density reached, %>.
# The plot shows those of one k as one series, by density (the accuracy table: a row each).
ONESHOT_RE = re.compile(r"^(oneshot_\d+it)_d\d+(\.\d+)?$")


def series_of(branch: str) -> str:
    """The series a branch is shown in: itself, or oneshot_<k>it_d* for a one-shot branch."""
    m = ONESHOT_RE.match(branch)
    return f"{m.group(1)}_d*" if m else branch


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
    """Every interpolation.json of `python -m lth_tf.stability`, by round then rewind step.

    The run's IMP subnetworks (stability/round_NN) first, then each other series
    (stability/<series>/round_NN: a branch's masks or a control), by name.
    """
    root = paths.join(run_dir, "stability")
    series = [root]
    if tf.io.gfile.isdir(root):
        names = sorted(n.rstrip("/") for n in tf.io.gfile.listdir(root))
        series += [
            paths.join(root, n)
            for n in names
            if not paths.ROUND_RE.match(n) and _round_names(paths.join(root, n))
        ]
    points = []
    for directory in series:
        for rname in _round_names(directory):
            for kname in sorted(tf.io.gfile.listdir(paths.join(directory, rname))):
                path = paths.interpolation_file(paths.join(directory, rname, kname.rstrip("/")))
                if files.exists(path):
                    points.append(files.read_json(path))
    return points


def _subnetwork_label(point: dict) -> str:
    sub, branch = point.get("subnetwork", "imp"), point.get("branch")
    label = sub if branch is None else branch if sub == "imp" else f"{branch} / {sub}"
    if point.get("shared_mask"):  # another k's mask (lth_tf.stability --shared_mask)
        label += f" (mask found with k={point['mask_rewind_step']})"
    return label


def export_reports(run_dir: str) -> list:
    """Every export.json of `python -m lth_tf.export`, by round."""
    reports = []
    for name in _round_names(paths.join(run_dir, "export")):
        path = paths.export_report_file(run_dir, int(paths.ROUND_RE.match(name).group(1)))
        if files.exists(path):
            reports.append(files.read_json(path))
    return reports


# ---- tables ----------------------------------------------------------------------------------


def _same_density(summary, imp_summary) -> dict:
    """summary, or {} where it is missing or its density is not the IMP round's (within 0.1%).

    Summaries or aggregate() points alike: only their "density" is read.
    """
    if not summary or abs(summary["density"] - imp_summary["density"]) > 1e-3 * max(
        imp_summary["density"], 1e-12
    ):
        return {}
    return summary


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


def _is_oneshot(run_dir: str, branch: str) -> bool:
    path = paths.branch_file(run_dir, branch)
    return files.exists(path) and files.read_json(path).get("kind") == "oneshot"


def oneshot_table(run_dir: str, results: dict) -> str:
    """Per-layer density (%) of every finished one-shot round, as Markdown ('' if none).

    One column per one-shot branch (oneshot_<k>it_d<D>: one round; branches named
    oneshot_<k>it from before: one column per round), densest first, with IMP's
    rounds it matches (branch.json) and the test accuracy of it and of the IMP
    round at its density, to set beside the IMP rounds' per-layer table.
    """
    columns = []
    for b in results:
        if b == rundir.IMP or not (ONESHOT_RE.match(b) or _is_oneshot(run_dir, b)):
            continue
        path = paths.branch_file(run_dir, b)
        described = files.read_json(path) if files.exists(path) else {}
        for r, summary in results[b].items():
            path = paths.sparsity_file(paths.round_dir(run_dir, r, b))
            if files.exists(path):
                label = b if ONESHOT_RE.match(b) else f"{b} r{r}"
                columns.append((label, summary, files.read_json(path), described))
    if not columns:
        return ""
    columns.sort(key=lambda c: -c[1]["density"])
    layers = columns[0][2]["layers"]
    imp = results.get(rundir.IMP, {})

    def imp_at(summary):
        found = [(r, s) for r, s in sorted(imp.items()) if _same_density(s, summary)]
        return f"r{found[0][0]}: {_pct(found[0][1]['test_accuracy'])}" if found else ""

    def n(described):
        return "" if described.get("imp_rounds") is None else f"{described['imp_rounds']:.2f}"

    rows = [
        "| layer | size | " + " | ".join(c[0] for c in columns) + " |",
        "|---|---|" + "---|" * len(columns),
    ]
    for layer, v in layers.items():
        cells = [f"{100 * c[2]['layers'][layer]['density']:.1f}" for c in columns]
        rows.append(f"| {layer} | {v['size']} | " + " | ".join(cells) + " |")
    total = columns[0][2]["size"]
    for name, cells in (
        (f"all | {total}", [f"{100 * c[2]['density']:.3f}" for c in columns]),
        ("IMP rounds matched | ", [n(c[3]) for c in columns]),
        ("test acc % | ", [_pct(c[1]["test_accuracy"]) for c in columns]),
        ("IMP round at this density: test acc % | ", [imp_at(c[1]) for c in columns]),
    ):
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def _spread(point: dict, key: str) -> str:
    """mean ± std (ddof=1) in % over a stability point's repeats; the mean alone for n = 1."""
    values = [rep[key] for rep in point.get("repeats", []) if key in rep]
    if values:  # recomputed from the repeats: the same spread for files of older versions
        st = stats(values)
    else:
        st = {"mean": point[f"{key}_mean"], "std": point.get(f"{key}_std"), "n": point.get("n")}
    text = f"{100 * st['mean']:.2f}"
    return text if st["std"] is None or st["n"] == 1 else f"{text} ± {100 * st['std']:.2f}"


def stability_table(run_dir: str) -> str:
    """Markdown table of every stability point of a run ('' if none).

    n: repeats (pairs of copies); barriers are mean ± std (ddof=1) over them,
    the value alone for n = 1.
    """
    rows = [
        "| round | density % | k | n | test barrier % mean ± std | train barrier % mean ± std | "
        "stable | "
        "copies' test acc % | data-order dist. | pruning dist. | BN | subnetwork |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in stability_points(run_dir):
        n = p.get("n", len(p.get("repeats", [])) or "")
        rows.append(
            f"| {p['round']} | {100 * p['density']:.2f} | {p['rewind_step']} | {n} | "
            f"{_spread(p, 'test_barrier')} | {_spread(p, 'train_barrier')} | "
            f"{'yes' if p['stable'] else 'no'} | "
            f"{100 * p.get('test_accuracy_mean', float('nan')):.2f} | "
            f"{p['data_order_distance_mean']:.3f} | "
            f"{p.get('pruning_distance', float('nan')):.3f} | {p['batchnorm']} | "
            f"{_subnetwork_label(p)} |"
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


# ---- aggregation over replicates -------------------------------------------------------------


def stats(values) -> dict:
    """mean, std (sample, ddof=1), min, max and n of the values that are not None.

    std is None with fewer than 2 values; every field but n is None with none.
    """
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return {"mean": None, "std": None, "min": None, "max": None, "n": 0}
    return {
        "mean": statistics.fmean(vals),
        "std": statistics.stdev(vals) if len(vals) > 1 else None,
        "min": min(vals),
        "max": max(vals),
        "n": len(vals),
    }


def _branch_order(names) -> list:
    return sorted(names, key=lambda b: (b != rundir.IMP, b))


def aggregate(replicate_results: list) -> dict:
    """Per series (IMP and each control) and round: the numbers over the replicates.

    Args:
      replicate_results: one lth_tf.rundir.finished_rounds() per replicate.

    Returns:
      {branch: {round: point}}, IMP first. A point is {"round", "density" (mean),
      "n" (replicates that finished the round), one stats() per name in METRICS,
      "matching": {accuracy metric: bool or None}}. Matching compares the mean with
      the dense network's mean (IMP round 0) minus 0.2 points; None where either
      is unknown.
    """
    names = _branch_order({b for results in replicate_results for b in results})
    out = {}
    for branch in names:
        rounds = sorted({r for results in replicate_results for r in results.get(branch, {})})
        out[branch] = {}
        for r in rounds:
            found = [res[branch][r] for res in replicate_results if r in res.get(branch, {})]
            point = {
                "round": r,
                "density": statistics.fmean(s["density"] for s in found),
                "n": len(found),
            }
            for metric in METRICS:
                point[metric] = stats(s.get(metric) for s in found)
            out[branch][r] = point
    dense = out.get(rundir.IMP, {}).get(0)
    for points in out.values():
        for point in points.values():
            point["matching"] = {}
            for metric in ACCURACY_METRICS:
                mean = point[metric]["mean"]
                ref = dense[metric]["mean"] if dense else None
                point["matching"][metric] = (
                    None if mean is None or ref is None else mean >= ref - rundir.MATCHING_POINTS
                )
    return out


def read_group(path: str) -> dict:
    """A run or replicate group as the report reads it.

    Returns:
      {"path", "replicates" (run directories), "config" (lth_tf.rundir.group_config),
      "results" (one finished_rounds() per replicate), "aggregate" (aggregate())}.

    Raises:
      RunDirError: path is neither a run nor a replicate group, or its replicates
        are not replicates of one experiment.
    """
    dirs = rundir.replicate_dirs(path)
    results = [rundir.finished_rounds(d) for d in dirs]
    return {
        "path": path,
        "replicates": dirs,
        "config": rundir.group_config(path),
        "results": results,
        "aggregate": aggregate(results),
    }


def _value(v) -> str:
    if v is None:
        return "none"
    if isinstance(v, (list, tuple)):
        return ",".join(_value(x) for x in v) or "none"
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def _names(run_dirs) -> list:
    """Directory names, or the full paths where two names clash."""
    names = [os.path.basename(d.rstrip("/")) or d for d in run_dirs]
    return names if len(set(names)) == len(names) else list(run_dirs)


def differing_fields(configs: list) -> list:
    """The config fields that tell the runs apart, sorted.

    Compared: the fields that change what a run computes (lth_tf.config's identity:
    not data_dir, rounds unless a target density is set, controls, verbose,
    test_every_period), present in every config (a replicate group's seeds are not
    part of its config: lth_tf.rundir.group_config).
    """
    ignore = set(NON_IDENTITY_FIELDS) | {"format_version"}
    if any(c.get("target_density") is not None for c in configs):
        ignore.discard("rounds")
    keys = set().union(*configs) - ignore
    return sorted(
        k
        for k in keys
        if all(k in c for c in configs)
        and len({json.dumps(c[k], sort_keys=True) for c in configs}) > 1
    )


def comparison_labels(configs: list, run_dirs: list) -> list:
    """One label per run: what differs between their configs, e.g. "rewind_step=100it".

    Where nothing tells the runs apart (or two labels would be equal), the label is
    the directory name (the full path where names clash).
    """
    keys = differing_fields(configs)
    labels = [", ".join(f"{k}={_value(c[k])}" for k in keys) for c in configs]
    if not keys or len(set(labels)) < len(labels):
        return _names(run_dirs)
    return labels


# ---- the accuracy table ----------------------------------------------------------------------


def _cell(st: dict, replicated: bool, scale: float, digits: int, mark: bool = False) -> str:
    if not st["n"]:
        return ""
    text = f"{scale * st['mean']:.{digits}f}"
    if replicated and st["n"] > 1:
        text += (
            f" ± {scale * st['std']:.{digits}f} "
            f"[{scale * st['min']:.{digits}f}, {scale * st['max']:.{digits}f}]"
        )
    return text + (" ✓" if mark else "")


def _best_validation(point: dict, replicated: bool) -> str:
    """The best validation accuracy % (its step), each cell as _cell writes it."""
    acc = _cell(point["best_validation_accuracy"], replicated, 100, 2)
    step = _cell(point["best_validation_step"], replicated, 1, 0)
    return f"{acc} ({step})" if acc and step else acc


def _delta(point: dict, imp, metric: str) -> str:
    """point's mean minus the IMP point's, in accuracy points, signed; '' without both."""
    mine = point[metric]["mean"]
    theirs = None if imp is None else imp[metric]["mean"]
    if mine is None or theirs is None:
        return ""
    return f"{round(100 * (mine - theirs), 2) + 0.0:+.2f}"  # + 0.0: never "-0.00"


def _imp_at(agg: dict, branch: str, point: dict):
    """The IMP point of agg at point's density; None for IMP itself and where IMP has none."""
    if branch == rundir.IMP:
        return None
    imp = agg.get(rundir.IMP, {}).values()
    return next((q for q in imp if _same_density(point, q)), None)


def _header(labelled: bool, replicated: bool, recorded: bool) -> list:
    spread = " mean ± std (ddof=1) [min, max]" if replicated else ""
    accuracies = ["final", "at early stop"] if recorded else ["final"]
    return (
        ["density %"]
        + (["run"] if labelled else [])
        + ["series", "round"]
        + (["n"] if replicated else [])
        + [f"final test acc %{spread}"]
        + ([f"test acc at early stop %{spread}"] if recorded else [])
        + [f"early-stop step{spread}", f"best val acc % (step){spread}"]
        + [f"Δ {a} vs IMP (points)" for a in accuracies]
    )


def aggregate_table(runs: list) -> str:
    """The accuracy table of runs or replicate groups: one row per (run, series, round).

    Every finished round of every series (IMP, the controls, each branch of
    lth_tf.branch, each one-shot branch its own) has one row, so the columns do
    not depend on how many series there are. Densest first; at a density, IMP's
    row first (a row within 0.1% of an IMP round's density sorts with it).
    Columns: the final test accuracy and the test accuracy at early stopping (the
    latter where some run recorded it), ✓ where matching (MATCHING); the
    early-stopping step; the best validation accuracy (its step); and "Δ ... vs
    IMP": each accuracy minus IMP's at the same density of the same run, in
    points, empty for IMP and where IMP has no round at that density. For
    replicate groups a cell is mean ± std [min, max] over the n replicates that
    finished the round and a Δ is the difference of the means; a plain run shows
    its numbers alone.

    Args:
      runs: [(label, aggregate())]; the run column is shown when a label is not None.
    """
    points = [p for _, agg in runs for pts in agg.values() for p in pts.values()]
    replicated = any(p["n"] > 1 for p in points)
    recorded = any(p["test_accuracy_at_early_stopping"]["n"] for p in points)
    labelled = any(label is not None for label, _ in runs)
    accuracies = ACCURACY_METRICS if recorded else ACCURACY_METRICS[:1]
    rows = []
    for i, (label, agg) in enumerate(runs):
        for j, (branch, pts) in enumerate(agg.items()):
            for p in pts.values():
                imp = _imp_at(agg, branch, p)
                rows.append(((-(imp or p)["density"], i, j, p["round"]), label, branch, p, imp))
    header = _header(labelled, replicated, recorded)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for _, label, branch, p, imp in sorted(rows, key=lambda row: row[0]):
        cells = [f"{100 * p['density']:.2f}"] + ([label or ""] if labelled else [])
        cells += [branch, str(p["round"])] + ([str(p["n"])] if replicated else [])
        cells += [_cell(p[m], replicated, 100, 2, bool(p["matching"][m])) for m in accuracies]
        cells += [
            _cell(p["early_stopping_step"], replicated, 1, 0),
            _best_validation(p, replicated),
        ]
        cells += [_delta(p, imp, m) for m in accuracies]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def accuracy_table(results: dict) -> str:
    """The accuracy table of one run: aggregate_table of its one replicate.

    Args:
      results: {branch: {round: summary}} (lth_tf.rundir.finished_rounds).
    """
    return aggregate_table([(None, aggregate([results]))])


def table_legend(groups: list) -> str:
    """What the accuracy table's rows and cells mean, as Markdown."""
    text = [
        "One row per finished round of every series (IMP, its controls, the run's branches), "
        "densest first, IMP first at each density. Early stop: the iteration of minimum "
        "validation loss (the 2019 paper's Figures 3-4); best val acc: the highest validation "
        "accuracy and the step it was reached at. ✓ = matching: within 0.2 points of the dense "
        "network (IMP round 0 of the same run) or above it. Δ vs IMP: the accuracy minus IMP's "
        "at the same density in the same run, in points (empty for IMP and where IMP has no "
        "round at that density).",
    ]
    if any(len(g["replicates"]) > 1 for g in groups):
        text.append(
            "Cells: mean ± std [min, max] over the n replicates that finished the round; std is "
            "the sample standard deviation (ddof=1); ✓ and Δ compare the means."
        )
    recorded = any(
        s.get("test_accuracy_at_early_stopping") is not None
        for g in groups
        for res in g["results"]
        for rounds in res.values()
        for s in rounds.values()
    )
    if not recorded:
        text.append(
            "Test accuracy at early stopping was not recorded: runs with --test_every_period "
            "evaluate the test set at every evaluation."
        )
    return " ".join(text)


def aggregate_json(groups: list, labels: list) -> dict:
    """The report's numbers as JSON (report.json): every run's series, point by point.

    Args:
      groups: read_group() of each run or replicate group.
      labels: one label per group (None for a report of one run or group).
    """
    return {
        "std": STD,
        "matching": MATCHING,
        "matching_points": 100 * rundir.MATCHING_POINTS,
        "metrics": list(METRICS),
        "runs": [
            {
                "label": label,
                "path": g["path"],
                "replicates": g["replicates"],
                "config": g["config"],
                "series": [
                    {"branch": branch, "points": list(points.values())}
                    for branch, points in g["aggregate"].items()
                ],
            }
            for g, label in zip(groups, labels, strict=True)
        ],
    }


# ---- the report ------------------------------------------------------------------------------


def _layers(run_dir: str, rounds) -> dict:
    reports = layer_densities(run_dir, rounds)
    return {
        r: {name: v["density"] for name, v in rep["layers"].items()} for r, rep in reports.items()
    }


def _figure(groups: list, labels: list, layers=None) -> bytes:
    """The report's figure: one series per (run, branch), min/max bands over replicates."""
    series, dense = [], []
    for i, (g, label) in enumerate(zip(groups, labels, strict=True)):
        merged = {}  # one-shot branches of one k: one series
        for branch, points in g["aggregate"].items():
            merged.setdefault(series_of(branch), []).extend(points.values())
        for branch, points in merged.items():
            name = branch if label is None else f"{label} / {branch}"
            series.append({"label": name, "run": i, "branch": branch, "points": points})
        d = g["aggregate"].get(rundir.IMP, {}).get(0)
        if d:
            dense.append(
                {"label": "dense" if label is None else f"{label} dense", "run": i, "point": d}
            )
    return plots.accuracy_bands(series, dense, layers)


def plot(run_dir: str, results: dict) -> bytes:
    """PNG of one run: accuracies and early-stopping step against density, layer densities."""
    group = {"aggregate": aggregate([results])}
    return _figure([group], [None], _layers(run_dir, results.get(rundir.IMP, {})))


def _run_sections(run_dir: str, results: dict, heading: str = "##") -> list:
    parts = []
    stable = stability_table(run_dir)
    if stable:
        parts += [
            f"{heading} Stability (instability = test-error barrier on the linear path; "
            "mean ± std (ddof=1) over n repeats, the value alone for n = 1)\n",
            stable,
            "",
        ]
    exports = export_table(run_dir)
    if exports:
        parts += [f"{heading} Sparse exports (SavedModel)\n", exports, ""]
    return parts


def _config_section(config: dict, title: str = "## Config") -> list:
    return [f"{title}\n", "```json", json.dumps(config, indent=2, sort_keys=True), "```", ""]


def _write(out_dir: str, parts: list, groups: list, labels: list, layers=None) -> None:
    files.write_text(paths.report_file(out_dir), "\n".join(parts))
    files.write_json(paths.report_json_file(out_dir), aggregate_json(groups, labels))
    if any(g["aggregate"] for g in groups):
        files.write_bytes(paths.plot_file(out_dir), _figure(groups, labels, layers))


def write_report(run_dir: str, extra_sections=(), out: str | None = None) -> str:
    """Writes report.md, report.json and accuracy_vs_density.png of a run or replicate group.

    Args:
      run_dir: an lth_tf run directory, or a replicate group (its replicate_N are runs).
      extra_sections: Markdown strings appended before the config section.
      out: where to write (default: run_dir itself; the group directory for a group).

    Returns:
      The accuracy table (aggregate_table; for a run, accuracy_table), as report.md has it.

    Raises:
      RunDirError: run_dir is neither a run nor a replicate group, or `out` (other than
        run_dir) is another run or group or lies inside a run (check_out).
    """
    group = read_group(run_dir)
    out = out or run_dir
    if _split(out) != _split(run_dir):
        check_out(out)
    text = aggregate_table([(None, group["aggregate"])])
    table = [
        table_legend([group]),
        "",
        text,
        "",
        "![accuracy vs density](accuracy_vs_density.png)",
        "",
    ]
    if group["replicates"] == [run_dir]:
        results = group["results"][0]
        parts = [
            f"# lth_tf run report\n\nRun: `{run_dir}`\n",
            "## Test accuracy against density\n",
            *table,
            "## Per-layer density (%)\n",
            layer_table(run_dir, results),
            "",
        ]
        oneshot = oneshot_table(run_dir, results)
        if oneshot:
            parts += [
                "## One-shot pruning: per-layer density (%)\n",
                "Each one-shot branch prunes round 0 straight to its density, each layer "
                "where IMP at the run's prune fraction and per-layer rates has it there.\n",
                oneshot,
                "",
            ]
        parts += _run_sections(run_dir, results)
        layers = _layers(run_dir, results.get(rundir.IMP, {}))
    else:
        # The first replicate with a finished IMP round: in a job array, replicate_1
        # may start after the others.
        k = next((k for k, r in enumerate(group["results"]) if r.get(rundir.IMP)), 0)
        first, first_results = group["replicates"][k], group["results"][k]
        names = ", ".join(f"`{os.path.basename(d)}`" for d in group["replicates"])
        parts = [
            f"# lth_tf replicate report\n\nGroup: `{run_dir}`: "
            f"{len(group['replicates'])} replicates ({names})\n",
            "## Test accuracy against density (over replicates)\n",
            *table,
        ]
        layer_text = layer_table(first, first_results)
        if layer_text:
            parts += [f"## Per-layer density (%) of {os.path.basename(first)}\n", layer_text, ""]
        for d, results in zip(group["replicates"], group["results"], strict=True):
            sections = _run_sections(d, results, "###")
            if sections:
                parts += [f"## {os.path.basename(d)}\n"] + sections
        seeds = [
            {k: rundir.config_json(d).get(k) for k in rundir.REPLICATE_FIELDS}
            for d in group["replicates"]
        ]
        parts += [
            "## Replicates' seeds\n",
            "\n".join(
                f"- {os.path.basename(d)}: `{json.dumps(s)}`"
                for d, s in zip(group["replicates"], seeds, strict=True)
            ),
            "",
        ]
        layers = _layers(first, first_results.get(rundir.IMP, {}))
    parts.extend(extra_sections)
    parts += _config_section(group["config"])
    _write(out, parts, [group], [None], layers)
    return text


def _split(path: str) -> list:
    # Component-wise, so that 'gs://bucket/a' keeps its '//'.
    if "://" not in path:
        path = os.path.abspath(path)
    return path.rstrip("/").split("/")


def _inside(path: str, run_dirs) -> bool:
    """Whether path is one of run_dirs or lies under one."""
    p = _split(path)
    return any(p[: len(q)] == q for q in map(_split, run_dirs))


def _holds_runs(directory: str) -> bool:
    """Whether directory is a run (config.json) or a replicate group (replicate_N/config.json)."""
    if files.exists(paths.config_file(directory)):
        return True
    try:
        rundir.replicate_dirs(directory)
    except rundir.RunDirError:
        return False
    return True


def check_out(out: str) -> None:
    """Refuses an --out that is a run or a replicate group, or lies inside a run.

    A report written there would overwrite that run's (or group's) report.md,
    report.json and plot. A comparison's output directory (report.md but no
    config.json) may be written again.

    Raises:
      RunDirError: saying which run it would write into and what to pass instead.
    """
    parts = _split(out)
    first = 3 if "://" in out else 2  # never the file system's root or a bucket alone
    for i in range(len(parts), first - 1, -1):
        directory = "/".join(parts[:i])
        if _holds_runs(directory):
            where = "is" if i == len(parts) else "lies inside"
            raise rundir.RunDirError(
                f"--out={out} {where} the run or replicate group {directory}: the report would "
                "overwrite its own. Choose a directory outside every run (or leave --out out: "
                "a run's report goes into the run, a comparison's into a comparison_<hash> "
                "directory next to the runs)."
            )


def default_comparison_dir(run_dirs: list) -> str:
    """comparison_<hash8 of the run paths> in the deepest directory holding every run.

    Never inside one of the runs (when one run holds another, one level above it).
    """
    parts = [_split(d) for d in run_dirs]
    common = []
    for names in zip(*parts, strict=False):
        if len(set(names)) > 1:
            break
        common.append(names[0])
    while common and _inside("/".join(common), run_dirs):
        common.pop()
    digest = hashlib.sha256("\n".join("/".join(p) for p in parts).encode()).hexdigest()[:8]
    return paths.join("/".join(common) or "/", f"comparison_{digest}")


def write_comparison(run_dirs: list, out: str | None = None) -> tuple:
    """Several runs or replicate groups on one table and one figure.

    Each run is labelled by what differs between the configs (comparison_labels);
    its series are (label, branch). Nothing is written into the compared runs.

    Args:
      run_dirs: runs or replicate groups (lth_tf.rundir.replicate_dirs).
      out: the directory to write report.md, report.json and the plot into
        (default: default_comparison_dir(run_dirs)).

    Returns:
      (the output directory, the table).

    Raises:
      RunDirError: an input is not a run or group, or out lies inside one of them, or a
        given out is another run or group or lies inside a run (check_out).
    """
    groups = [read_group(d) for d in run_dirs]
    given = out
    out = out or default_comparison_dir(run_dirs)
    if _inside(out, run_dirs):
        raise rundir.RunDirError(
            f"--out={out} lies inside a compared run; a comparison never writes into its runs. "
            "Choose a directory outside them (or leave --out out for a comparison_<hash> "
            "directory next to them)."
        )
    if given:
        check_out(given)
    labels = comparison_labels([g["config"] for g in groups], list(run_dirs))
    text = aggregate_table(
        [(label, g["aggregate"]) for label, g in zip(labels, groups, strict=True)]
    )
    keys = differing_fields([g["config"] for g in groups])
    runs = ["| run | directory | replicates |", "|---|---|---|"] + [
        f"| {label} | `{g['path']}` | {len(g['replicates'])} |"
        for label, g in zip(labels, groups, strict=True)
    ]
    common = {
        k: v
        for k, v in groups[0]["config"].items()
        if all(k in g["config"] and g["config"][k] == v for g in groups)
    }
    parts = [
        "# lth_tf comparison report\n",
        "## Runs\n",
        "\n".join(runs),
        "",
        "Fields that differ: "
        + (", ".join(f"`{k}`" for k in keys) or "none (labelled by directory)"),
        "",
        "## Test accuracy against density\n",
        table_legend(groups),
        "",
        text,
        "",
        "![accuracy vs density](accuracy_vs_density.png)",
        "",
    ]
    parts += _config_section(common, "## Config shared by all runs")
    _write(out, parts, groups, labels)
    return out, text
