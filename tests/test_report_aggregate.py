"""Contracts of replicate groups and comparison reports (lth_tf.reporting) on hand-written runs.

Each run is a few JSON files written by the test (no model is built). The
numbers expected below are computed by hand from the fixtures' values.
"""

import json
import math
import os
import subprocess
import sys

import pytest

from lth_tf import files, paths, reporting, rundir

BASE = {
    "arch": "lenet_300_100",
    "dataset": "mnist",
    "seed": 0,
    "data_seed": 0,
    "rounds": 2,
    "rewind_step": "0",
    "prune_scope": "global",
    "target_density": None,
    "controls": ["random_reinit"],
    "test_every_period": True,
}

# replicate -> IMP round -> (test acc, test acc at early stopping, early-stopping step).
# Round 2 is finished by replicates 1 and 2 only (replicate 3 was stopped in it).
IMP = {
    1: {0: (0.980, 0.975, 100), 1: (0.981, 0.979, 200), 2: (0.970, 0.969, 300)},
    2: {0: (0.982, 0.978, 200), 1: (0.983, 0.980, 300), 2: (0.974, 0.971, 500)},
    3: {0: (0.984, 0.981, 300), 1: (0.979, 0.978, 400)},
}
REINIT = {1: 0.970, 2: 0.975, 3: 0.968}  # random_reinit, round 1, final test accuracy


def _summary(r, branch, density, acc, es_acc, es_step):
    return {
        "round": r,
        "branch": branch,
        "density": density,
        "test_accuracy": acc,
        "test_loss": 0.1,
        "best_validation_accuracy": acc,
        "best_validation_step": es_step,
        "early_stopping_step": es_step,
        "test_accuracy_at_early_stopping": es_acc,
        "test_accuracy_at_best_validation": es_acc,
        "min_validation_loss": 0.05,
    }


def _write_run(run_dir, rounds, reinit=None, **config):
    """A run: IMP rounds {r: (acc, es_acc, es_step)} and optionally random_reinit round 1."""
    files.write_json(paths.config_file(run_dir), {**BASE, **config})
    for r, (acc, es_acc, step) in rounds.items():
        rdir = paths.round_dir(run_dir, r)
        files.write_json(paths.summary_file(rdir), _summary(r, "imp", 0.8**r, acc, es_acc, step))
    if reinit is not None:
        files.write_json(
            paths.summary_file(paths.round_dir(run_dir, 1, "random_reinit")),
            _summary(1, "random_reinit", 0.8, reinit, reinit - 0.01, 150),
        )
    return str(run_dir)


def _write_group(group, **config) -> str:
    for n, rounds in IMP.items():
        _write_run(
            paths.replicate_dir(str(group), n),
            rounds,
            REINIT[n],
            seed=n,
            data_seed=10 + n,
            **config,
        )
    return str(group)


def _tree(root) -> dict:
    """{relative path: bytes} of every file under root."""
    out = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = f.read()
    return out


def _rows(table: str) -> list:
    return [[c.strip() for c in line.strip("|").split("|")] for line in table.splitlines()[2:]]


# ---- replicate_dirs --------------------------------------------------------------------------


def test_replicate_dirs_of_a_plain_run_is_the_run(tmp_path):
    run_dir = _write_run(str(tmp_path), IMP[1])
    assert rundir.replicate_dirs(run_dir) == [run_dir]


def test_replicate_dirs_are_sorted_by_number_and_skip_unstarted_ones(tmp_path):
    group = str(tmp_path)
    for n in (10, 2, 1):
        files.write_json(paths.config_file(paths.replicate_dir(group, n)), BASE)
    os.makedirs(paths.replicate_dir(group, 3))  # created, no config.json yet: not started
    os.makedirs(os.path.join(group, "comparison_abc"))  # not a replicate
    assert rundir.replicate_dirs(group) == [paths.replicate_dir(group, n) for n in (1, 2, 10)]


