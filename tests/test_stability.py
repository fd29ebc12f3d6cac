"""Contracts of `lth_tf.linear_mode` and `python -m lth_tf.stability`: interpolation, barriers,
distances, resuming, the CLI.

A tiny LeNet learns an easy rule (class = the bright quadrant of an 8x8 image,
with 10% of labels flipped so errors are not all zero) for one IMP round; the
analyses train their copies on it.
"""

import inspect
import json
import os
import pathlib
import shutil
import statistics
import subprocess
import sys

import numpy as np
import pytest

from lth_tf import config as C
from lth_tf import data as data_lib
from lth_tf import files, flagdefs, linear_mode, masks, paths, reporting, rounds, rundir, sparsity
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
        rounds=2,
        verbose=0,
        output_rate=1.0,
    )
    run_dir = str(base / "run")
    rundir.open_run_dir(cfg, run_dir)
    rounds.Experiment(cfg, run_dir, checkpoint_seconds=0, log=_noop).run()
    return {"cfg": cfg, "run_dir": run_dir, "base": base}


@pytest.fixture(scope="module")
def analysis(run):
    """Round 0 at k = 0 and k = K (a sweep), and round 1 at k = K; one repeat each."""
    a = linear_mode.Stability(run["run_dir"], num_alphas=5, repeats=1, log=_noop)
    sweep = a.sweep(0, [0, K])
    pruned = a.point(1, K)
    pristine = str(run["base"] / "analysed")  # for tests that change files
    shutil.copytree(run["run_dir"], pristine)
    return {"analysis": a, "sweep": sweep, "pruned": pruned, "copy_of_run": pristine}


@pytest.fixture(scope="module")
def round_2_sweeps(run, analysis):
    """Round 2 swept over k = 0 and k = K: each k's own IMP mask, then the shared-mask variant."""
    a = linear_mode.Stability(run["run_dir"], num_alphas=3, repeats=1, log=_noop)
    own = a.sweep(2, [0, K])
    trained_for_own = list(a.experiment.trained)
    shared = a.sweep(2, [0, K], shared_mask=True)
    return {
        "own": own,
        "shared": shared,
        "trained_for_own": trained_for_own,
        "trained_for_shared": a.experiment.trained[len(trained_for_own) :],
    }


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
        assert result["n"] == 1 and result["test_barrier_std"] is None  # no spread of one
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
    recomputed = linear_mode.Stability(
        run_dir, num_alphas=3, repeats=1, recompute_bn=True, log=_noop
    )
    result = recomputed.point(0, K)
    assert result["batchnorm"] == "recomputed"
    assert recomputed.experiment.trained == []  # the copies were already trained
    # LeNet has no BatchNorm: recomputing changes nothing but the record.
    assert result["repeats"][0]["test_error"][0] == before["repeats"][0]["test_error"][0]
    assert result["repeats"][0]["test_error"][-1] == before["repeats"][0]["test_error"][-1]
    # Back to the first settings: the path is evaluated again, to the same result.
    again = linear_mode.Stability(run_dir, num_alphas=5, repeats=1, log=_noop)
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

    resumed = linear_mode.Stability(run_dir, num_alphas=5, repeats=1, log=_noop)
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
    again = linear_mode.Stability(run_dir, num_alphas=5, repeats=1, log=_noop)
    assert again.sweep(0, [0, K]) == results and again.experiment.trained == []


class _TwoWorkers:
    """A multi-worker agreement with one peer, whose point file is there or missing (`peer_has`);
    the peer's rounds are finished where this worker's are."""

    def __init__(self, peer_has: bool):
        self.peer_has = peer_has

    def any(self, flag: bool) -> bool:  # asked: "is the point missing or stale anywhere?"
        return bool(flag) or not self.peer_has

    def by_worker(self, value: int) -> dict:
        return {"chief": value, "worker 1": value}

    def gather(self, value: int) -> list:
        return [value, value]


