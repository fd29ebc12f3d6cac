"""Contracts of branches (lth_tf.branching, `python -m lth_tf.branch`): experiments that
share a run's round 0 — IMP at other rewind points, learning-rate rewinding, fine-tuning,
one-shot pruning — and the stability of their subnetworks and of the controls."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from lth_tf import branching, files, linear_mode, masks, paths, reporting, rounds, rundir, train

K = 20  # the run's own rewind step (tiny_config)
OTHER_K = 10  # recorded too, by --rewind_steps
ROUNDS = 2


def _quiet(*args):
    pass


def _rdir(run_dir, r, branch=None):
    return paths.round_dir(str(run_dir), r, branch)


def _npz(rdir, which):
    return files.read_npz(paths.checkpoint_file(rdir, which))


def _metrics(rdir):
    return files.read_jsonl(paths.metrics_file(rdir))


def _cells(line: str) -> list:
    """The cells of a Markdown table line."""
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def _same(a: dict, b: dict) -> bool:
    return set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def base(tiny_config, tmp_path_factory):
    """One run: round 0 records W_k at k = 20 (its own) and at 0 and 10; 2 IMP rounds."""
    config = tiny_config(rounds=ROUNDS, eval_every="10it")
    run_dir = str(tmp_path_factory.mktemp("branches") / "run")
    rundir.open_run_dir(config, run_dir)
    e = rounds.Experiment(
        config, run_dir, checkpoint_seconds=0, log=_quiet, rewind_points=["0", f"{OTHER_K}it"]
    )
    e.run()
    return {"config": config, "run_dir": run_dir, "tmp": tmp_path_factory}


def _experiment(base):
    # A fresh process's view: a new Experiment on the finished run, nothing trained yet.
    return rounds.Experiment(base["config"], base["run_dir"], checkpoint_seconds=0, log=_quiet)


def _branch(base, kind, **params):
    e = _experiment(base)
    b = branching.Branch(e, branching.make_spec(e, kind, **params))
    return b, b.run()


@pytest.fixture(scope="module")
def rewind_branch(base):
    return _branch(base, "rewind", rewind_step=f"{OTHER_K}it")


# ---- round 0 records several W_k -----------------------------------------------------------


def test_round_0_records_every_rewind_point_and_keeps_rewind_npz_for_its_own_k(base):
    r0 = _rdir(base["run_dir"], 0)
    assert files.exists(paths.checkpoint_file(r0, "rewind"))  # the run's own k, as before
    assert files.exists(paths.rewind_file(r0, OTHER_K))
    # W_0 is the initialisation itself: start.npz, not written twice.
    assert not files.exists(paths.rewind_file(r0, 0))
    assert _same(_experiment(base).dense_weights_at(0), _npz(r0, "start"))
    assert not files.exists(paths.rewind_file(r0, K))  # no duplicate of rewind.npz


def test_w_k_of_a_rewind_point_is_bit_equal_to_a_separate_run_with_that_k(base, tiny_config):
    config = tiny_config(rounds=0, eval_every="10it", rewind_step=f"{OTHER_K}it")
    run_dir = str(base["tmp"].mktemp("separate") / "run")
    rundir.open_run_dir(config, run_dir)
    rounds.Experiment(config, run_dir, checkpoint_seconds=0, log=_quiet).run()
    separate = _npz(_rdir(run_dir, 0), "rewind")
    recorded = files.read_npz(paths.rewind_file(_rdir(base["run_dir"], 0), OTHER_K))
    assert _same(separate, recorded)


def test_rewind_points_do_not_change_the_run_identity(base, tiny_config):
    # Same config, same directory: imp with other --rewind_steps resumes the same run.
    e = rounds.Experiment(
        base["config"], base["run_dir"], log=_quiet, rewind_points=[f"{OTHER_K}it", "30it"]
    )
    rundir.open_run_dir(base["config"], base["run_dir"])  # no RunDirError
    e.dense_round()
    assert e.trained == []


@pytest.mark.parametrize("point", ["40it", "5ep"])
def test_a_rewind_point_outside_the_schedule_is_refused(base, point):
    with pytest.raises(ValueError, match="rewind_steps"):
        rounds.Experiment(base["config"], base["run_dir"], log=_quiet, rewind_points=[point])


def test_an_unreachable_rewind_point_is_refused(base, tiny_config):
    config = tiny_config(steps_per_execution=4, eval_every="20it")
    with pytest.raises(ValueError, match="steps_per_execution"):
        rounds.Experiment(config, base["run_dir"], log=_quiet, rewind_points=["10it"])


# ---- rewind: IMP from another k --------------------------------------------------------------


def test_a_branch_reuses_round_0_and_trains_only_its_rounds(rewind_branch):
    b, summaries = rewind_branch
    assert b.trained == [(b.name, r) for r in range(1, ROUNDS + 1)]
    assert b.name == f"rewind_{OTHER_K}it"
    assert [s["start_step"] for s in summaries] == [OTHER_K] * ROUNDS


def test_rewind_branch_has_its_own_masks_from_its_own_rounds(base, rewind_branch):
    b, _ = rewind_branch
    e, run_dir = b.experiment, base["run_dir"]
    first = files.read_npz(paths.masks_file(_rdir(run_dir, 1, b.name)))
    assert _same(first, e.masks_after(_rdir(run_dir, 0)))  # round 1: from the run's round 0
    second = files.read_npz(paths.masks_file(_rdir(run_dir, 2, b.name)))
    assert _same(second, e.masks_after(_rdir(run_dir, 1, b.name)))  # then its own rounds
    assert not _same(second, files.read_npz(paths.masks_file(_rdir(run_dir, 2))))
    w_k = files.read_npz(paths.rewind_file(_rdir(run_dir, 0), OTHER_K))
    start = _npz(_rdir(run_dir, 2, b.name), "start")
    for name, m in second.items():
        np.testing.assert_array_equal(start[f"{name}/kernel"], w_k[f"{name}/kernel"] * m)


def test_a_branch_rerun_trains_nothing(base, rewind_branch):
    b, summaries = _branch(base, "rewind", rewind_step=f"{OTHER_K}it")
    assert b.trained == []
    assert summaries == rewind_branch[1]


def test_a_k_round_0_did_not_record_is_trained_from_w_0_and_says_so(base):
    b, _ = _branch(base, "rewind", rewind_step="30it", num_rounds=1)
    assert b.trained == [("dense_to_k", 30), ("rewind_30it", 1)]  # no ("imp", 0)
    assert files.exists(paths.rewind_point_file(base["run_dir"], 30))


# ---- retraining modes ------------------------------------------------------------------------


def test_lr_rewind_keeps_final_weights_and_replays_the_schedule_from_k(base):
    b, summaries = _branch(base, "lr_rewind")
    run_dir = base["run_dir"]
    assert b.name == f"lr_rewind_{K}it" and b.trained == [(b.name, 1), (b.name, 2)]
    for r in (1, 2):
        prev = _rdir(run_dir, r - 1, b.name if r > 1 else None)
        start = _npz(_rdir(run_dir, r, b.name), "start")
        round_masks = files.read_npz(paths.masks_file(_rdir(run_dir, r, b.name)))
        final = _npz(prev, "final")
        for name, m in round_masks.items():
            np.testing.assert_array_equal(start[f"{name}/kernel"], final[f"{name}/kernel"] * m)
        # The learning rate and steps of the IMP round's k..T, period by period.
        logged = [(m["step"], m["lr"]) for m in _metrics(_rdir(run_dir, r, b.name))]
        imp = [(m["step"], m["lr"]) for m in _metrics(_rdir(run_dir, r))]
        assert logged == imp and logged[0][0] > K
    assert summaries[0]["start_step"] == K


def test_lr_rewind_replays_a_decaying_schedule_from_k(tiny_config, tmp_path):
    config = tiny_config(
        rounds=1, eval_every="10it", optimizer="sgd", lr=0.1, lr_drops=("30it",), lr_gamma=0.1
    )
    run_dir = str(tmp_path / "run")
    rundir.open_run_dir(config, run_dir)
    e = rounds.Experiment(config, run_dir, checkpoint_seconds=0, log=_quiet)
    e.dense_round()
    b = branching.Branch(e, branching.make_spec(e, "lr_rewind", num_rounds=1))
    b.run()
    lrs = [(m["step"], m["lr"]) for m in _metrics(_rdir(run_dir, 1, b.name))]
    assert lrs == [(30, pytest.approx(0.1)), (40, pytest.approx(0.01))]


def test_finetune_uses_the_constant_rate_for_its_budget_from_final_weights(base):
    b, summaries = _branch(base, "finetune", finetune_lr=1e-4, finetune_steps="10it", num_rounds=1)
    run_dir = base["run_dir"]
    assert b.name == "finetune_lr0.0001_10it"
    assert b.trained == [(b.name, 1)]
    rdir = _rdir(run_dir, 1, b.name)
    assert [m["lr"] for m in _metrics(rdir)] == [pytest.approx(1e-4)]
    assert (summaries[0]["start_step"], summaries[0]["end_step"]) == (0, 10)
    start, final = _npz(rdir, "start"), _npz(_rdir(run_dir, 0), "final")
    for name, m in files.read_npz(paths.masks_file(rdir)).items():
        np.testing.assert_array_equal(start[f"{name}/kernel"], final[f"{name}/kernel"] * m)


def test_finetune_defaults_to_the_schedules_last_rate_and_the_rewinding_budget(base):
    e = _experiment(base)
    spec = branching.make_spec(e, "finetune", num_rounds=1)
    assert spec.finetune_lr == pytest.approx(base["config"].lr)  # LeNet: a constant Adam rate
    assert spec.finetune_steps == 40 - K
    assert spec.name == f"finetune_lr{base['config'].lr:g}_{40 - K}it"  # the float32 rate, short


# ---- branch names ----------------------------------------------------------------------------


def test_finetune_rates_equal_to_6_significant_digits_get_their_own_branches(base):
    a = branching.Spec("finetune", 0, rounds=1, finetune_lr=0.0123456, finetune_steps=10)
    b = dataclasses.replace(a, finetune_lr=0.01234564)
    assert (a.name, b.name) == ("finetune_lr0.0123456_10it", "finetune_lr0.01234564_10it")
    first, _ = _branch(base, "finetune", finetune_lr=0.0123456, finetune_steps="10it", num_rounds=1)
    second, _ = _branch(
        base, "finetune", finetune_lr=0.01234564, finetune_steps="10it", num_rounds=1
    )  # not refused: another branch, beside the first
    assert second.trained == [(second.name, 1)]
    for branch, lr in ((first, 0.0123456), (second, 0.01234564)):
        assert files.read_json(paths.branch_file(base["run_dir"], branch.name))["finetune_lr"] == lr


def _copy_of(base, name):
    import shutil

    copy = dict(base, run_dir=str(base["tmp"].mktemp(name) / "run"))
    shutil.copytree(base["run_dir"], copy["run_dir"])
    return copy


def test_a_branch_named_by_an_older_lth_tf_still_resolves(base):
    copy = _copy_of(base, "legacy")
    lr = 0.0123456789  # older names: 6 significant digits
    b, summaries = _branch(copy, "finetune", finetune_lr=lr, finetune_steps="10it", num_rounds=1)
    assert b.name == "finetune_lr0.0123456789_10it"
    legacy = "finetune_lr0.0123457_10it"
    os.rename(paths.branch_dir(copy["run_dir"], b.name), paths.branch_dir(copy["run_dir"], legacy))
    described = files.read_json(paths.branch_file(copy["run_dir"], legacy))
    with open(paths.branch_file(copy["run_dir"], legacy), "w") as f:  # as the older one wrote it
        json.dump({**described, "name": legacy}, f)
    again, resumed = _branch(copy, "finetune", finetune_lr=lr, finetune_steps="10it", num_rounds=1)
    assert again.name == legacy and again.trained == []  # found, nothing retrained
    assert resumed == summaries
    # Another rate that the older name would have shared gets its own branch.
    other = branching.Branch(
        _experiment(copy),
        branching.make_spec(
            _experiment(copy),
            "finetune",
            finetune_lr=0.01234567,
            finetune_steps="10it",
            num_rounds=1,
        ),
    )
    assert other.name == "finetune_lr0.01234567_10it"


def test_a_branch_directory_holding_another_branch_is_kept_and_the_advice_says_so(base):
    copy = _copy_of(base, "other")
    e = _experiment(copy)
    spec = branching.make_spec(e, "rewind", rewind_step=f"{OTHER_K}it", num_rounds=1)
    files.write_json(
        paths.branch_file(copy["run_dir"], spec.name),
        {**spec.description(), "retraining": "lr_rewind"},
    )
    before = _tree(paths.branch_dir(copy["run_dir"], spec.name))
    with pytest.raises(branching.BranchError) as info:
        branching.Branch(e, spec).run()
    message = str(info.value)
    assert paths.branch_file(copy["run_dir"], spec.name) in message
    assert "retraining: the file has 'lr_rewind', this branch 'weight_rewind'" in message
    assert "Nothing was changed" in message and "Delete" not in message
    assert _tree(paths.branch_dir(copy["run_dir"], spec.name)) == before


def _tree(directory) -> dict:
    out = {}
    for dirpath, _, names in os.walk(directory):
        for name in names:
            with open(os.path.join(dirpath, name), "rb") as f:
                out[os.path.join(dirpath, name)] = f.read()
    return out


# ---- one-shot --------------------------------------------------------------------------------


def _oneshot(base, densities):
    e = _experiment(base)
    out = []
    for spec in branching.make_specs(e, "oneshot", densities=densities):
        b = branching.Branch(e, spec)
        out.append((b, b.run()[0]))
    return out


@pytest.fixture(scope="module")
def oneshot_branches(base):
    # 0.5, and IMP round 2's density (fc1 and fc2 one global pool; output_rate 0).
    imp_2 = files.read_json(paths.summary_file(_rdir(base["run_dir"], 2)))["density"]
    return _oneshot(base, [0.5, imp_2])


def test_oneshot_makes_one_branch_per_density_named_by_the_density_reached(base, oneshot_branches):
    run_dir = base["run_dir"]
    w_k = _npz(_rdir(run_dir, 0), "rewind")
    total = sum(_experiment(base).kernel_sizes().values())
    for (b, summary), asked in zip(oneshot_branches, (0.5, None), strict=True):
        reached = b.spec.reached
        # 49,200 weights: 3 decimals of % tell every number of survivors apart.
        assert b.name == f"oneshot_{K}it_d{100 * reached:.3f}" and (b.name, 1) in b.trained
        m = files.read_npz(paths.masks_file(_rdir(run_dir, 1, b.name)))
        assert int(sum(v.sum() for v in m.values())) == round(reached * total)
        assert summary["density"] == pytest.approx(reached, abs=1e-6)
        if asked is not None:
            assert abs(reached - asked) <= 1 / total
        assert set(m) == {"fc1", "fc2"}  # output_rate 0 here: the output layer is not masked
        assert summary["start_step"] == K
        start = _npz(_rdir(run_dir, 1, b.name), "start")
        for name, mask in m.items():
            np.testing.assert_array_equal(start[f"{name}/kernel"], w_k[f"{name}/kernel"] * mask)
        described = files.read_json(paths.branch_file(run_dir, b.name))
        assert (described["densities"], described["density_reached"]) == (
            [b.spec.densities[0]],
            reached,
        )
        # Its sparsity report has the per-layer densities.
        layers = files.read_json(paths.sparsity_file(_rdir(run_dir, 1, b.name)))["layers"]
        assert set(layers) == set(m)
    # Asked again, or with another density: only the new one trains (one Experiment).
    (again, _), (more, _) = _oneshot(base, [0.5, 0.02])
    assert again.name == oneshot_branches[0][0].name
    assert more.trained == [(more.name, 1)]


def test_oneshot_at_an_imp_rounds_density_has_its_layer_densities(base, oneshot_branches):
    run_dir = base["run_dir"]
    b, summary = oneshot_branches[1]
    assert b.spec.imp_rounds == 2  # IMP round 2's density is where IMP is after 2 rounds
    imp = files.read_npz(paths.masks_file(_rdir(run_dir, 2)))
    one = files.read_npz(paths.masks_file(_rdir(run_dir, 1, b.name)))
    pool = ("fc1", "fc2")  # global scope: one threshold, IMP's pool survivors
    assert sum(one[n].sum() for n in pool) == sum(imp[n].sum() for n in pool)
    # The report: a row of its own, after IMP round 2's (its density), with the difference
    # to it; and a per-layer table.
    results = rundir.finished_rounds(run_dir)
    lines = reporting.accuracy_table(results).splitlines()
    header, rows = _cells(lines[0]), [_cells(line) for line in lines[2:]]
    where = {(row[1], row[2]): i for i, row in enumerate(rows)}  # (series, round) -> row
    mine, imp_2 = rows[where[(b.name, "1")]], rows[where[("imp", "2")]]
    assert where[(b.name, "1")] > where[("imp", "2")] and mine[0] == imp_2[0]
    final = header.index("final test acc %")
    assert mine[final].split()[0] == f"{100 * summary['test_accuracy']:.2f}"
    delta = 100 * (summary["test_accuracy"] - results["imp"][2]["test_accuracy"])
    assert mine[header.index("Δ final vs IMP (points)")] == f"{delta:+.2f}"
    reporting.write_report(run_dir)
    with open(paths.report_file(run_dir)) as f:
        report = f.read()
    assert "## One-shot pruning: per-layer density (%)" in report
    section = report.split("## One-shot pruning")[1]
    header = next(line for line in section.splitlines() if line.startswith("| layer | size |"))
    assert b.name in header
    assert "| fc1 | 19200 |" in section and "| IMP rounds matched |" in section


def test_oneshot_branches_of_one_k_are_one_series_and_other_names_their_own():
    assert reporting.series_of(f"oneshot_{K}it_d50.000") == f"oneshot_{K}it_d*"
    assert reporting.series_of("oneshot_0it_d3.5184") == "oneshot_0it_d*"
    for name in (f"oneshot_{K}it", f"rewind_{K}it", "random_prune", "finetune_lr0.0001_10it"):
        assert reporting.series_of(name) == name


def test_a_oneshot_branch_written_before_still_reports(base, oneshot_branches):
    # Before: oneshot_<k>it, one round per density, no density in the name.
    run_dir = base["run_dir"]
    b, _ = oneshot_branches[0]
    old = "oneshot_20it"
    os.makedirs(paths.branch_dir(run_dir, old))
    files.write_json(
        paths.branch_file(run_dir, old),
        {
            "name": old,
            "kind": "oneshot",
            "masks": "oneshot",
            "retraining": "weight_rewind",
            "rewind_step": K,
            "densities": [0.5],
            "finetune_lr": None,
            "finetune_steps": None,
        },
    )
    shutil.copytree(_rdir(run_dir, 1, b.name), _rdir(run_dir, 1, old))
    try:
        assert old in rundir.finished_rounds(run_dir)
        reporting.write_report(run_dir)
        with open(paths.report_file(run_dir)) as f:
            report = f.read()
        assert f"{old} r1" in report.split("## One-shot pruning")[1]
        assert f"| {old} |" in report  # a series of the accuracy table
        assert linear_mode.Stability(run_dir, log=_quiet).masks_of(1, old)
    finally:
        shutil.rmtree(paths.branch_dir(run_dir, old))


# ---- refusals --------------------------------------------------------------------------------


def test_a_branch_cannot_change_what_round_0_computed(base):
    config = base["config"]
    with pytest.raises(branching.BranchError, match="batch_size: run has 32, you asked for 64"):
        branching.check_shares_round_0(config, {"batch_size": 64, "rewind_step": "10it"})
    with pytest.raises(branching.BranchError, match="seed"):
        branching.check_shares_round_0(config, {"seed": 3})
    # The run's own values (a flagfile), k and rounds are fine.
    branching.check_shares_round_0(
        config, {"arch": config.arch, "training_steps": "40", "rounds": 9, "rewind_step": "5it"}
    )


@pytest.mark.parametrize(
    "kind, params, message",
    [
        ("rewind", {}, "needs --rewind_step"),
        ("rewind", {"rewind_step": f"{K}it"}, "the run's own rewind step"),
        ("rewind", {"rewind_step": "40it"}, "outside the run's schedule"),
        ("oneshot", {}, "needs --densities"),
        ("oneshot", {"densities": [0.5], "num_rounds": 2}, "--rounds is for the iterative"),
        ("oneshot", {"densities": [0.5, 0.2]}, "One density per one-shot branch"),
        ("oneshot", {"densities": [1e-6]}, "--densities: Density 1e-06 cannot be reached"),
        ("lr_rewind", {"densities": [0.5]}, "--densities is for --kind=oneshot"),
        ("finetune", {"rewind_step": "10it"}, "not --kind=finetune"),
        ("lr_rewind", {"finetune_lr": 0.1}, "--finetune_lr is for --kind=finetune"),
        ("prune_more", {}, "Known kinds: rewind, lr_rewind, finetune, oneshot"),
    ],
)
def test_bad_branches_are_refused_with_what_to_do(base, kind, params, message):
    with pytest.raises(branching.BranchError, match=message):
        branching.make_spec(_experiment(base), kind, **params)


def test_a_run_without_round_0_is_refused(tiny_config, tmp_path):
    config = tiny_config()
    rundir.open_run_dir(config, str(tmp_path / "run"))
    e = rounds.Experiment(config, str(tmp_path / "run"), log=_quiet)
    with pytest.raises(branching.BranchError, match="no finished round 0"):
        branching.make_spec(e, "lr_rewind", num_rounds=1)


# ---- stability of a branch's mask and of the controls ----------------------------------------


def test_stability_of_a_branch_mask_and_of_the_controls(base, rewind_branch):
    b, _ = rewind_branch
    run_dir = base["run_dir"]
    a = linear_mode.Stability(run_dir, num_alphas=3, repeats=1, log=_quiet)
    own = a.point(1, OTHER_K, branch=b.name)
    rand = a.point(1, OTHER_K, subnetwork="random_prune", branch=b.name)
    reinit = a.point(1, K, subnetwork="random_reinit")
    imp_masks = files.read_npz(paths.masks_file(_rdir(run_dir, 1, b.name)))
    assert own["density"] == rand["density"] == pytest.approx(masks.density(imp_masks))
    assert (own["subnetwork"], own["branch"]) == ("imp", b.name)
    assert "pruning_distance" in own  # the branch trained this subnetwork from OTHER_K
    for point, series in (
        (own, b.name),
        (rand, f"{b.name}.random_prune"),
        (reinit, "random_reinit"),
    ):
        out = paths.stability_point_dir(run_dir, 1, point["rewind_step"], series)
        assert files.exists(paths.join(out, "interpolation.json")), series
    copy = paths.stability_copy_dir(run_dir, 1, OTHER_K, 0, 1, f"{b.name}.random_prune")
    used = files.read_npz(paths.masks_file(copy))
    assert not _same(used, imp_masks)
    assert masks.report(used)["layers"].keys() == masks.report(imp_masks)["layers"].keys()
    table = reporting.stability_table(run_dir)
    assert f"{b.name} / random_prune" in table and "| random_reinit |" in table


# ---- reports and the command line ------------------------------------------------------------


def test_the_report_shows_branches_as_series(base, rewind_branch):
    _branch(base, "lr_rewind")
    results = rundir.finished_rounds(base["run_dir"])
    assert {"imp", f"rewind_{OTHER_K}it", f"lr_rewind_{K}it"} <= set(results)
    text = reporting.write_report(base["run_dir"])
    assert f"| rewind_{OTHER_K}it |" in text
    with open(paths.report_file(base["run_dir"])) as f:
        report = f.read()
    assert text in report and f"| lr_rewind_{K}it |" in text  # one row per round of each


def test_the_command_line_refuses_another_batch_size_and_lists_kinds(base):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    argv = [sys.executable, "-m", "lth_tf.branch", f"--run_dir={base['run_dir']}"]
    result = subprocess.run(
        [*argv, "--kind=lr_rewind", "--batch_size=64"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "batch_size: run has 32, you asked for 64" in result.stderr
    assert "Traceback" not in result.stderr
    result = subprocess.run(
        [*argv, "--kind=nonsense"], capture_output=True, text=True, timeout=300, env=env
    )
    assert "Known branch kinds: rewind, lr_rewind, finetune, oneshot." in result.stderr


def test_every_rewind_point_is_recorded_off_the_automatic_execution_grid(tiny_config, tmp_path):
    # The automatic steps per execution of this tiny LeNet is 20 (one evaluation period):
    # W_5 and W_15 lie between its executions, after W_0 is recorded at the start.
    config = tiny_config(rounds=0, eval_every="20it")
    reference = str(tmp_path / "reference")
    e = rounds.Experiment(config, reference, checkpoint_seconds=0, log=_quiet)
    assert train.execution_steps(e.model, config, e.schedule) == 20
    run_dir = str(tmp_path / "run")
    rounds.Experiment(
        config, run_dir, checkpoint_seconds=0, log=_quiet, rewind_points=["0", "5it", "15it"]
    ).run()
    r0 = paths.round_dir(run_dir, 0)
    for k in (5, 15):
        assert files.exists(paths.rewind_file(r0, k)), f"W_{k} was not recorded"
    # ... and recording them left the trajectory unchanged.
    e.run()
    assert _same(_npz(r0, "final"), _npz(paths.round_dir(reference, 0), "final"))
    # They hold W_k: what k steps of training from W_0 give (the reference run, which did
    # not record them, trains the dense network 0..k for them).
    recorded = {k: files.read_npz(paths.rewind_file(r0, k)) for k in (5, 15)}
    for k in (5, 15):
        trained = e.dense_weights_at(k)
        assert e.trained[-1] == ("dense_to_k", k)
        assert set(recorded[k]) == set(trained)
        for key in trained:
            np.testing.assert_allclose(recorded[k][key], trained[key], rtol=1e-5, atol=1e-6)
    assert not _same(recorded[5], _npz(r0, "start")) and not _same(recorded[5], recorded[15])