@pytest.mark.parametrize("make", ["empty", "missing", "only_unstarted"])
def test_replicate_dirs_refuse_what_is_neither_run_nor_group(tmp_path, make):
    path = str(tmp_path / "x")
    if make == "empty":
        os.makedirs(path)
    elif make == "only_unstarted":
        os.makedirs(paths.replicate_dir(path, 1))
    with pytest.raises(rundir.RunDirError, match="is not an lth_tf run directory.*replicate"):
        rundir.replicate_dirs(path)


def test_a_group_whose_replicates_differ_beyond_seeds_is_refused(tmp_path):
    _write_run(paths.replicate_dir(str(tmp_path), 1), IMP[1], seed=1)
    _write_run(paths.replicate_dir(str(tmp_path), 2), IMP[2], seed=2, rewind_step="100it")
    with pytest.raises(rundir.RunDirError, match="differ in 'rewind_step'"):
        rundir.group_config(str(tmp_path))


def test_group_config_leaves_out_the_seeds_and_keeps_the_rest(tmp_path):
    group = _write_group(tmp_path)
    config = rundir.group_config(group)
    assert "seed" not in config and "data_seed" not in config
    assert config["rewind_step"] == "0" and config["arch"] == "lenet_300_100"


# ---- aggregation -----------------------------------------------------------------------------


def test_stats_are_mean_sample_std_min_max_of_the_known_values():
    st = reporting.stats([1.0, None, 2.0, 6.0])
    assert st["n"] == 3 and st["mean"] == pytest.approx(3.0)
    assert st["std"] == pytest.approx(math.sqrt(((1 - 3) ** 2 + (2 - 3) ** 2 + (6 - 3) ** 2) / 2))
    assert (st["min"], st["max"]) == (1.0, 6.0)
    assert reporting.stats([5.0]) == {"mean": 5.0, "std": None, "min": 5.0, "max": 5.0, "n": 1}
    assert reporting.stats([None]) == {"mean": None, "std": None, "min": None, "max": None, "n": 0}


def test_aggregate_matches_hand_computed_numbers(tmp_path):
    agg = reporting.read_group(_write_group(tmp_path))["aggregate"]
    assert list(agg) == ["imp", "random_reinit"]
    dense = agg["imp"][0]
    assert dense["n"] == 3 and dense["density"] == 1.0
    # Round 0: accuracies 0.980, 0.982, 0.984 -> mean 0.982, std 0.002.
    assert dense["test_accuracy"]["mean"] == pytest.approx(0.982)
    assert dense["test_accuracy"]["std"] == pytest.approx(0.002)
    assert (dense["test_accuracy"]["min"], dense["test_accuracy"]["max"]) == (0.980, 0.984)
    # At early stopping 0.975, 0.978, 0.981 -> 0.978 ± 0.003; steps 100, 200, 300 -> 200 ± 100.
    assert dense["test_accuracy_at_early_stopping"]["mean"] == pytest.approx(0.978)
    assert dense["test_accuracy_at_early_stopping"]["std"] == pytest.approx(0.003)
    assert dense["early_stopping_step"]["mean"] == pytest.approx(200)
    assert dense["early_stopping_step"]["std"] == pytest.approx(100)
    # Round 1: 0.981, 0.983, 0.979 -> mean 0.981 >= 0.982 - 0.002: matching.
    one = agg["imp"][1]
    assert one["test_accuracy"]["mean"] == pytest.approx(0.981)
    assert one["matching"]["test_accuracy"] is True
    # Round 2, finished by 2 of 3 replicates: 0.970, 0.974 -> 0.972 ± 0.002*sqrt(2).
    two = agg["imp"][2]
    assert two["n"] == 2 and two["test_accuracy"]["n"] == 2
    assert two["density"] == pytest.approx(0.64)
    assert two["test_accuracy"]["mean"] == pytest.approx(0.972)
    assert two["test_accuracy"]["std"] == pytest.approx(0.002 * math.sqrt(2))
    assert two["early_stopping_step"]["mean"] == pytest.approx(400)
    assert two["matching"]["test_accuracy"] is False
    # The control: 0.970, 0.975, 0.968 at round 1, compared with IMP's dense round.
    reinit = agg["random_reinit"][1]
    assert reinit["test_accuracy"]["mean"] == pytest.approx((0.970 + 0.975 + 0.968) / 3)
    assert (reinit["test_accuracy"]["min"], reinit["test_accuracy"]["max"]) == (0.968, 0.975)
    assert reinit["matching"]["test_accuracy"] is False