def test_a_point_on_every_worker_is_skipped_and_one_a_peer_lacks_is_evaluated_with_it(
    analysis, tmp_path, monkeypatch
):
    # A worker killed between the workers' writes of interpolation.json: on the rerun the
    # worker that has it evaluates the path again beside its peer (their collective calls
    # stay in step), without training, and keeps its file as it was.
    run_dir = str(tmp_path / "run")
    shutil.copytree(analysis["copy_of_run"], run_dir)
    out = paths.join(paths.stability_point_dir(run_dir, 1, K), "interpolation.json")
    written = pathlib.Path(out).read_bytes()
    evaluated = []
    real = linear_mode.error_along_path
    monkeypatch.setattr(
        linear_mode, "error_along_path", lambda *a, **kw: evaluated.append(1) or real(*a, **kw)
    )
    lines = []
    a = linear_mode.Stability(run_dir, num_alphas=5, repeats=1, log=lines.append)

    a.experiment.agreement = _TwoWorkers(peer_has=True)
    assert a.point(1, K) == analysis["pruned"] and evaluated == [] and lines == []

    a.experiment.agreement = _TwoWorkers(peer_has=False)
    assert a.point(1, K) == analysis["pruned"]
    assert evaluated and a.experiment.trained == []
    assert any("not on every worker" in line for line in lines), lines
    assert pathlib.Path(out).read_bytes() == written


# ---- the LMC paper's protocol: repeats, each k's own mask, finished rounds, fresh caches ----


def test_three_repeats_by_default():
    assert linear_mode.DEFAULT_REPEATS == 3
    assert inspect.signature(linear_mode.Stability).parameters["repeats"].default == 3
    flagdefs.define_stability_flags()
    from absl import flags

    assert flags.FLAGS["repeats"].default == 3
    assert flags.FLAGS["shared_mask"].default is False


def _copy_masks(run_dir, r, k, series=None):
    return files.read_npz(paths.masks_file(paths.stability_copy_dir(run_dir, r, k, 0, 1, series)))


def _same(a, b):
    return a.keys() == b.keys() and all(np.array_equal(a[n], b[n]) for n in a)


def test_a_sweep_at_round_2_uses_each_ks_own_imp_mask(run, round_2_sweeps):
    run_dir = run["run_dir"]
    own_0, own_k = round_2_sweeps["own"]
    branch = "rewind_0it"  # IMP rewound to 0, made by lth_tf.branching's `rewind` kind
    assert (own_0["branch"], own_0["mask_rewind_step"], own_0["shared_mask"]) == (branch, 0, False)
    assert (own_k["branch"], own_k["mask_rewind_step"], own_k["shared_mask"]) == (None, K, False)
    assert files.read_json(paths.branch_file(run_dir, branch))["kind"] == "rewind"
    assert round_2_sweeps["trained_for_own"][:2] == [(branch, 1), (branch, 2)]
    run_masks = files.read_npz(paths.masks_file(paths.round_dir(run_dir, 2)))
    branch_masks = files.read_npz(paths.masks_file(paths.round_dir(run_dir, 2, branch)))
    assert not _same(run_masks, branch_masks)  # another k, another IMP, another mask
    assert _same(_copy_masks(run_dir, 2, 0, branch), branch_masks)
    assert _same(_copy_masks(run_dir, 2, K), run_masks)
    assert own_0["density"] == pytest.approx(masks.density(branch_masks))
    assert "pruning_distance" in own_0 and "pruning_distance" in own_k  # each at its own k
    # Round 1 prunes the shared round 0: the same masks whatever k.
    assert _same(
        files.read_npz(paths.masks_file(paths.round_dir(run_dir, 1, branch))),
        files.read_npz(paths.masks_file(paths.round_dir(run_dir, 1))),
    )
    directory = paths.stability_dir(run_dir, 2)
    assert files.read_json(paths.join(directory, "sweep.json")) == round_2_sweeps["own"]


def test_the_shared_mask_variant_uses_the_runs_mask_for_every_k(run, round_2_sweeps):
    run_dir = run["run_dir"]
    shared_0, shared_k = round_2_sweeps["shared"]
    assert (shared_0["branch"], shared_0["mask_rewind_step"], shared_0["shared_mask"]) == (
        None,
        K,
        True,
    )
    run_masks = files.read_npz(paths.masks_file(paths.round_dir(run_dir, 2)))
    assert _same(_copy_masks(run_dir, 2, 0), run_masks)
    assert "pruning_distance" not in shared_0  # the run did not train this mask from 0
    assert shared_k == round_2_sweeps["own"][1]  # the run's own k: the same point, reused
    assert round_2_sweeps["trained_for_shared"] == [("k0_r0_c1", 2), ("k0_r0_c2", 2)]
    directory = paths.stability_dir(run_dir, 2)
    assert files.read_json(paths.join(directory, "sweep_shared_mask.json")) == [shared_0, shared_k]
    assert files.exists(paths.join(directory, "barrier_vs_k_shared_mask.png"))
    table = reporting.stability_table(run_dir)
    assert f"| imp (mask found with k={K}) |" in table and "| rewind_0it |" in table


