"""Names stay home and values that cannot make sense are refused before anything is written.

Contracts (each case of issue 20's items 7 and 8):
  - run names, branch names and stability series are names, not paths: '..', an
    absolute path or a separator is refused, saying what was received and what to
    pass instead; `stability --branch` takes an existing branch of the run only;
    `report --out` never writes into another run or replicate group;
  - a rate that prunes a whole layer per round (rate * fraction >= 1), a density
    that leaves a layer with no weight (checked against the model's layer sizes),
    an infinite or NaN rate, and an npz whose labels, images or splits make no
    sense are refused with exit code 2, before the run directory is written.
Entry points run in-process (main with parsed flags): no subprocess, no TF start-up.
"""

import os
import shutil

import conftest
import numpy as np
import pytest
from absl import flags
from entry_points import call, snapshot

from lth_tf import (
    branching,
    data,
    masks,
    paths,
    reporting,
    rounds,
    rundir,
)

FLAGS = flags.FLAGS
# Global pruning (one pool): pruning deep enough empties a small layer.
TINY = conftest.tiny_flags(rounds=1, output_rate=1.0, checkpoint_seconds=0)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished tiny run (rounds 0 and 1) under root/r."""
    root = tmp_path_factory.mktemp("inputs")
    code, err = call("imp", *TINY, f"--root_dir={root}", "--run_name=r")
    assert code == 0, err[-3000:]
    return str(root), str(root / "r")


def _refused(code, err, *needles):
    assert code == 2, err[-2000:]
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, err[-2000:]


# ---- 7. names stay home -----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["..", "../../x", "ABSOLUTE", "a/b", "a\\b", "."])
def test_a_run_name_is_a_name_not_a_path(tmp_path, name):
    root = tmp_path / "a" / "root"
    name = name.replace("ABSOLUTE", str(tmp_path / "elsewhere"))
    code, err = call("imp", *TINY, f"--root_dir={root}", f"--run_name={name}")
    _refused(code, err, "--run_name", repr(name), "--root_dir")
    assert snapshot(tmp_path) == {}


def test_check_name_says_what_it_got_and_what_to_pass():
    assert paths.check_name("rewind_100it", "--branch", "x") == "rewind_100it"
    with pytest.raises(ValueError, match=r"--branch='/abs/path' is not a name.*Pass a branch"):
        paths.check_name("/abs/path", "--branch", "a branch")
    with pytest.raises(ValueError, match="not a name"):
        paths.branch_dir("run", "../other_run")
    with pytest.raises(ValueError, match="not a name"):
        paths.stability_dir("run", 1, "/abs")


@pytest.mark.parametrize("name", ["ABSOLUTE", "../r", "no_such_branch"])
def test_stability_takes_an_existing_branch_only(run, tmp_path, name):
    root, run_dir = run
    name = name.replace("ABSOLUTE", str(tmp_path / "abs"))
    before = snapshot(root)
    code, err = call("stability", f"--run_dir={run_dir}", f"--branch={name}", "--rewind_steps=0")
    _refused(code, err, "--branch")
    assert snapshot(root) == before
    assert snapshot(tmp_path) == {}


def test_report_out_never_writes_into_another_run(run, tmp_path):
    root, run_dir = run
    other = tmp_path / "other"
    shutil.copytree(run_dir, other)
    (other / "report.md").write_text("the other run's report")
    group = tmp_path / "group"
    shutil.copytree(run_dir, group / "replicate_1")
    before = snapshot(tmp_path), snapshot(root)
    for out in (other, other / "round_00", group, group / "replicate_1"):
        code, err = call("report", f"--run_dir={run_dir}", f"--out={out}")
        _refused(code, err, f"--out={out}", "outside every run")
        code, err = call("report", f"--run_dir={run_dir}", f"--run_dir={other}", f"--out={out}")
        assert code == 2 and "Traceback" not in err, err[-2000:]
    assert (snapshot(tmp_path), snapshot(root)) == before
    # The run itself and a directory outside every run take a report; a comparison's own
    # output directory may be written again.
    assert call("report", f"--run_dir={run_dir}", f"--out={run_dir}")[0] == 0
    assert call("report", f"--run_dir={run_dir}", f"--out={tmp_path / 'elsewhere'}")[0] == 0
    compared = tmp_path / "compared"
    for _ in range(2):
        code, err = call(
            "report", f"--run_dir={run_dir}", f"--run_dir={other}", f"--out={compared}"
        )
        assert code == 0, err[-2000:]
    assert os.path.exists(paths.report_file(str(compared)))


def test_check_out_accepts_a_comparison_directory(run, tmp_path):
    root, run_dir = run
    reporting.check_out(str(tmp_path / "new"))
    with pytest.raises(rundir.RunDirError, match="inside the run"):
        reporting.check_out(paths.round_dir(run_dir, 1))


# ---- 8. values that cannot make sense ---------------------------------------------------------


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(output_rate=5.0), "output_rate"),  # 5 * 0.2 = 1: the whole output layer
        (dict(output_rate=2.0, prune_fraction=0.5), "output_rate"),
        (dict(conv_rate=5.0), "conv_rate"),
        (dict(output_rate=2.0, target_density=0.3, rounds=1), "output_rate"),
        (dict(lr=float("inf")), "lr"),
        (dict(lr=float("nan")), "lr"),
        (dict(momentum=float("nan")), "momentum"),
        (dict(weight_decay=float("inf")), "weight_decay"),
        (dict(weight_decay=float("nan")), "weight_decay"),
        (dict(lr_gamma=float("inf")), "lr_gamma"),
        (dict(target_density=float("nan")), "target_density"),
        (dict(lr="0.1"), "lr"),
        (dict(momentum=True), "momentum"),
    ],
)
def test_config_refuses_rates_that_cannot_make_sense(tiny_config, fields, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**fields)


def test_rates_just_below_a_whole_layer_are_fine(tiny_config):
    tiny_config(output_rate=4.99)
    tiny_config(output_rate=1.4, target_density=0.3, rounds=2)  # 1.4 * 0.452 < 1


@pytest.mark.parametrize(
    "flag", ["--lr=inf", "--lr=nan", "--momentum=nan", "--weight_decay=inf", "--output_rate=inf"]
)
def test_infinite_or_nan_flags_are_refused_at_parse_time(tmp_path, flag):
    code, err = call("imp", *TINY, f"--root_dir={tmp_path}", flag)
    _refused(code, err, flag.split("=")[0], "finite")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    "extra",
    [
        ["--output_rate=5"],  # prunes the whole output layer in round 1
        ["--target_density=1e-9"],  # no weight left in any layer
        ["--target_density=0.00001", "--rounds=2"],  # 0.5 of LeNet's 49,600 weights
        ["--prune_fraction=0.9", "--rounds=30"],  # 49,600 * 0.1 ** 30
    ],
)
def test_imp_refuses_densities_that_leave_a_layer_empty_before_writing(tmp_path, extra):
    code, err = call("imp", *TINY, f"--root_dir={tmp_path}", "--run_name=r", *extra)
    _refused(code, err)
    assert os.listdir(tmp_path) == []  # not even the run directory


def test_emptied_layer_counts_rounds_per_layer_and_for_the_pool():
    sizes = {"a": 1000, "b": 100, "out": 10}
    rates = {"out": 0.5}
    assert masks.emptied_layer(sizes, rates, 0.2, 10) is None
    # A layer on its own at 0.5 * 0.9 per round: 10, 6, 3, 2, 1, 1, ... never 0.
    assert masks.emptied_layer({"out": 10}, rates, 0.9, 20) is None
    assert masks.emptied_layer({"out": 10}, {"out": 1.1}, 0.95, 1) == ("out", 1, 10, 1.1)
    # The pool (a and b, 1,100 weights) at 0.9: 110, 11 (b's even share: 1), then 1.
    assert masks.emptied_layer(sizes, rates, 0.9, 2) is None
    assert masks.emptied_layer(sizes, rates, 0.9, 3) == ("a", 3, 1000, 1.0)
    # Layer-wise, b empties on its own: 100, 10, 1, then round(0.9 * 1) = 1 goes.
    assert masks.emptied_layer(sizes, rates, 0.9, 3, "layerwise") == ("b", 3, 100, 1.0)
    assert masks.emptied_layer(sizes, {"a": 0, "b": 0, "out": 0}, 0.99, 50) is None


def _experiment(run_dir):
    return rounds.Experiment(rundir.load_config(run_dir), run_dir, log=lambda *a: None)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--kind=oneshot", "--densities=1e-9"], "--densities: Density 1e-09 cannot be reached"),
        (
            ["--kind=oneshot", "--densities=0.2,1e-9"],
            "--densities: Density 1e-09 cannot be reached",
        ),
        (["--kind=finetune", "--finetune_lr=inf"], "--finetune_lr"),
        (["--kind=finetune", "--finetune_lr=nan"], "--finetune_lr"),
        (["--kind=rewind", "--rewind_step=10it", "--rounds=60"], "--rounds=60"),
    ],
)
def test_branch_refuses_values_that_cannot_make_sense(run, argv, message):
    root, run_dir = run
    before = snapshot(root)
    code, err = call("branch", f"--run_dir={run_dir}", *argv)
    _refused(code, err, message)
    assert snapshot(root) == before


def test_finetune_lr_is_checked_in_the_library_too(run):
    e = _experiment(run[1])
    for lr in (float("inf"), float("nan"), 0.0):
        with pytest.raises(branching.BranchError, match="finite, positive"):
            branching.make_spec(e, "finetune", num_rounds=1, finetune_lr=lr)
    with pytest.raises(branching.BranchError, match="would leave layer"):
        branching.make_spec(e, "oneshot", densities=[0.001])


def _npz(tmp_path, name="d.npz", n_train=40, n_test=10, shape=(6, 6), classes=4, **override):
    rng = np.random.default_rng(0)
    arrays = dict(
        x_train=rng.integers(0, 256, (n_train, *shape), dtype=np.uint8),
        y_train=np.arange(n_train) % classes,
        x_test=rng.integers(0, 256, (n_test, *shape), dtype=np.uint8),
        y_test=np.arange(n_test) % classes,
    )
    arrays.update(override)
    path = tmp_path / name
    np.savez(path, **arrays)
    return str(path)


def _labels(values, dtype=np.int64, n=40):
    y = (np.arange(n) % 4).astype(dtype)
    y[: len(values)] = values
    return y


@pytest.mark.parametrize(
    "override, message",
    [
        (dict(y_train=_labels([2**63 + 5], np.uint64)), "labels run up to 9223372036854775813"),
        (dict(y_test=_labels([2**64 - 1], np.uint64, 10)), "outside 0..3"),
        (dict(y_train=_labels([200000])), "labels must be dense"),
        (dict(y_train=_labels([200000]), num_classes=np.int64(10)), "label 200000, outside 0..9"),
        (dict(y_test=_labels([7], n=10)), "label 7, outside 0..3"),
        (dict(y_train=np.arange(40) % 4 + 0.0), "integer labels"),
        (dict(y_train=np.arange(40) % 2 == 0), "integer labels"),
        (dict(num_classes=np.float32(4)), "num_classes"),
        (dict(num_classes=np.int64(1)), "num_classes"),
        (
            dict(x_train=np.zeros((40, 0, 0), np.uint8), x_test=np.zeros((10, 0, 0), np.uint8)),
            "0x0x1",
        ),
        (
            dict(x_test=np.zeros((0, 6, 6), np.uint8), y_test=np.zeros(0, np.int64)),
            "x_test holds no",
        ),
        (
            dict(x_train=np.zeros((0, 6, 6), np.uint8), y_train=np.zeros(0, np.int64)),
            "only 0 training",
        ),
        (dict(y_train=np.zeros(40, np.int64), y_test=np.zeros(10, np.int64)), "single class"),
    ],
)
def test_npz_values_that_cannot_make_sense_are_refused(tmp_path, override, message):
    path = _npz(tmp_path, **override)
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        data.load(f"npz:{path}")


def test_npz_class_count_is_declared_or_read_from_dense_labels(tmp_path):
    dense = data.load(f"npz:{_npz(tmp_path, 'a.npz')}")
    assert dense.num_classes == 4
    # Declared: classes without an example are allowed (a small sample of a large label set).
    declared = data.load(f"npz:{_npz(tmp_path, 'b.npz', num_classes=np.int64(12))}")
    assert declared.num_classes == 12
    wide = data.load(f"npz:{_npz(tmp_path, 'c.npz', y_train=_labels([3], np.uint64))}")
    assert wide.num_classes == 4 and wide.arrays.y_train.dtype == np.int64


def test_a_bad_npz_leaves_no_run_directory(tmp_path):
    path = _npz(tmp_path, y_train=_labels([2**63], np.uint64))
    root = tmp_path / "root"
    argv = [a for a in TINY if not a.startswith("--dataset")]
    code, err = call("imp", *argv, f"--dataset=npz:{path}", f"--root_dir={root}")
    _refused(code, err, "labels run up to 9223372036854775808", "dense")
    assert not root.exists()


def test_rounds_fraction_and_config_check_agree(tiny_config):
    # config._check's fraction with a target density is rounds.round_fraction's.
    c = tiny_config(target_density=0.3, rounds=3, output_rate=1.0)
    assert 1.4 * rounds.round_fraction(c) < 1
    with pytest.raises(ValueError, match="output_rate"):
        tiny_config(output_rate=1.01 / rounds.round_fraction(c), target_density=0.3, rounds=3)
