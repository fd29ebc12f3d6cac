"""Contracts of IMP with rewinding (lth_tf.rounds): densities, masks, rewinding, controls, resume."""

import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from lth_tf import files, masks, paths, rounds, rundir, sparsity, train
from lth_tf.keras import tf

ROUNDS = 3
CONTROLS = ("random_reinit", "random_prune")
SUMMARY_KEYS = {
    "round",
    "density",
    "test_accuracy",
    "best_validation_accuracy",
    "best_validation_step",
    "steps",
    "wall_seconds",
}


def _quiet(*args):
    pass


def _experiment(config, run_dir):
    rundir.open_run_dir(config, str(run_dir))
    return rounds.Experiment(config, str(run_dir), checkpoint_seconds=0, log=_quiet)


def _rdir(run_dir, r, branch=None):
    return paths.round_dir(str(run_dir), r, branch)


def _npz(run_dir, r, which, branch=None):
    return files.read_npz(paths.checkpoint_file(_rdir(run_dir, r, branch), which))


def _masks(run_dir, r, branch=None):
    return files.read_npz(paths.masks_file(_rdir(run_dir, r, branch)))


def _json(path):
    return files.read_json(path)


def _all_rounds():
    """(round, branch) of every trained round of the main run; branch None is IMP."""
    out = [(r, None) for r in range(ROUNDS + 1)]
    out += [(r, c) for r in range(1, ROUNDS + 1) for c in CONTROLS]
    return out


@pytest.fixture(scope="module")
def main_run(tiny_config, tmp_path_factory):
    """LeNet on 8x8 inputs: 40 steps, rewind to step 20, 3 IMP rounds, both controls."""
    config = tiny_config(controls=CONTROLS)
    run_dir = tmp_path_factory.mktemp("imp") / "run"
    experiment = _experiment(config, run_dir)
    summaries = experiment.run()
    return config, run_dir, experiment, summaries


@pytest.fixture(scope="module")
def k0_run(tiny_config, tmp_path_factory):
    """Like main_run's first 20 steps, with k = 0 and the output layer pruned too."""
    config = tiny_config(training_steps="20it", rewind_step="0", rounds=1, output_rate=1.0)
    run_dir = tmp_path_factory.mktemp("imp") / "k0"
    experiment = _experiment(config, run_dir)
    summaries = experiment.run()
    return config, run_dir, experiment, summaries


# ---- densities and files ---------------------------------------------------------------


def test_run_trains_round_0_then_each_imp_round_and_its_controls_once(main_run):
    _, _, experiment, summaries = main_run
    expected = [("imp", 0)]
    for r in range(1, ROUNDS + 1):
        expected += [("imp", r), *((c, r) for c in CONTROLS)]
    assert experiment.trained == expected
    assert [(s["branch"], s["round"]) for s in summaries] == expected


def test_density_of_imp_round_r_is_0_8_pow_r_in_summary_and_sparsity_json(main_run):
    _, run_dir, _, _ = main_run
    for r in range(ROUNDS + 1):
        summary = _json(paths.summary_file(_rdir(run_dir, r)))
        report = _json(paths.sparsity_file(_rdir(run_dir, r)))
        assert summary["round"] == r
        assert summary["density"] == pytest.approx(0.8**r, abs=1e-3), r
        assert report["density"] == pytest.approx(summary["density"], abs=1e-6)
        assert masks.density(_masks(run_dir, r)) == pytest.approx(summary["density"], abs=1e-6)
        # LeNet's recipe keeps the output layer dense: fc1 and fc2 are pruned.
        assert sorted(report["layers"]) == ["fc1", "fc2"]
        assert report["size"] == 8 * 8 * 300 + 300 * 100


