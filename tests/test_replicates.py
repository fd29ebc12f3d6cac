"""Contracts of `--replicates=N`: independent seeds, one group directory, resumable, aggregated."""

import os
import subprocess
import sys

import conftest

from lth_tf import files, imp, paths, rundir

TINY_FLAGS = conftest.tiny_flags(
    rewind_step=0, rounds=1, controls="", prune_scope=None, output_rate=None, run_name="group"
)


def test_replicate_i_shifts_both_seeds_by_i_minus_1_and_nothing_else(tiny_config):
    base = tiny_config(seed=7, data_seed=3)
    configs = imp.replicate_configs(base, 3)
    assert configs[0] == base  # replicate 1 is the single run of the same flags
    assert [(c.seed, c.data_seed) for c in configs] == [(7, 3), (8, 4), (9, 5)]
    for c in configs[1:]:
        assert set(c.differences(base)) == {"seed", "data_seed"}


def _imp(root, *extra):
    return subprocess.run(
        [sys.executable, "-m", "lth_tf.imp", f"--root_dir={root}", *TINY_FLAGS, *extra],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )


def test_replicates_run_into_one_group_resume_and_extend_and_are_aggregated(tmp_path):
    first = _imp(tmp_path, "--replicates=2")
    assert first.returncode == 0, first.stderr[-2000:]
    group = tmp_path / "group"
    seeds = []
    for i in (1, 2):
        rdir = paths.replicate_dir(str(group), i)
        config = rundir.load_config(rdir)
        seeds.append((config.seed, config.data_seed))
        assert files.exists(paths.summary_file(paths.round_dir(rdir, 1)))
    assert seeds == [(0, 0), (1, 1)]
    report = files.read_json(str(group / "report.json"))
    (run,) = report["runs"]
    assert len(run["replicates"]) == 2
    imp_series = next(s for s in run["series"] if s["branch"] == "imp")
    assert [p["test_accuracy"]["n"] for p in imp_series["points"]] == [2, 2]

    summary_1 = paths.summary_file(paths.round_dir(paths.replicate_dir(str(group), 1), 1))
    before = os.stat(summary_1).st_mtime_ns
    more = _imp(tmp_path, "--replicates=3")
    assert more.returncode == 0, more.stderr[-2000:]
    assert os.stat(summary_1).st_mtime_ns == before  # finished replicates are not retrained
    assert files.exists(paths.config_file(paths.replicate_dir(str(group), 3)))
    report = files.read_json(str(group / "report.json"))
    assert len(report["runs"][0]["replicates"]) == 3


def test_a_single_run_and_a_replicate_group_never_share_a_directory(tmp_path):
    single = tmp_path / "run"
    single.mkdir()
    (single / "config.json").write_text("{}")
    problem = imp._group_problem(str(single), 3)
    assert "single run" in problem and "--run_name" in problem
    group = tmp_path / "group"
    (group / "replicate_1").mkdir(parents=True)
    problem = imp._group_problem(str(group), 1)
    assert "replicate group" in problem and "--replicates" in problem
    assert imp._group_problem(str(tmp_path / "new"), 1) is None
    assert imp._group_problem(str(tmp_path / "new"), 4) is None
