"""Contracts of `lth_tf.linear_mode` and `python -m lth_tf.stability`: interpolation, barriers,
distances, resuming, the CLI.

A tiny LeNet learns an easy rule (class = the bright quadrant of an 8x8 image,
with 10% of labels flipped so errors are not all zero) for one IMP round; the
analyses train their copies on it.
"""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from lth_tf import config as C
from lth_tf import data as data_lib
from lth_tf import files, linear_mode, paths, rounds, rundir, sparsity
from lth_tf.keras import keras

K = 20  # the run's rewind step


def _noop(*args):
    pass


def _quadrant_npz(path, n_train=1200, n_test=300, seed=0):
    rng = np.random.default_rng(seed)

    def make(n):
        y = rng.integers(0, 4, n)
        x = rng.integers(0, 80, (n, 8, 8, 1))
        for i, label in enumerate(y):
            r, c = divmod(int(label), 2)
            x[i, 4 * r : 4 * r + 4, 4 * c : 4 * c + 4] += 150
        flip = rng.random(n) < 0.1
        y = np.where(flip, rng.integers(0, 4, n), y)
        return x.astype(np.uint8), y.astype(np.int64)

    x_train, y_train = make(n_train)
    x_test, y_test = make(n_test)
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    base = tmp_path_factory.mktemp("stability")
    npz = base / "quadrants.npz"
    _quadrant_npz(npz)
    cfg = C.make_config(
        "lenet_300_100",
        dataset=f"npz:{npz}",
        batch_size=32,
        training_steps="40it",
        eval_every="20it",
        rewind_step=f"{K}it",
        rounds=1,
        verbose=0,
        output_rate=1.0,
    )
    run_dir = str(base / "run")
    rundir.open_run_dir(cfg, run_dir)
    rounds.Experiment(cfg, run_dir, checkpoint_seconds=0, log=_noop).run()
    return {"cfg": cfg, "run_dir": run_dir, "base": base}


@pytest.fixture(scope="module")
def analysis(run):
    """Round 0 at k = 0 and k = K (a sweep), and round 1 at k = K."""
    a = linear_mode.Stability(run["run_dir"], num_alphas=5, log=_noop)
    sweep = a.sweep(0, [0, K])
    pruned = a.point(1, K)
    pristine = str(run["base"] / "analysed")  # for tests that change files
    shutil.copytree(run["run_dir"], pristine)
    return {"analysis": a, "sweep": sweep, "pruned": pruned, "copy_of_run": pristine}


def _finals(run_dir, r, k):
    return [
        files.read_npz(
            paths.checkpoint_file(paths.stability_copy_dir(run_dir, r, k, 0, c), "final")
        )
        for c in (1, 2)
    ]


# ---- pure functions -----------------------------------------------------------------------


def _weights(seed):
    rng = np.random.default_rng(seed)
    return {
        "fc/kernel": rng.normal(size=(5, 3)).astype(np.float32),
        "fc/bias": rng.normal(size=3).astype(np.float32),
        "bn/moving_variance": rng.random(3).astype(np.float32) + 0.5,
    }


def test_interpolate_endpoints_are_exact():
    a, b = _weights(1), _weights(2)
    at0, at1 = linear_mode.interpolate(a, b, 0.0), linear_mode.interpolate(a, b, 1.0)
    for key in a:
        np.testing.assert_array_equal(at0[key], b[key])
        np.testing.assert_array_equal(at1[key], a[key])
        assert at0[key].dtype == a[key].dtype
    mid = linear_mode.interpolate(a, b, 0.5)
    np.testing.assert_allclose(mid["fc/kernel"], (a["fc/kernel"] + b["fc/kernel"]) / 2, rtol=1e-6)


def test_l2_distance():
    a, b = _weights(1), _weights(2)
    keys = ["fc/kernel", "fc/bias"]
    assert linear_mode.l2_distance(a, a, keys) == 0.0
    expected = np.sqrt(sum(np.sum((a[k].astype(np.float64) - b[k]) ** 2) for k in keys))
    assert linear_mode.l2_distance(a, b, keys) == pytest.approx(expected, rel=1e-9)
    # Restricted to the nonzero entries of `weights` (a subnetwork's survivors).
    only = {"fc/kernel": np.zeros((5, 3), np.float32)}
    only["fc/kernel"][0, 0] = 1.0
    d = abs(float(a["fc/kernel"][0, 0]) - float(b["fc/kernel"][0, 0]))
    assert linear_mode.l2_distance(a, b, ["fc/kernel"], only) == pytest.approx(d, rel=1e-6)