def test_summary_json_has_the_documented_keys(main_run):
    config, run_dir, _, _ = main_run
    for r, branch in _all_rounds():
        summary = _json(paths.summary_file(_rdir(run_dir, r, branch)))
        assert set(summary) >= SUMMARY_KEYS, (r, branch)
        assert summary["steps"] == (40 if r == 0 else 20)
        assert 0 <= summary["test_accuracy"] <= 1
        assert 0 <= summary["best_validation_accuracy"] <= 1
        assert summary["best_validation_step"] in (20, 40)
        assert summary["wall_seconds"] >= 0
        # LeNet's recipe evaluates the test set every period: the paper's figure of merit
        # (test accuracy at the early-stopping iteration) is in the summary.
        metrics = files.read_jsonl(paths.metrics_file(_rdir(run_dir, r, branch)))
        at = {m["step"]: m["test_accuracy"] for m in metrics}
        assert summary["test_accuracy_at_early_stopping"] == at[summary["early_stopping_step"]]
        assert at[max(at)] == pytest.approx(summary["test_accuracy"], abs=1e-6)


def test_imp_mask_of_round_r_plus_1_prunes_the_smallest_surviving_final_weights_of_round_r(
    main_run,
):
    _, run_dir, _, _ = main_run
    for r in range(ROUNDS):
        old, new = _masks(run_dir, r), _masks(run_dir, r + 1)
        masks.check_subset(new, old)
        final = _npz(run_dir, r, "final")
        survivors = np.concatenate([np.abs(final[f"{n}/kernel"][new[n] == 1]) for n in new])
        dropped = np.concatenate(
            [np.abs(final[f"{n}/kernel"][(new[n] == 0) & (old[n] == 1)]) for n in new]
        )
        assert dropped.size == round(0.2 * sum(int(m.sum()) for m in old.values()))
        assert survivors.min() >= dropped.max()  # one global threshold over fc1 and fc2


def test_pruned_weights_are_exactly_zero_in_every_saved_checkpoint(main_run):
    _, run_dir, _, _ = main_run
    for r, branch in _all_rounds():
        m = _masks(run_dir, r, branch)
        for which in ("start", "final"):
            weights = _npz(run_dir, r, which, branch)
            for name, mask in m.items():
                pruned = weights[f"{name}/kernel"][mask == 0]
                assert np.all(pruned == 0), (r, branch, which, name)
            # Survivors are live weights, not zeros.
            assert np.count_nonzero(weights["fc1/kernel"]) == int(m["fc1"].sum())


def test_a_rounds_weight_files_keep_no_bitmap_but_its_masks_npz(main_run):
    # Where a kernel's weights are is stored once, in masks.npz; a start.npz that is W_k
    # under its masks (IMP, random_prune) takes its values from W_k too
    # (lth_tf.files.write_npz's references).
    _, run_dir, _, _ = main_run
    for r, branch in _all_rounds():
        for which in ("start", "final"):
            if (r, which) == (0, "start"):
                continue  # W_0: a file others refer to holds all its arrays
            path = paths.checkpoint_file(_rdir(run_dir, r, branch), which)
            with np.load(path) as data:
                stored = set(data.files)
            for name in _masks(run_dir, r, branch):
                assert f"__sparse__/{name}/kernel/where" not in stored, (r, branch, which)
                from_w_k = which == "start" and branch != "random_reinit"
                assert (f"__sparse__/{name}/kernel/planes" in stored) != from_w_k


def test_final_weights_of_round_r_plus_1_are_zero_wherever_round_r_mask_is_zero(main_run):
    _, run_dir, _, _ = main_run
    for r in range(ROUNDS):
        old = _masks(run_dir, r)
        final = _npz(run_dir, r + 1, "final")
        for name, mask in old.items():
            assert np.all(final[f"{name}/kernel"][mask == 0] == 0), (r, name)


def test_the_model_kernel_variables_themselves_are_zero_where_masked(main_run):
    # Not just the saved, masked copies: the variables the optimizer updated.
    _, run_dir, experiment, _ = main_run
    last = _masks(run_dir, ROUNDS, CONTROLS[-1])  # the branch trained last
    live = sparsity.get_masks(experiment.model)
    for name, wrapper in sparsity.wrappers(experiment.model).items():
        np.testing.assert_array_equal(live[name], last[name])
        kernel = wrapper.layer.kernel.numpy()
        assert np.all(kernel[last[name] == 0] == 0), name


# ---- rewinding ---------------------------------------------------------------------------


