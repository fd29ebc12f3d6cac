"""Contracts of the report (lth_tf.reporting, `python -m lth_tf.report`) on hand-written runs.

Every run here is a few JSON files written by the test: no model is built and
nothing is trained, so the report's formatting is tested on its own.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from lth_tf import files, paths, reporting, rundir

CONFIG = {"arch": "lenet_300_100", "dataset": "mnist", "seed": 0, "rounds": 2}


def _summary(r, density, acc, branch="imp"):
    return {
        "round": r,
        "branch": branch,
        "density": density,
        "test_accuracy": acc,
        "best_validation_accuracy": acc + 0.001,
        "best_validation_step": 100 * (r + 1),
        "early_stopping_step": 50 * (r + 1),
    }


def _sparsity(fc1, fc2):
    return {
        "layers": {
            "fc1": {"size": 1000, "density": fc1},
            "fc2": {"size": 100, "density": fc2},
        }
    }


def _write_run(root) -> str:
    """round_00 and round_01 finished, round_02 started, random_reinit round 1 finished."""
    run_dir = str(root)
    files.write_json(paths.config_file(run_dir), CONFIG)
    for r, density, acc in ((0, 1.0, 0.9812), (1, 0.8, 0.9834)):
        rdir = paths.round_dir(run_dir, r)
        files.write_json(paths.summary_file(rdir), _summary(r, density, acc))
        files.write_json(paths.sparsity_file(rdir), _sparsity(density, 1.0))
    files.write_json(  # round 2 was killed before it finished: no summary.json
        paths.sparsity_file(paths.round_dir(run_dir, 2)), _sparsity(0.64, 1.0)
    )
    files.write_json(
        paths.summary_file(paths.round_dir(run_dir, 1, "random_reinit")),
        _summary(1, 0.8, 0.9701, "random_reinit"),
    )
    # A control that has not finished any round yet.
    os.makedirs(paths.round_dir(run_dir, 1, "random_prune"))
    return run_dir


def _rows(table: str) -> list:
    """The table's data rows as lists of cells."""
    lines = table.splitlines()[2:]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]


def test_finished_rounds_are_those_with_a_summary(tmp_path):
    run_dir = _write_run(tmp_path)
    results = rundir.finished_rounds(run_dir)
    assert sorted(results) == ["imp", "random_reinit"]  # random_prune finished nothing
    assert sorted(results["imp"]) == [0, 1]  # round 2 has no summary.json
    assert sorted(results["random_reinit"]) == [1]
    assert results["imp"][1]["test_accuracy"] == 0.9834
    assert rundir.finished_rounds(str(tmp_path / "nothing")) == {}


def test_the_run_table_has_a_row_per_finished_round_of_every_series(tmp_path):
    table = reporting.accuracy_table(rundir.finished_rounds(_write_run(tmp_path)))
    assert table.splitlines()[0] == (
        "| density % | series | round | final test acc % | early-stop step | "
        "best val acc % (step) | Δ final vs IMP (points) |"
    )
    assert _rows(table) == [
        ["100.00", "imp", "0", "98.12 ✓", "50", "98.22 (100)", ""],
        ["80.00", "imp", "1", "98.34 ✓", "100", "98.44 (200)", ""],
        ["80.00", "random_reinit", "1", "97.01", "100", "97.11 (200)", "-1.33"],
    ]


# Branches of every kind lth_tf.branch makes, and the controls: {branch: {round: density}}.
# Fine-tuning goes 2 rounds past IMP's last finished round (1); the one-shot branches
# prune to IMP round 1's density and to 50%, a density IMP never has.
BRANCHES = {
    "random_reinit": {1: 0.8},
    "random_prune": {1: 0.8},
    "rewind_10it": {1: 0.8},
    "lr_rewind_20it": {1: 0.8},
    "finetune_lr0.0001_10it": {1: 0.8, 2: 0.64, 3: 0.512},
    "oneshot_20it_d80.000": {1: 0.8},
    "oneshot_20it_d50.000": {1: 0.5},
}


def _write_branches(run_dir, names=tuple(BRANCHES)) -> dict:
    """Adds the named BRANCHES' rounds to a _write_run run; returns {(branch, round): acc}."""
    accs = {}
    for i, name in enumerate(names):
        for r, density in BRANCHES[name].items():
            accs[(name, r)] = 0.95 + 0.001 * i + 0.0001 * r
            files.write_json(
                paths.summary_file(paths.round_dir(run_dir, r, name)),
                _summary(r, density, accs[(name, r)], name),
            )
    return accs