def test_barrier():
    assert linear_mode.barrier([0.1, 0.1, 0.1]) == 0.0
    assert linear_mode.barrier([0.1, 0.5, 0.3]) == pytest.approx(0.3)
    assert linear_mode.barrier([0.2, 0.1, 0.0]) == pytest.approx(0.1)  # an endpoint is the max


# ---- the error along the path -------------------------------------------------------------


def test_error_along_path_ends_are_the_endpoints_errors(run, analysis):
    experiment = analysis["analysis"].experiment
    # From a trained copy (W1) to the untrained W_0 (W2): the ends' errors differ.
    r0 = paths.round_dir(run["run_dir"], 0)
    masks = files.read_npz(paths.masks_file(r0))
    w1 = _finals(run["run_dir"], 0, 0)[0]
    w2 = files.read_npz(paths.checkpoint_file(r0, "start"))
    path = linear_mode.error_along_path(experiment, w1, w2, masks, [0.0, 0.5, 1.0])
    assert path["alpha"] == [0.0, 0.5, 1.0]
    model, data, bs = experiment.model, experiment.data, run["cfg"].batch_size
    for alpha, w in ((0.0, w2), (1.0, w1)):
        sparsity.set_masks(model, masks)
        sparsity.set_weights(model, w)
        i = path["alpha"].index(alpha)
        for key, split in (("test_error", "test"), ("train_error", "train")):
            acc = model.evaluate(data.eval(split, bs), verbose=0, return_dict=True)["accuracy"]
            assert path[key][i] == 1.0 - float(acc), (alpha, split)
    # The errors mean something: the trained end learnt the rule (up to the flipped
    # labels), the untrained one is near chance.
    assert path["test_error"][-1] < 0.2 < 0.5 < path["test_error"][0]


def test_a_network_has_no_barrier_with_itself(run, analysis):
    experiment = analysis["analysis"].experiment
    masks = files.read_npz(paths.masks_file(paths.round_dir(run["run_dir"], 0)))
    w, _ = _finals(run["run_dir"], 0, K)
    path = linear_mode.error_along_path(experiment, w, w, masks, np.linspace(0, 1, 4))
    for key in ("test_error", "train_error"):
        assert len(set(path[key])) == 1, path[key]
        assert linear_mode.barrier(path[key]) == 0.0


# ---- the analysis of a point --------------------------------------------------------------


def test_point_writes_its_results(run, analysis):
    for result in (*analysis["sweep"], analysis["pruned"]):
        r, k = result["round"], result["rewind_step"]
        out = paths.join(paths.stability_point_dir(run["run_dir"], r, k), "interpolation.json")
        assert files.read_json(out) == result
        for key in ("test_barrier_mean", "train_barrier_mean", "data_order_distance_mean"):
            assert isinstance(result[key], float) and result[key] >= 0.0, key
        assert result["stable"] == (result["test_barrier_mean"] < linear_mode.STABLE_BARRIER)
        assert result["batchnorm"] == "interpolated"
        (rep,) = result["repeats"]
        assert len(rep["alpha"]) == len(rep["test_error"]) == 5
        assert result["test_barrier_mean"] == linear_mode.barrier(rep["test_error"])
        assert files.exists(paths.join(paths.stability_point_dir(run["run_dir"], r, k), "path.png"))
    assert [p["rewind_step"] for p in analysis["sweep"]] == [0, K]
    sweep_dir = paths.stability_dir(run["run_dir"], 0)
    assert files.read_json(paths.join(sweep_dir, "sweep.json")) == analysis["sweep"]
    assert files.exists(paths.join(sweep_dir, "barrier_vs_k.png"))


def test_the_two_copies_see_different_data_orders(run, analysis):
    result = analysis["sweep"][1]
    s1, s2 = result["repeats"][0]["seeds"]
    assert s1 != s2
    w1, w2 = _finals(run["run_dir"], 0, K)
    assert any(not np.array_equal(w1[key], w2[key]) for key in w1)
    assert result["data_order_distance_mean"] > 0
    kernels = [key for key in w1 if key.endswith("/kernel")]
    assert result["data_order_distance_mean"] == pytest.approx(
        linear_mode.l2_distance(w1, w2, kernels), rel=1e-6
    )
    # lth_tf.data: other data seeds, other batches; the same seed, the same batches.
    data = analysis["analysis"].experiment.data

    def labels(seed):
        return [y.numpy() for _, y in data.train(32, seed, start_step=K).take(3)]

    assert not all(np.array_equal(a, b) for a, b in zip(labels(s1), labels(s2), strict=True))
    assert all(np.array_equal(a, b) for a, b in zip(labels(s1), labels(s1), strict=True))