def test_round_0_starts_from_the_seeded_initialisation(main_run):
    _, run_dir, experiment, _ = main_run
    start = _npz(run_dir, 0, "start")
    assert set(start) == set(experiment.initial_weights)
    for key, value in experiment.initial_weights.items():
        np.testing.assert_array_equal(start[key], value, err_msg=key)


def test_imp_round_starts_from_rewind_weights_times_mask(main_run):
    _, run_dir, _, _ = main_run
    rewind = _npz(run_dir, 0, "rewind")
    for r in range(1, ROUNDS + 1):
        start, m = _npz(run_dir, r, "start"), _masks(run_dir, r)
        assert set(start) == set(rewind)
        for key in rewind:
            layer, weight = key.split("/")
            expected = rewind[key] * m[layer] if weight == "kernel" and layer in m else rewind[key]
            np.testing.assert_array_equal(start[key], expected, err_msg=f"round {r} {key}")


def test_rewind_npz_is_the_weights_after_k_steps(main_run, k0_run):
    # k0_run trains the same network on the same data for exactly k = 20 steps.
    _, run_dir, _, _ = main_run
    _, k0_dir, _, _ = k0_run
    rewind = _npz(run_dir, 0, "rewind")
    after_k = _npz(k0_dir, 0, "final")
    assert set(rewind) == set(after_k)
    for key in rewind:
        np.testing.assert_allclose(rewind[key], after_k[key], rtol=0, atol=1e-6, err_msg=key)
    start = _npz(run_dir, 0, "start")
    assert not np.allclose(rewind["fc1/kernel"], start["fc1/kernel"])
    assert not np.allclose(rewind["fc1/kernel"], _npz(run_dir, 0, "final")["fc1/kernel"])


def test_rewind_to_step_0_rewinds_to_the_initialisation(k0_run):
    _, k0_dir, experiment, summaries = k0_run
    # W_0 is round 0's start.npz: no rewind.npz repeats it.
    r0 = _rdir(k0_dir, 0)
    assert not files.exists(paths.checkpoint_file(r0, "rewind"))
    start, rewind = _npz(k0_dir, 0, "start"), experiment.rewind_weights()
    for key in start:
        np.testing.assert_array_equal(rewind[key], start[key], err_msg=key)
    # Round 1 starts from W_0 under its masks (+0.0 where pruned).
    masks1, start1 = _masks(k0_dir, 1), _npz(k0_dir, 1, "start")
    for name, mask in masks1.items():
        expected = np.where(mask != 0, start[f"{name}/kernel"], np.float32(0))
        assert start1[f"{name}/kernel"].tobytes() == expected.tobytes(), name
    # Round 1 trains the whole schedule again, from step 0.
    assert summaries[1]["start_step"] == 0 and summaries[1]["steps"] == 20


def test_global_pruning_with_output_rate_1_prunes_the_output_layer_in_the_same_pool(k0_run):
    _, k0_dir, experiment, summaries = k0_run
    assert sorted(experiment.layers) == ["fc1", "fc2", "output"]
    m0, m1 = _masks(k0_dir, 0), _masks(k0_dir, 1)
    assert sorted(m1) == ["fc1", "fc2", "output"]
    assert masks.density(m1) == pytest.approx(0.8, abs=1e-4)
    assert summaries[1]["density"] == pytest.approx(0.8, abs=1e-4)
    final = _npz(k0_dir, 0, "final")
    kept = np.concatenate([np.abs(final[f"{n}/kernel"][m1[n] == 1]) for n in m0])
    gone = np.concatenate([np.abs(final[f"{n}/kernel"][m1[n] == 0]) for n in m0])
    assert kept.min() >= gone.max()


# ---- controls ----------------------------------------------------------------------------