def test_an_unfinished_round_is_refused(analysis, tmp_path):
    run_dir = str(tmp_path / "run")
    shutil.copytree(analysis["copy_of_run"], run_dir)
    os.remove(paths.summary_file(paths.round_dir(run_dir, 1)))  # round 1 stopped mid-way
    a = linear_mode.Stability(run_dir, num_alphas=5, repeats=1, log=_noop)
    # Refused although a result of it is there: it was computed before the round changed.
    for analyse in (lambda: a.point(1, K), lambda: a.sweep(1, [K], shared_mask=True)):
        with pytest.raises(ValueError, match=r"Round 1 of .* is unfinished.*finished rounds only"):
            analyse()
    with pytest.raises(ValueError, match="Round 2 of branch rewind_0it of .* does not exist"):
        a.point(2, 0, branch="rewind_0it")
    assert a.experiment.trained == []


def test_a_cached_point_is_reused_while_its_inputs_are_the_same_and_recomputed_after(
    analysis, tmp_path
):
    run_dir = str(tmp_path / "run")
    shutil.copytree(analysis["copy_of_run"], run_dir)
    before = analysis["pruned"]
    lines = []
    again = linear_mode.Stability(run_dir, num_alphas=5, repeats=1, log=lines.append)
    assert again.point(1, K) == before and again.experiment.trained == [] and lines == []

    # The round's summary changed (e.g. the round was rerun): the path is evaluated again,
    # the copies are reused. Likewise for a result of an older lth_tf, without inputs.
    summary_path = paths.summary_file(paths.round_dir(run_dir, 1))
    files.write_json(summary_path, {**files.read_json(summary_path), "rerun": True})
    out = paths.join(paths.stability_point_dir(run_dir, 1, K), "interpolation.json")
    assert again.point(1, K)["inputs"]["round_summary"] != before["inputs"]["round_summary"]
    assert any("recomputing" in line and "round_summary" in line for line in lines), lines
    files.write_json(out, {k: v for k, v in files.read_json(out).items() if k != "inputs"})
    lines.clear()
    assert again.point(1, K)["test_barrier_mean"] == before["test_barrier_mean"]
    assert any("no record of its inputs" in line for line in lines), lines
    assert again.experiment.trained == []

    # Another masks.npz (one more weight pruned): recomputed, its copies retrained. The
    # round's weight files take where their weights are from it: they are rewritten
    # with that weight zero, as under these masks.
    rdir = paths.round_dir(run_dir, 1)
    path = paths.masks_file(rdir)
    changed = files.read_npz(path)
    name = sorted(changed)[0]
    place = int(np.flatnonzero(changed[name])[0])
    changed[name].flat[place] = 0
    weights = {w: files.read_npz(paths.checkpoint_file(rdir, w)) for w in ("start", "final")}
    files.write_npz(path, changed)
    for which, arrays in weights.items():
        arrays[f"{name}/kernel"].flat[place] = 0
        files.write_npz(paths.checkpoint_file(rdir, which), arrays, masks=path)
    result = again.point(1, K)
    assert again.experiment.trained == [(f"k{K}_r0_c1", 1), (f"k{K}_r0_c2", 1)]
    assert result["inputs"]["masks"] != before["inputs"]["masks"]
    assert result["density"] < before["density"]
    assert _same(_copy_masks(run_dir, 1, K), changed)
    assert any("recomputing" in line and "masks" in line for line in lines), lines
    assert any("retraining its copies" in line for line in lines), lines

    # Two repeats instead of one: the first pair is reused, the second trained.
    lines.clear()
    again.repeats = 2
    result = again.point(1, K)
    assert again.experiment.trained[2:] == [(f"k{K}_r1_c1", 1), (f"k{K}_r1_c2", 1)]
    assert any("repeats 1 -> 2" in line for line in lines), lines
    assert result["n"] == len(result["repeats"]) == 2
    for key in ("test_barrier", "train_barrier", "data_order_distance"):
        values = [rep[key] for rep in result["repeats"]]
        assert result[f"{key}_mean"] == pytest.approx(statistics.fmean(values))
        assert result[f"{key}_std"] == pytest.approx(statistics.stdev(values))  # ddof=1
    assert result["data_order_distance_std"] > 0

    # The table: n, and mean ± std (ddof=1) for n = 2; the value alone for n = 1.
    rows = {
        (row[0], row[2]): row
        for row in (
            [cell.strip() for cell in line.strip("|").split("|")]
            for line in reporting.stability_table(run_dir).splitlines()[2:]
        )
    }
    two_repeats, one_repeat = rows[("1", str(K))], rows[("0", str(K))]
    barriers = [100 * rep["test_barrier"] for rep in result["repeats"]]
    assert two_repeats[3] == "2"
    spread = f"{statistics.fmean(barriers):.2f} ± {statistics.stdev(barriers):.2f}"
    assert two_repeats[4] == spread
    assert one_repeat[3] == "1" and "±" not in one_repeat[4] + one_repeat[5]