def test_pruning_distance_is_there_for_pruned_rounds_at_the_rewind_step(run, analysis):
    pruned = analysis["pruned"]
    assert pruned["round"] == 1 and pruned["rewind_step"] == K
    masks = files.read_npz(paths.masks_file(paths.round_dir(run["run_dir"], 1)))
    assert pruned["density"] == pytest.approx(0.8, abs=0.01)
    sub = files.read_npz(paths.checkpoint_file(paths.round_dir(run["run_dir"], 1), "final"))
    full = files.read_npz(paths.checkpoint_file(paths.round_dir(run["run_dir"], 0), "final"))
    kernels = [f"{n}/kernel" for n in masks]
    survivors = {f"{n}/kernel": m for n, m in masks.items()}
    expected = linear_mode.l2_distance(sub, full, kernels, survivors)
    assert pruned["pruning_distance"] == pytest.approx(expected, rel=1e-9)
    assert pruned["pruning_distance"] > 0 and pruned["pruning_distance_normalized"] > 0
    # Round 0 has nothing pruned to compare with.
    assert all("pruning_distance" not in p for p in analysis["sweep"])


# ---- BatchNorm ------------------------------------------------------------------------


def test_recompute_batchnorm_averages_the_batch_statistics():
    inputs = keras.Input((8, 8, 1))
    features = keras.layers.Conv2D(4, 3, name="conv")(inputs)
    normalized = keras.layers.BatchNormalization(name="bn")(features)
    outputs = keras.layers.Dense(4)(keras.layers.GlobalAveragePooling2D()(normalized))
    model = keras.Model(inputs, outputs)
    features_of = keras.Model(inputs, features)
    bn = model.get_layer("bn")
    momentum = bn.momentum
    bn.moving_mean.assign(np.full(4, 7.0, np.float32))  # stale statistics to be replaced
    data = data_lib.ArrayData(
        "toy", data_lib.synthetic_arrays((8, 8, 1), 4, num_train=400, num_test=32)
    )
    linear_mode.recompute_batchnorm(model, data, batch_size=32, num_batches=5, data_seed=3)
    means, variances = [], []
    for x, _ in data.train(32, 3).take(5):
        f = features_of(x).numpy().reshape(-1, 4)
        means.append(f.mean(axis=0))
        variances.append(f.var(axis=0, ddof=1))  # Keras keeps the unbiased batch variance
    np.testing.assert_allclose(bn.moving_mean.numpy(), np.mean(means, axis=0), atol=1e-5)
    np.testing.assert_allclose(
        bn.moving_variance.numpy(), np.mean(variances, axis=0), rtol=1e-4, atol=1e-5
    )
    assert bn.momentum == momentum  # restored


def test_recompute_bn_is_recorded_and_reuses_the_trained_copies(analysis, tmp_path):
    run_dir = str(tmp_path / "run")
    shutil.copytree(analysis["copy_of_run"], run_dir)
    before = analysis["sweep"][1]
    recomputed = linear_mode.Stability(run_dir, num_alphas=3, recompute_bn=True, log=_noop)
    result = recomputed.point(0, K)
    assert result["batchnorm"] == "recomputed"
    assert recomputed.experiment.trained == []  # the copies were already trained
    # LeNet has no BatchNorm: recomputing changes nothing but the record.
    assert result["repeats"][0]["test_error"][0] == before["repeats"][0]["test_error"][0]
    assert result["repeats"][0]["test_error"][-1] == before["repeats"][0]["test_error"][-1]
    # Back to the first settings: the path is evaluated again, to the same result.
    again = linear_mode.Stability(run_dir, num_alphas=5, log=_noop)
    assert again.point(0, K) == before and again.experiment.trained == []


# ---- resuming -----------------------------------------------------------------------------


def test_a_killed_sweep_resumes_where_it_stopped(analysis, tmp_path):
    run_dir = str(tmp_path / "run")
    shutil.copytree(analysis["copy_of_run"], run_dir)
    os.remove(paths.join(paths.stability_point_dir(run_dir, 0, 0), "interpolation.json"))
    copy2 = paths.stability_copy_dir(run_dir, 0, 0, 0, 2)
    old_final = files.read_npz(paths.checkpoint_file(copy2, "final"))
    os.remove(paths.checkpoint_file(copy2, "final"))
    os.remove(paths.summary_file(copy2))

    resumed = linear_mode.Stability(run_dir, num_alphas=5, log=_noop)
    results = resumed.sweep(0, [0, K])
    assert resumed.experiment.trained == [("k0_r0_c2", 0)]
    assert results[1] == analysis["sweep"][1]  # the untouched point
    # The retrained copy replays the same data order from the same W_0.
    new_final = files.read_npz(paths.checkpoint_file(copy2, "final"))
    for key in old_final:
        np.testing.assert_allclose(new_final[key], old_final[key], rtol=1e-4, atol=1e-5)
    redone, before = results[0], analysis["sweep"][0]
    assert redone["repeats"][0]["seeds"] == before["repeats"][0]["seeds"]
    assert redone["data_order_distance_mean"] == pytest.approx(
        before["data_order_distance_mean"], rel=1e-3
    )
    # A second sweep has nothing left to do.
    again = linear_mode.Stability(run_dir, num_alphas=5, log=_noop)
    assert again.sweep(0, [0, K]) == results and again.experiment.trained == []