def test_random_prune_masks_keep_the_imp_per_layer_densities_but_differ(main_run):
    _, run_dir, _, _ = main_run
    rewind = _npz(run_dir, 0, "rewind")
    for r in range(1, ROUNDS + 1):
        imp, rnd = _masks(run_dir, r), _masks(run_dir, r, "random_prune")
        assert sorted(rnd) == sorted(imp)
        for name in imp:
            assert rnd[name].sum() == imp[name].sum(), (r, name)
            assert not np.array_equal(rnd[name], imp[name]), (r, name)
        report = _json(paths.sparsity_file(_rdir(run_dir, r, "random_prune")))
        assert report["density"] == pytest.approx(0.8**r, abs=1e-3)
        # Same rewind point W_k, under the random mask.
        start = _npz(run_dir, r, "start", "random_prune")
        np.testing.assert_array_equal(start["fc1/kernel"], rewind["fc1/kernel"] * rnd["fc1"])
        np.testing.assert_array_equal(start["fc1/bias"], rewind["fc1/bias"])
    # Each round draws its own random masks.
    assert not np.array_equal(
        _masks(run_dir, 1, "random_prune")["fc1"], _masks(run_dir, 2, "random_prune")["fc1"]
    )


def test_random_reinit_uses_the_imp_mask_but_different_start_weights(main_run):
    _, run_dir, _, _ = main_run
    for r in range(1, ROUNDS + 1):
        imp, reinit = _masks(run_dir, r), _masks(run_dir, r, "random_reinit")
        assert sorted(reinit) == sorted(imp)
        for name in imp:
            np.testing.assert_array_equal(reinit[name], imp[name])
        a, b = _npz(run_dir, r, "start"), _npz(run_dir, r, "start", "random_reinit")
        for name in imp:
            kernel = b[f"{name}/kernel"]
            assert np.all(kernel[imp[name] == 0] == 0)
            alive = imp[name] == 1
            assert not np.allclose(kernel[alive], a[f"{name}/kernel"][alive])
        # Fresh weights are not the original initialisation either.
        init = _npz(run_dir, 0, "start")
        assert not np.allclose(b["fc1/kernel"], init["fc1/kernel"] * imp["fc1"])
    assert not np.allclose(
        _npz(run_dir, 1, "start", "random_reinit")["fc1/kernel"] * _masks(run_dir, 2)["fc1"],
        _npz(run_dir, 2, "start", "random_reinit")["fc1/kernel"],
    )


# ---- the optimizer at a rewind -------------------------------------------------------------


def _dense_net(seed):
    from lth_tf.keras import keras

    x = keras.Input((8,))
    h = keras.layers.Dense(16, activation="relu", name="fc1")(x)
    y = keras.layers.Dense(4, name="output")(h)
    model = keras.Model(x, y)
    init = np.random.default_rng(seed)
    model.set_weights([init.normal(0, 0.3, w.shape).astype(np.float32) for w in model.weights])
    return model


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_first_update_after_a_rewind_to_k_is_a_fresh_optimizers_first_update_at_lr_of_k(
    tiny_config, optimizer
):
    # The authors' framework builds a fresh optimizer per round (Adam's bias
    # correction restarts) while the learning-rate schedule continues from k.
    from lth_tf.keras import keras

    k = 500
    config = tiny_config(optimizer=optimizer, lr=0.01, momentum=0.9, lr_gamma=0.5)
    schedule = train.Schedule(
        steps_per_epoch=100, total=1000, rewind=k, eval_every=100, warmup=0, boundaries=(200,)
    )
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 8)).astype(np.float32)
    y = rng.integers(0, 4, size=32)
    rewound = _dense_net(1)
    w_k = rewound.get_weights()
    train.compile_model(rewound, config, schedule)
    for _ in range(3):  # the previous round: moments, momentum and a step count
        rewound.train_on_batch(x, y)
    rewound.set_weights(w_k)
    train.reset_optimizer(rewound, k)
    rewound.train_on_batch(x, y)

    lr_k = float(train.StepSchedule(0.01, 0, (200,), 0.5)(k))
    assert lr_k == pytest.approx(0.005)  # past the drop: the schedule's value at k, not at 0
    fresh = _dense_net(1)
    if optimizer == "adam":
        opt = keras.optimizers.Adam(learning_rate=lr_k, epsilon=1e-8)
    else:
        opt = keras.optimizers.SGD(learning_rate=lr_k, momentum=0.9)
    fresh.compile(
        optimizer=opt,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=config.jit_compile,
    )
    fresh.train_on_batch(x, y)
    for w0, a, b in zip(w_k, rewound.get_weights(), fresh.get_weights(), strict=True):
        assert np.abs(b - w0).max() > 0
        np.testing.assert_allclose(a - w0, b - w0, rtol=1e-5, atol=1e-9)