# ---- the command line ---------------------------------------------------------------------


def test_cli_on_something_that_is_not_a_run(tmp_path, stability_main):
    # In-process (the entry point's own process is tested by tests/test_cli.py).
    code, err = stability_main(f"--run_dir={tmp_path}")
    assert code == 2 and "is not an lth_tf run directory" in err, err
    assert os.listdir(tmp_path) == []


# ---- under the run's strategy and precision -----------------------------------------------

MIRRORED_POINT = """
import json, sys
from lth_tf.keras import tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
from lth_tf import distribute, linear_mode
strategy = distribute.get_strategy("mirrored", devices=["/cpu:0", "/cpu:1"])
a = linear_mode.Stability(
    sys.argv[1], strategy=strategy, num_alphas=5, repeats=1, log=lambda *x: None
)
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
    assert len(result["repeats"][0]["test_error"]) == 5
    # The same results: every number equal (errors along the path, barriers, accuracies,
    # pruning distance, inputs) but the distances between the copies, equal to float
    # rounding (the two replicas' gradients are summed in another order).
    distances = ("data_order_distance", "data_order_distance_normalized")

    def without_distances(point):
        rest = {k: v for k, v in point.items() if k != "data_order_distance_mean"}
        rest["repeats"] = [
            {k: v for k, v in rep.items() if k not in distances} for rep in point["repeats"]
        ]
        return rest

    assert without_distances(result) == without_distances(single)
    assert result["data_order_distance_mean"] == pytest.approx(
        single["data_order_distance_mean"], rel=1e-6
    )
    for key in distances:
        assert result["repeats"][0][key] == pytest.approx(single["repeats"][0][key], rel=1e-6)
    for c in (1, 2):  # the copies' final weights, to float rounding
        mirrored, one = (
            files.read_npz(paths.checkpoint_file(paths.stability_copy_dir(d, 1, K, 0, c), "final"))
            for d in (str(run_dir), run["run_dir"])
        )
        for key in one:
            np.testing.assert_allclose(mirrored[key], one[key], rtol=1e-5, atol=1e-5)


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


@pytest.fixture()
def stability_main(capsys):
    """Runs `python -m lth_tf.stability` in-process: (exit code, stderr)."""
    import signal

    from absl import flags

    from lth_tf import stability

    stability.define_flags()
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

    def main(*argv):
        flags.FLAGS.unparse_flags()
        flags.FLAGS(["stability", *argv])
        capsys.readouterr()
        code = stability.main(["stability"])
        return code, capsys.readouterr().err

    yield main
    flags.FLAGS.unparse_flags()
    for sig, handler in handlers.items():  # the entry point installs its own
        signal.signal(sig, handler)


def test_cli_refuses_a_strategy_it_cannot_build(run, stability_main):
    code, err = stability_main(f"--run_dir={run['run_dir']}", "--strategy=mirrored", "--num_gpus=4")
    assert code == 2 and err.startswith("error: ") and "--num_gpus=4" in err, err


def test_cli_refuses_an_unfinished_round(analysis, tmp_path, stability_main):
    run_dir = str(tmp_path / "run")
    shutil.copytree(analysis["copy_of_run"], run_dir)
    os.remove(paths.summary_file(paths.round_dir(run_dir, 1)))
    code, err = stability_main(f"--run_dir={run_dir}", "--round=1", "--repeats=1")
    assert code == 2, err
    assert f"error: Round 1 of {run_dir} is unfinished" in err and "finished rounds only" in err
