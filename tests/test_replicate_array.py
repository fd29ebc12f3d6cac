"""Contracts of `--replicate=i`: one member of a replicate group, as a job of a job array.

N processes with --replicate=1..N, run at once against one root, write the group
`--replicates=N` writes in one process: the same directories, seeds, weights
and masks; the group's report aggregates whatever has finished.
"""

import os
import shutil
import subprocess
import sys

import conftest
import numpy as np
import pytest
from absl import flags

from lth_tf import files, flagdefs, imp, paths, rundir

FLAGS = flags.FLAGS

TINY_FLAGS = conftest.tiny_flags(
    rounds=1, controls="random_reinit", prune_scope=None, output_rate=None, run_name="group"
)


def _imp(root, *extra):
    return subprocess.Popen(
        [sys.executable, "-m", "lth_tf.imp", f"--root_dir={root}", *TINY_FLAGS, *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )


def _finish(proc):
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-2000:]
    return out


@pytest.fixture(scope="module")
def groups(tmp_path_factory):
    """(array group, one-process group): two jobs at once, and --replicates=2."""
    array_root = tmp_path_factory.mktemp("array")
    jobs = [_imp(array_root, "--replicate=2", "--replicates=2"), _imp(array_root, "--replicate=1")]
    for job in jobs:
        _finish(job)
    whole_root = tmp_path_factory.mktemp("whole")
    _finish(_imp(whole_root, "--replicates=2"))
    return str(array_root / "group"), str(whole_root / "group")


def _npz_files(group):
    found = []
    for top, _, names in os.walk(group):
        found += [os.path.relpath(os.path.join(top, n), group) for n in names if n.endswith(".npz")]
    return sorted(found)


def test_two_jobs_at_once_write_the_group_replicates_writes(groups):
    array, whole = groups
    names = _npz_files(whole)
    assert names == _npz_files(array)
    for i in (1, 2):  # masks and weights of every round and branch of both replicates
        prefix = f"replicate_{i}/"
        assert any(n.startswith(prefix + "round_01/masks") for n in names)
        assert any(n.startswith(prefix + "branches/") for n in names)
    for name in names:
        a, b = np.load(os.path.join(array, name)), np.load(os.path.join(whole, name))
        assert sorted(a.files) == sorted(b.files), name
        for key in a.files:
            np.testing.assert_array_equal(a[key], b[key], err_msg=f"{name}: {key}")
    for i in (1, 2):
        a, b = paths.replicate_dir(array, i), paths.replicate_dir(whole, i)
        assert rundir.load_config(a) == rundir.load_config(b)
        for branch, found in rundir.finished_rounds(b).items():
            mine = rundir.finished_rounds(a)[branch]
            assert sorted(mine) == sorted(found) == ([0, 1] if branch == "imp" else [1])
            for r, summary in found.items():
                assert mine[r]["test_accuracy"] == summary["test_accuracy"], (i, branch, r)
    seeds = [(c.seed, c.data_seed) for c in map(rundir.load_config, rundir.replicate_dirs(array))]
    assert seeds == [(0, 0), (1, 1)]


def test_the_last_job_to_finish_reports_every_finished_replicate(groups):
    array, _ = groups
    report = files.read_json(paths.report_json_file(array))
    (run,) = report["runs"]
    assert len(run["replicates"]) == 2
    imp_series = next(s for s in run["series"] if s["branch"] == "imp")
    assert [p["test_accuracy"]["n"] for p in imp_series["points"]] == [2, 2]


def test_the_group_report_aggregates_what_has_finished(groups, tmp_path):
    # Job 2 has finished, job 1 has only started (its config.json), job 3 has not started.
    array, _ = groups
    group = str(tmp_path / "group")
    shutil.copytree(paths.replicate_dir(array, 2), paths.replicate_dir(group, 2))
    os.makedirs(paths.replicate_dir(group, 1))
    shutil.copy(
        paths.config_file(paths.replicate_dir(array, 1)),
        paths.config_file(paths.replicate_dir(group, 1)),
    )
    imp.write_group_report(group)
    (run,) = files.read_json(paths.report_json_file(group))["runs"]
    assert [os.path.basename(d) for d in run["replicates"]] == ["replicate_1", "replicate_2"]
    imp_series = next(s for s in run["series"] if s["branch"] == "imp")
    assert [p["test_accuracy"]["n"] for p in imp_series["points"]] == [1, 1]
    with open(paths.report_file(group)) as f:
        assert "## Per-layer density (%) of replicate_2" in f.read()


@pytest.fixture()
def parse():
    flagdefs.define_imp_flags()

    def _parse(*argv):
        FLAGS.unparse_flags()
        FLAGS(["imp", *argv])
        return FLAGS.replicate, FLAGS.replicates

    yield _parse
    FLAGS.unparse_flags()


def test_replicate_flag_numbers_members_from_1_within_the_group(parse):
    assert parse("--replicate=3") == (3, 1)  # alone: member 3, whatever the group's size
    assert parse("--replicate=3", "--replicates=5") == (3, 5)
    assert parse("--replicate=5", "--replicates=5") == (5, 5)
    with pytest.raises(flags.IllegalFlagValueError, match="numbered from 1"):
        parse("--replicate=0")
    with pytest.raises(flags.IllegalFlagValueError, match="replicates 1..2"):
        parse("--replicate=3", "--replicates=2")
    with pytest.raises(flags.IllegalFlagValueError, match="replicates 1..1"):
        parse("--replicate=2", "--replicates=1")


def test_a_member_never_writes_into_a_single_run(tmp_path):
    single = tmp_path / "run"
    single.mkdir()
    (single / "config.json").write_text("{}")
    problem = imp._group_problem(str(single), 1, 2)
    assert "single run" in problem and "--replicate=2" in problem
    assert imp._group_problem(str(tmp_path / "new"), 1, 2) is None
    group = tmp_path / "group"
    (group / "replicate_1").mkdir(parents=True)
    assert imp._group_problem(str(group), 1, 2) is None  # a member joins an existing group
    assert "--replicate=i" in imp._group_problem(str(group), 1)