# ---- rerunning, extending and refusing ---------------------------------------------------


def test_rerun_of_a_finished_run_trains_nothing_and_returns_the_same_summaries(main_run):
    config, run_dir, _, summaries = main_run
    before = {p: os.path.getmtime(p) for p in _summary_paths(run_dir)}
    again = _experiment(config, run_dir)
    assert again.run() == summaries
    assert again.trained == []
    assert {p: os.path.getmtime(p) for p in _summary_paths(run_dir)} == before


def _summary_paths(run_dir):
    return [paths.summary_file(_rdir(run_dir, r, b)) for r, b in _all_rounds()]


def test_more_rounds_on_a_finished_run_trains_only_the_new_round(main_run, tmp_path):
    config, run_dir, _, summaries = main_run
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    longer = dataclasses.replace(config, rounds=ROUNDS + 1, controls=())
    experiment = _experiment(longer, copy)
    got = experiment.run()
    assert experiment.trained == [("imp", ROUNDS + 1)]
    assert [s for s in got if s["round"] <= ROUNDS] == [
        s for s in summaries if s["branch"] == "imp"
    ]
    assert got[-1]["density"] == pytest.approx(0.8 ** (ROUNDS + 1), abs=1e-3)
    masks.check_subset(_masks(copy, ROUNDS + 1), _masks(copy, ROUNDS))


@pytest.mark.parametrize(
    ("field", "value"),
    [("lr", 1e-3), ("seed", 1), ("rewind_step", "10it"), ("prune_scope", "layerwise")],
)
def test_a_different_config_is_refused_naming_the_differing_field(
    main_run, tiny_config, field, value
):
    _, run_dir, _, _ = main_run
    path = paths.config_file(str(run_dir))
    with open(path, "rb") as f:
        before = f.read()
    other = tiny_config(controls=CONTROLS, **{field: value})
    with pytest.raises(rundir.RunDirError, match=rf"(?s)different configuration.*{field}"):
        rundir.open_run_dir(other, str(run_dir))
    with open(path, "rb") as f:
        assert f.read() == before


def test_changing_only_rounds_and_controls_is_allowed(main_run, tiny_config):
    _, run_dir, _, _ = main_run
    path = paths.config_file(str(run_dir))
    with open(path, "rb") as f:
        before = f.read()
    for overrides in (
        dict(rounds=7),
        dict(controls=()),
        dict(rounds=1, controls=("random_prune",)),
    ):
        rundir.open_run_dir(tiny_config(**overrides), str(run_dir))
    with open(path, "rb") as f:
        assert f.read() == before


def test_open_run_dir_refuses_a_file_and_a_non_empty_directory_without_config(
    tiny_config, tmp_path
):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(rundir.RunDirError, match="is a file"):
        rundir.open_run_dir(tiny_config(), str(a_file))
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(rundir.RunDirError, match="not an lth_tf run"):
        rundir.open_run_dir(tiny_config(), str(other))
    assert sorted(os.listdir(other)) == ["notes.txt"]


# ---- schedule and config errors ----------------------------------------------------------


@pytest.mark.parametrize("rewind", ["40it", "50it", "1ep"])
def test_rewind_step_at_or_past_the_end_raises_before_any_training(tiny_config, tmp_path, rewind):
    config = tiny_config(rewind_step=rewind)
    with pytest.raises(ValueError, match="rewind_step"):
        rounds.Experiment(config, str(tmp_path / "run"), checkpoint_seconds=0, log=_quiet)
    assert not (tmp_path / "run" / "round_00").exists()


def test_check_reachable_requires_the_rewind_step_on_a_callback_boundary():
    train.check_reachable(200, 100, 100)  # a period end
    train.check_reachable(150, 100, 50)
    train.check_reachable(7, 10, 1)
    with pytest.raises(ValueError, match=r"rewind step 150.*steps_per_execution=100"):
        train.check_reachable(150, 100, 100)