# ---- the command line ---------------------------------------------------------------------


def test_cli_on_something_that_is_not_a_run(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "lth_tf.stability", f"--run_dir={tmp_path}"],
        capture_output=True,
        text=True,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
        timeout=300,
    )
    assert proc.returncode != 0
    assert "is not an lth_tf run directory" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert os.listdir(tmp_path) == []


# ---- under the run's strategy and precision -----------------------------------------------

MIRRORED_POINT = """
import json, sys
from lth_tf.keras import tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
from lth_tf import distribute, linear_mode
strategy = distribute.get_strategy("mirrored", devices=["/cpu:0", "/cpu:1"])
a = linear_mode.Stability(sys.argv[1], strategy=strategy, num_alphas=5, log=lambda *x: None)
result = a.point(1, int(sys.argv[2]))
print(json.dumps({"replicas": a.experiment.strategy.num_replicas_in_sync, "result": result}))
"""


def test_a_point_under_mirrored_on_two_devices_writes_the_same_results(run, analysis, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(run["run_dir"], run_dir, ignore=shutil.ignore_patterns("stability"))
    script = tmp_path / "point.py"
    script.write_text(MIRRORED_POINT)
    proc = subprocess.run(
        [sys.executable, str(script), str(run_dir), str(K)],
        capture_output=True,
        text=True,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["replicas"] == 2
    result = out["result"]
    written = paths.join(paths.stability_point_dir(str(run_dir), 1, K), "interpolation.json")
    assert files.read_json(written) == result
    single = analysis["pruned"]  # the same point on one device
    assert set(result) == set(single)
    assert set(result["repeats"][0]) == set(single["repeats"][0])
    (rep,) = result["repeats"]
    assert len(rep["alpha"]) == len(rep["test_error"]) == len(rep["train_error"]) == 5
    assert all(0.0 <= e <= 1.0 for e in rep["test_error"] + rep["train_error"])
    assert result["test_barrier_mean"] == linear_mode.barrier(rep["test_error"]) >= 0.0
    assert result["data_order_distance_mean"] > 0 and result["pruning_distance"] > 0
    assert result["density"] == single["density"]
    # The copies learned the task as on one device (errors well under chance, 0.75).
    assert max(rep["test_error"][0], rep["test_error"][-1]) < 0.5
    assert abs(result["test_accuracy_mean"] - single["test_accuracy_mean"]) < 0.15


def test_the_copies_train_with_the_runs_mixed_precision(tmp_path):
    cfg = C.make_config(
        "lenet_300_100",
        dataset="synthetic:8x8x1:4",
        batch_size=32,
        training_steps="40it",
        eval_every="20it",
        rewind_step="20it",
        rounds=1,
        verbose=0,
        mixed_precision="bfloat16",
    )
    rundir.open_run_dir(cfg, str(tmp_path))
    try:
        a = linear_mode.Stability(str(tmp_path), log=_noop)
        wrappers = sparsity.wrappers(a.experiment.model)
        assert wrappers
        for name, wrapper in wrappers.items():
            if name != "output":  # Keras keeps the softmax output in float32
                assert wrapper.compute_dtype == "bfloat16", name
        assert keras.mixed_precision.global_policy().name == "float32"  # restored
    finally:
        keras.mixed_precision.set_global_policy("float32")


def test_cli_takes_imps_strategy_flags_and_not_a_precision_of_its_own():
    from absl import flags

    from lth_tf import flagdefs

    flagdefs.define_stability_flags()
    flagdefs.define_imp_flags()
    names = flagdefs.flag_names(flagdefs.define_stability_flags)
    assert {"strategy", "num_gpus", "tpu"} <= names and "mixed_precision" not in names
    for name in ("strategy", "num_gpus", "tpu"):  # one definition, shared with imp
        assert flags.FLAGS.find_module_defining_flag(name) == "lth_tf.flagdefs"
    assert {"strategy", "num_gpus", "tpu"} <= flagdefs.flag_names(flagdefs.define_imp_flags)


def test_cli_refuses_a_strategy_it_cannot_build(run, tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "lth_tf.stability",
            f"--run_dir={run['run_dir']}",
            "--strategy=mirrored",
            "--num_gpus=4",
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "--num_gpus=4" in proc.stderr and "Traceback" not in proc.stderr