def test_every_finished_round_of_every_branch_has_exactly_one_row(tmp_path):
    run_dir = _write_run(tmp_path)
    _write_branches(run_dir)
    results = rundir.finished_rounds(run_dir)
    rows = _rows(reporting.accuracy_table(results))
    shown = [(row[1], int(row[2])) for row in rows]
    assert sorted(shown) == sorted((b, r) for b, rounds in results.items() for r in rounds)
    assert len(set(shown)) == len(shown) == 2 + 9  # IMP's and BRANCHES' rounds
    # Fine-tuning past IMP's last round and one-shot at a density IMP never had are there.
    assert ["51.20", "finetune_lr0.0001_10it", "3"] in [row[:3] for row in rows]
    assert ["50.00", "oneshot_20it_d50.000", "1"] in [row[:3] for row in rows]
    # Densest first, IMP first at a density.
    densities = [float(row[0]) for row in rows]
    assert densities == sorted(densities, reverse=True)
    at_80 = [row[1] for row in rows if row[0] == "80.00"]
    assert at_80[0] == "imp" and len(at_80) == 1 + 6


def test_the_table_header_does_not_depend_on_the_number_of_branches(tmp_path):
    one = _write_run(tmp_path / "one")
    many = _write_run(tmp_path / "many")
    _write_branches(many)
    header = reporting.accuracy_table(rundir.finished_rounds(one)).splitlines()[0]
    assert reporting.accuracy_table(rundir.finished_rounds(many)).splitlines()[0] == header
    assert "random_reinit" not in header and "oneshot" not in header


def test_delta_to_imp_is_the_accuracy_minus_imps_at_the_same_density(tmp_path):
    run_dir = _write_run(tmp_path)
    accs = _write_branches(run_dir)
    rows = {
        (row[1], row[2]): row
        for row in _rows(reporting.accuracy_table(rundir.finished_rounds(run_dir)))
    }
    imp_1 = 0.9834  # IMP round 1, density 80%
    for name in ("oneshot_20it_d80.000", "finetune_lr0.0001_10it", "random_prune"):
        assert rows[(name, "1")][-1] == f"{100 * (accs[(name, 1)] - imp_1):+.2f}"
    assert rows[("oneshot_20it_d80.000", "1")][-1] == "-2.83"  # 95.51 - 98.34
    # Empty for IMP and where IMP has no finished round at that density.
    assert rows[("imp", "1")][-1] == ""
    assert rows[("finetune_lr0.0001_10it", "2")][-1] == ""
    assert rows[("oneshot_20it_d50.000", "1")][-1] == ""


def test_layer_table_lists_each_finished_round(tmp_path):
    run_dir = _write_run(tmp_path)
    table = reporting.layer_table(run_dir, rundir.finished_rounds(run_dir))
    assert table.splitlines()[0] == "| layer | size | r0 | r1 |"
    assert _rows(table) == [["fc1", "1000", "100.0", "80.0"], ["fc2", "100", "100.0", "100.0"]]