def test_an_unreachable_rewind_step_is_refused_when_the_schedule_is_resolved(tiny_config):
    config = tiny_config(rewind_step="10it", steps_per_execution=4)
    with pytest.raises(ValueError, match="steps_per_execution"):
        train.resolve(config, steps_per_epoch=57)
    train.resolve(tiny_config(rewind_step="8it", steps_per_execution=4), steps_per_epoch=57)


def _schedule(rewind, eval_every, total=2000):
    return train.Schedule(
        steps_per_epoch=eval_every,
        total=total,
        rewind=rewind,
        eval_every=eval_every,
        warmup=0,
        boundaries=(),
    )


def test_small_models_get_the_most_steps_per_execution_that_still_reach_the_rewind_step(
    tiny_config,
):
    small = _dense_net(0)
    config = tiny_config()  # steps_per_execution left unset: automatic
    assert train.execution_steps(small, config, _schedule(100, 429)) == 100
    assert train.execution_steps(small, config, _schedule(150, 1000)) == 75
    assert train.execution_steps(small, config, _schedule(0, 40)) == 40
    assert train.execution_steps(small, config, _schedule(7, 1000)) == 7
    assert train.execution_steps(small, config, _schedule(97, 1000)) == 97
    assert train.execution_steps(small, config, _schedule(101, 1000)) == 1  # a prime above 100
    for rewind, period in ((100, 429), (150, 1000), (0, 40), (7, 1000)):
        n = train.execution_steps(small, config, _schedule(rewind, period))
        train.check_reachable(rewind, period, n)
    # A value the user chose is kept (1 turns the choice off); a large model keeps one
    # step per call.
    chosen = tiny_config(steps_per_execution=4, rewind_step="8it")
    assert train.execution_steps(small, chosen, _schedule(8, 100)) == 4
    assert (
        train.execution_steps(small, tiny_config(steps_per_execution=1), _schedule(100, 429)) == 1
    )
    big = tiny_config(batch_size=int(train.SMALL_BATCH_MACS // train.forward_macs(small)) + 1)
    assert train.execution_steps(small, big, _schedule(100, 429)) == 1


def test_automatic_steps_per_execution_trains_exactly_the_same_weights(tiny_config, monkeypatch):
    # Steps per execution is a speed setting: one step per call gives the same bits.
    from lth_tf import data as data_lib
    from lth_tf import models

    # Periods of 25 steps run as executions of 10, 10 and 5 steps.
    config = tiny_config(
        optimizer="sgd",
        lr=0.05,
        momentum=0.9,
        training_steps="50it",
        eval_every="25it",
        rewind_step="10it",
    )
    ds = data_lib.load(config.dataset, arch_dataset="mnist")
    schedule = train.resolve(config, ds.steps_per_epoch(config.batch_size))
    weights = {}
    for auto in (train.AUTO_STEPS_PER_EXECUTION, 1):
        monkeypatch.setattr(train, "AUTO_STEPS_PER_EXECUTION", auto)
        model = models.build_model("lenet_300_100", ds.input_shape, ds.num_classes, seed=0)
        steps = train.execution_steps(model, config, schedule)
        train.compile_model(model, config, schedule, steps_per_execution=steps)
        assert int(model._steps_per_execution.numpy()) == (1 if auto == 1 else 10)
        train.fit_segment(model, ds, config, schedule, 0, schedule.total)
        weights[auto] = model.get_weights()
    for a, b in zip(*weights.values(), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("field", ["training_steps", "rewind_step", "eval_every", "warmup"])
def test_5_epochs_is_rejected_with_a_clear_message(tiny_config, field):
    with pytest.raises(ValueError, match=rf"{field}: cannot read '5 epochs'.*'160ep'"):
        tiny_config(**{field: "5 epochs"})


def test_durations_in_epochs_resolve_with_the_dataset_steps_per_epoch(tiny_config):
    schedule = train.resolve(
        tiny_config(training_steps="2ep", rewind_step="1ep", eval_every="1ep"), 57
    )
    assert (schedule.total, schedule.rewind, schedule.eval_every) == (114, 57, 57)


# ---- resuming after a kill ---------------------------------------------------------------

CLI = [
    "--arch=lenet_300_100",
    "--dataset=synthetic:8x8x1:4",
    "--batch_size=32",
    "--training_steps=60it",
    "--eval_every=10it",
    "--rewind_step=10it",
    "--rounds=2",
    "--checkpoint_seconds=0",
    "--deterministic",
    "--verbose=0",
    "--run_name=r",
]


def _start(root):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1")
    return subprocess.Popen(
        [sys.executable, "-m", "lth_tf.imp", *CLI, f"--root_dir={root}"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
    )


def _finish(proc, timeout=300):
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out.decode()[-3000:]
    return out.decode()


def _kill_when(proc, path, timeout=240):
    """SIGKILLs `proc` as soon as `path` exists; fails if it finished first."""
    deadline = time.time() + timeout
    while not os.path.exists(path):
        if proc.poll() is not None:
            out = proc.stdout.read().decode()
            pytest.fail(f"The run ended (rc {proc.returncode}) before {path} appeared:\n{out}")
        assert time.time() < deadline, f"{path} did not appear in {timeout}s"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    return proc.communicate()[0].decode()


def _assert_mid_round_checkpoint_is_sparse(run_dir, r):
    """Kernels and their optimizer slots in the TF checkpoint are 0 wherever masked."""
    m = _masks(run_dir, r)
    reader = tf.train.load_checkpoint(
        tf.train.latest_checkpoint(paths.resume_dir(_rdir(run_dir, r)))
    )
    for name, mask in m.items():
        found = [
            key
            for key, shape in reader.get_variable_to_shape_map().items()
            if tuple(shape) == mask.shape
        ]
        assert len(found) >= 4, (name, found)  # kernel, mask, Adam m and v
        for key in found:
            assert np.all(reader.get_tensor(key)[mask == 0] == 0), (name, key)


def test_a_killed_and_rerun_run_ends_exactly_as_an_uninterrupted_one(tmp_path):
    a, b = tmp_path / "A", tmp_path / "B"
    uninterrupted = _start(a)  # in parallel with the interrupted one
    run_b = b / "r"
    # Killed mid-round 0 (after its first mid-round checkpoint), then mid-round 1.
    _kill_when(_start(b), str(run_b / "round_00" / "ckpt" / "checkpoint"))
    assert not (run_b / "round_00" / "summary.json").exists()
    out = _kill_when(_start(b), str(run_b / "round_01" / "ckpt" / "checkpoint"))
    assert "resuming round 0 from its checkpoint" in out
    assert (run_b / "round_00" / "summary.json").exists()
    assert not (run_b / "round_01" / "summary.json").exists()
    _assert_mid_round_checkpoint_is_sparse(run_b, 1)
    out = _finish(_start(b))
    assert "resuming round 1 from its checkpoint" in out
    assert "== round 0" not in out  # finished rounds are skipped
    _finish(uninterrupted)

    run_a = a / "r"
    for r in range(3):
        ma, mb = _masks(run_a, r), _masks(run_b, r)
        assert sorted(ma) == sorted(mb)
        for name in ma:
            np.testing.assert_array_equal(ma[name], mb[name], err_msg=f"round {r} {name}")
        sa = _json(paths.summary_file(_rdir(run_a, r)))
        sb = _json(paths.summary_file(_rdir(run_b, r)))
        assert sa["test_accuracy"] == sb["test_accuracy"], r
        fa, fb = _npz(run_a, r, "final"), _npz(run_b, r, "final")
        for key in fa:
            np.testing.assert_allclose(fa[key], fb[key], rtol=0, atol=1e-6, err_msg=f"{r} {key}")
        # One metrics line per evaluation period, as in the uninterrupted run.
        la = files.read_jsonl(paths.metrics_file(_rdir(run_a, r)))
        lb = files.read_jsonl(paths.metrics_file(_rdir(run_b, r)))
        assert [x["step"] for x in la] == [x["step"] for x in lb], r
        assert not os.path.exists(paths.resume_dir(_rdir(run_b, r)))
    ra, rb = _npz(run_a, 0, "rewind"), _npz(run_b, 0, "rewind")
    for key in ra:
        np.testing.assert_array_equal(ra[key], rb[key], err_msg=key)