def test_the_group_table_shows_mean_std_min_max_n_and_matching(tmp_path):
    group = _write_group(tmp_path)
    table = reporting.aggregate_table([(None, reporting.read_group(group)["aggregate"])])
    header = table.splitlines()[0]
    assert "ddof=1" in header and "| n |" in header
    rows = {(row[1], row[2]): row for row in _rows(table)}
    assert rows[("imp", "0")] == [
        "100.00",
        "imp",
        "0",
        "3",
        "98.20 ± 0.20 [98.00, 98.40] ✓",
        "97.80 ± 0.30 [97.50, 98.10] ✓",
        "200 ± 100 [100, 300]",
        "98.20 ± 0.20 [98.00, 98.40] (200 ± 100 [100, 300])",  # best val = final acc here
        "",
        "",
    ]
    assert rows[("imp", "2")][3:5] == ["2", "97.20 ± 0.28 [97.00, 97.40]"]  # not matching
    # Δ compares the means: 0.971 - 0.981 final, 0.961 - 0.979 at early stopping.
    assert rows[("random_reinit", "1")][-2:] == ["-1.00", "-1.80"]
    # Densest first; the control's row follows IMP's at the same density.
    assert [(row[1], row[2]) for row in _rows(table)] == [
        ("imp", "0"),
        ("imp", "1"),
        ("random_reinit", "1"),
        ("imp", "2"),
    ]


def test_a_plain_run_is_the_group_table_of_one_replicate_shown_once(tmp_path):
    run_dir = _write_run(str(tmp_path), IMP[1], REINIT[1])
    table = reporting.write_report(run_dir)
    assert table == reporting.accuracy_table(rundir.finished_rounds(run_dir))
    assert table == reporting.aggregate_table([(None, reporting.read_group(run_dir)["aggregate"])])
    with open(paths.report_file(run_dir)) as f:
        text = f.read()
    assert text.count(table) == 1 and text.count("| series | round |") == 1
    assert "± " not in table and "| n |" not in table  # one run: numbers alone
    assert "| 80.00 | imp | 1 | 98.10 ✓ | 97.90 ✓ | 200 | 98.10 (200) |  |  |" in table
    with open(paths.report_json_file(run_dir)) as f:
        report = json.load(f)
    assert report["runs"][0]["series"][0]["points"][0]["n"] == 1


