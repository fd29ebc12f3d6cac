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


def test_accuracy_table_has_a_row_per_finished_imp_round(tmp_path):
    table = reporting.accuracy_table(rundir.finished_rounds(_write_run(tmp_path)))
    header = table.splitlines()[0]
    assert "IMP test acc %" in header and "random_reinit test acc %" in header
    assert _rows(table) == [
        ["0", "100.00", "98.12", "98.22 (100)", "50", ""],  # no control at round 0
        ["1", "80.00", "98.34", "98.44 (200)", "100", "97.01"],
    ]


def test_layer_table_lists_each_finished_round(tmp_path):
    run_dir = _write_run(tmp_path)
    table = reporting.layer_table(run_dir, rundir.finished_rounds(run_dir))
    assert table.splitlines()[0] == "| layer | size | r0 | r1 |"
    assert _rows(table) == [["fc1", "1000", "100.0", "80.0"], ["fc2", "100", "100.0", "100.0"]]


def test_write_report_writes_the_markdown_and_the_plot(tmp_path):
    run_dir = _write_run(tmp_path)
    table = reporting.write_report(run_dir)
    assert table == reporting.accuracy_table(rundir.finished_rounds(run_dir))
    with open(paths.report_file(run_dir)) as f:
        text = f.read()
    assert table in text
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
    assert "| 1 | 80.00 | 98.34 |" in proc.stdout
    loaded = proc.stdout.split("LOADED")[1].split()
    for module in ("lth_tf.models", "lth_tf.rounds", "lth_tf.train", "lth_tf.sparsity"):
        assert module not in loaded, loaded
    assert os.path.exists(paths.report_file(run_dir))
    assert os.path.exists(paths.plot_file(run_dir))


def test_accuracy_table_shows_test_accuracy_at_early_stopping_where_recorded():
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
    assert "IMP at early stop %" in header and "random_reinit at early stop %" in header
    assert _rows(table) == [
        ["0", "100.00", "97.00", "97.50", "99.00 (100)", "50", "", ""],
        ["1", "80.00", "98.00", "98.50", "99.00 (100)", "50", "96.00", "95.50"],
    ]