def test_write_report_writes_the_markdown_and_the_plot(tmp_path):
    run_dir = _write_run(tmp_path)
    _write_branches(run_dir)
    table = reporting.write_report(run_dir)
    assert table == reporting.accuracy_table(rundir.finished_rounds(run_dir))
    with open(paths.report_file(run_dir)) as f:
        text = f.read()
    # The printed table is report.md's, and report.md has no second accuracy table.
    assert table in text
    assert text.count("| series | round |") == 1 and "Δ final vs IMP" in text
    assert "## Per-layer density (%)" in text
    assert "## Stability" not in text and "## Sparse exports" not in text  # none run yet
    # The config section is real JSON: a reader can paste it.
    block = text.split("## Config\n")[1].split("```json\n")[1].split("```")[0]
    assert json.loads(block) == CONFIG
    with open(paths.plot_file(run_dir), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_the_report_of_a_run_without_finished_rounds_has_no_plot(tmp_path):
    run_dir = str(tmp_path)
    files.write_json(paths.config_file(run_dir), CONFIG)
    assert _rows(reporting.write_report(run_dir)) == []
    assert os.path.exists(paths.report_file(run_dir))
    assert not os.path.exists(paths.plot_file(run_dir))


def test_stability_and_export_results_get_their_sections(tmp_path):
    run_dir = _write_run(tmp_path)
    point = {
        "round": 1,
        "rewind_step": 20,
        "density": 0.8,
        "n": 3,
        "test_barrier_mean": 0.031,
        "test_barrier_std": 0.004,
        "train_barrier_mean": 0.012,
        "train_barrier_std": 0.0,
        "stable": False,
        "test_accuracy_mean": 0.97,
        "data_order_distance_mean": 1.5,
        "pruning_distance": 2.25,
        "batchnorm": "interpolated",
    }
    files.write_json(
        paths.join(paths.stability_point_dir(run_dir, 1, 20), "interpolation.json"), point
    )
    files.write_json(
        paths.join(paths.stability_point_dir(run_dir, 0, 0), "interpolation.json"),
        {**point, "round": 0, "rewind_step": 0, "density": 1.0, "stable": True},
    )
    files.write_json(
        paths.export_report_file(run_dir, 1),
        {
            "round": 1,
            "density_all_kernels": 0.8123,
            "exported_test_accuracy": 0.9834,
            "recorded_test_accuracy": 0.9834,
            "dense": {"zip_bytes": 123456},
            "sparse": {"zip_bytes": 100000},
            "zip_ratio_sparse_over_dense": 0.81,
        },
    )
    stable = reporting.stability_table(run_dir)
    assert [row[:7] for row in _rows(stable)] == [  # by round, then rewind step
        ["0", "100.00", "0", "3", "3.10 ± 0.40", "1.20 ± 0.00", "yes"],
        ["1", "80.00", "20", "3", "3.10 ± 0.40", "1.20 ± 0.00", "no"],
    ]
    assert _rows(reporting.export_table(run_dir)) == [
        ["1", "81.23", "98.34", "98.34", "123,456", "100,000", "0.810"]
    ]
    reporting.write_report(run_dir)
    with open(paths.report_file(run_dir)) as f:
        text = f.read()
    assert stable in text and reporting.export_table(run_dir) in text


def test_a_directory_that_is_not_a_run_is_refused_and_left_alone(tmp_path):
    with pytest.raises(rundir.RunDirError, match="is not an lth_tf run directory"):
        reporting.write_report(str(tmp_path))
    assert os.listdir(tmp_path) == []


def test_the_command_line_reports_without_loading_the_training_stack(tmp_path):
    run_dir = _write_run(tmp_path / "run")
    script = textwrap.dedent(
        """
        import sys
        from lth_tf import report
        sys.argv = ["report", "--run_dir=" + sys.argv[1]]
        try:
            report.run()
        except SystemExit as e:
            assert not e.code, e.code
        loaded = sorted(m for m in sys.modules if m.startswith("lth_tf"))
        print("LOADED", " ".join(loaded))
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, run_dir],
        capture_output=True,
        text=True,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| 80.00 | imp | 1 | 98.34 ✓ |" in proc.stdout
    loaded = proc.stdout.split("LOADED")[1].split()
    for module in ("lth_tf.models", "lth_tf.rounds", "lth_tf.train", "lth_tf.sparsity"):
        assert module not in loaded, loaded
    assert os.path.exists(paths.report_file(run_dir))
    assert os.path.exists(paths.plot_file(run_dir))


def test_the_table_shows_test_accuracy_at_early_stopping_and_its_delta_where_recorded():
    def summary(density, final, at_es):
        return {
            "density": density,
            "test_accuracy": final,
            "test_accuracy_at_early_stopping": at_es,
            "best_validation_accuracy": 0.99,
            "best_validation_step": 100,
            "early_stopping_step": 50,
        }

    results = {
        "imp": {0: summary(1.0, 0.97, 0.975), 1: summary(0.8, 0.98, 0.985)},
        "random_reinit": {1: summary(0.8, 0.96, 0.955)},
    }
    table = reporting.accuracy_table(results)
    header = table.splitlines()[0]
    assert (
        "| test acc at early stop % |" in header and "| Δ at early stop vs IMP (points) |" in header
    )
    assert _rows(table) == [
        ["100.00", "imp", "0", "97.00 ✓", "97.50 ✓", "50", "99.00 (100)", "", ""],
        ["80.00", "imp", "1", "98.00 ✓", "98.50 ✓", "50", "99.00 (100)", "", ""],
        ["80.00", "random_reinit", "1", "96.00", "95.50", "50", "99.00 (100)", "-2.00", "-3.00"],
    ]