def test_a_group_report_is_written_into_the_group(tmp_path):
    group = _write_group(tmp_path)
    before = {n: _tree(paths.replicate_dir(group, n)) for n in IMP}
    table = reporting.write_report(group)
    assert {n: _tree(paths.replicate_dir(group, n)) for n in IMP} == before
    with open(paths.report_file(group)) as f:
        text = f.read()
    assert table in text and "3 replicates" in text
    block = text.split("## Config\n")[1].split("```json\n")[1].split("```")[0]
    assert json.loads(block) == rundir.group_config(group)
    with open(paths.report_json_file(group)) as f:
        report = json.load(f)
    assert "ddof=1" in report["std"]
    (run,) = report["runs"]
    assert run["replicates"] == [paths.replicate_dir(group, n) for n in (1, 2, 3)]
    imp = run["series"][0]
    assert imp["branch"] == "imp" and [p["n"] for p in imp["points"]] == [3, 3, 2]
    assert imp["points"][0]["test_accuracy"]["std"] == pytest.approx(0.002)
    with open(paths.plot_file(group), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


# ---- comparisons -----------------------------------------------------------------------------


def test_labels_name_what_differs_between_the_configs():
    a = {**BASE, "rewind_step": "0"}
    b = {**BASE, "rewind_step": "100it", "rounds": 8, "controls": []}  # non-identity differ too
    assert reporting.comparison_labels([a, b], ["x/a", "x/b"]) == [
        "rewind_step=0",
        "rewind_step=100it",
    ]
    c = {**BASE, "prune_scope": "layerwise", "target_density": 0.1}
    assert reporting.comparison_labels([a, c], ["a", "c"]) == [
        "prune_scope=global, target_density=none",
        "prune_scope=layerwise, target_density=0.1",
    ]
    # Nothing differs (a group's config has no seed): the directory names.
    group = {k: v for k, v in BASE.items() if k not in ("seed", "data_seed")}
    assert reporting.comparison_labels([a, group], ["/r/one", "/r/two/"]) == ["one", "two"]
    assert reporting.comparison_labels([a, a], ["/r/x", "/s/x"]) == ["/r/x", "/s/x"]


def test_a_comparison_writes_only_into_out(tmp_path):
    k0 = _write_group(tmp_path / "runs" / "k0")
    k100 = _write_run(str(tmp_path / "runs" / "k100"), IMP[2], REINIT[2], rewind_step="100it")
    before = _tree(tmp_path / "runs")
    out = str(tmp_path / "cmp")
    written, table = reporting.write_comparison([k0, k100], out=out)
    assert written == out and _tree(tmp_path / "runs") == before
    assert sorted(os.listdir(out)) == ["accuracy_vs_density.png", "report.json", "report.md"]
    rows = _rows(table)
    assert rows[0][:4] == ["100.00", "rewind_step=0", "imp", "0"]
    assert ["80.00", "rewind_step=100it", "random_reinit", "1", "1"] in [r[:5] for r in rows]
    with open(paths.report_json_file(out)) as f:
        report = json.load(f)
    assert [r["label"] for r in report["runs"]] == ["rewind_step=0", "rewind_step=100it"]
    with pytest.raises(rundir.RunDirError, match="inside a compared run"):
        reporting.write_comparison([k0, k100], out=os.path.join(k0, "cmp"))


def test_the_default_comparison_dir_is_next_to_the_runs_never_in_them(tmp_path):
    a, b = str(tmp_path / "runs" / "a"), str(tmp_path / "runs" / "b")
    out = reporting.default_comparison_dir([a, b])
    assert os.path.dirname(out) == str(tmp_path / "runs")
    assert os.path.basename(out).startswith("comparison_")
    assert out != reporting.default_comparison_dir([b, a])  # named by the runs compared
    nested = reporting.default_comparison_dir([a, os.path.join(a, "replicate_1")])
    assert os.path.dirname(nested) == str(tmp_path / "runs")
    assert reporting.default_comparison_dir(["gs://bucket/x/a", "gs://bucket/x/b"]).startswith(
        "gs://bucket/x/comparison_"
    )


def test_the_command_line_compares_several_runs(tmp_path):
    k0 = _write_run(str(tmp_path / "k0"), IMP[1], REINIT[1])
    k100 = _write_run(str(tmp_path / "k100"), IMP[2], rewind_step="100it")
    before = _tree(tmp_path)
    proc = subprocess.run(
        [sys.executable, "-m", "lth_tf.report", f"--run_dir={k0}", f"--run_dir={k100}"],
        capture_output=True,
        text=True,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| 80.00 | rewind_step=100it | imp | 1 |" in proc.stdout
    out = reporting.default_comparison_dir([k0, k100])
    assert f"Wrote {paths.report_file(out)}" in proc.stdout
    after = _tree(tmp_path)
    assert {k: v for k, v in after.items() if k in before} == before
    assert sorted(set(after) - set(before)) == [
        os.path.join(os.path.basename(out), name)
        for name in ("accuracy_vs_density.png", "report.json", "report.md")
    ]
