"""Contracts of a user's own model, dataset and tfds dataset: --arch=package.module:function,
--dataset=package.module:function, --dataset=tfds:NAME.

tests/byo_example.py is the user's module: a functional model with Conv2D,
SeparableConv2D, DepthwiseConv2D, Conv1D and Dense layers, and a dataset function
returning an `ArrayData`. One run of it goes through every command line (imp with
2 rounds, branch, stability, export) in subprocesses, and its SavedModel is
reloaded by a Python that imports only TensorFlow.
"""

import os
import signal
import subprocess
import sys
import textwrap

import byo_example
import numpy as np
import pytest
import tensorflow_datasets as tfds
from absl import flags
from conftest import write_mock_metadata

from lth_tf import config as config_lib
from lth_tf import data as data_lib
from lth_tf import files, flagdefs, imp, masks, models, paths, presets, rounds, rundir, sparsity

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)
ARCH, DATASET = "byo_example:build", "byo_example:data"
TINY = dict(batch_size=32, training_steps="40it", eval_every="20it", rewind_step="20it")
IMP_FLAGS = [
    f"--arch={ARCH}",
    f"--dataset={DATASET}",
    "--batch_size=32",
    "--training_steps=40it",
    "--eval_every=20it",
    "--rewind_step=20it",
    "--rounds=2",
    "--optimizer=sgd",  # MaskedSGD's masked-update path
    "--lr=0.05",
    "--momentum=0.9",
]
MASKED = {"conv", "sep", "conv1d", "logits"}


def _noop(*args):
    pass


def _cli(module, *argv):
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([ROOT, TESTS, os.environ.get("PYTHONPATH", "")]),
        "TF_CPP_MIN_LOG_LEVEL": "3",
    }
    result = subprocess.run(
        [sys.executable, "-m", module, *argv], capture_output=True, text=True, env=env, timeout=600
    )
    assert result.returncode == 0, f"{module}: {result.stderr[-3000:]}"
    assert "Traceback" not in result.stderr
    return result.stdout


# Runs in a fresh interpreter: TensorFlow only, no lth_tf, tf_keras or tfmot.
_RELOAD = textwrap.dedent(
    """
    import sys
    import numpy as np
    import tensorflow as tf

    loaded = tf.saved_model.load(sys.argv[1])
    x = np.load(sys.argv[2])
    served = loaded.signatures["serving_default"](images=tf.constant(x))
    np.save(sys.argv[3], served["classes"].numpy())
    banned = ("lth_tf", "tf_keras", "tensorflow_model_optimization")
    print("IMPORTED", sorted(m for m in sys.modules if m.split(".")[0] in banned))
    """
)


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    """A user's model and data through imp (2 rounds), branch, stability and export."""
    root = tmp_path_factory.mktemp("byo")
    out = {"imp": _cli("lth_tf.imp", *IMP_FLAGS, f"--root_dir={root}")}
    (name,) = os.listdir(root)
    run_dir = str(root / name)
    out["branch"] = _cli("lth_tf.branch", f"--run_dir={run_dir}", "--kind=lr_rewind")
    out["stability"] = _cli(
        "lth_tf.stability", f"--run_dir={run_dir}", "--round=1", "--num_alphas=3", "--repeats=1"
    )
    out["export"] = _cli("lth_tf.export", f"--run_dir={run_dir}", "--round=2")
    return {"root": str(root), "name": name, "run_dir": run_dir, "out": out}


def test_the_command_lines_run_a_users_model_and_dataset(cli_run):
    run_dir = cli_run["run_dir"]
    config = rundir.load_config(run_dir)
    assert (config.arch, config.dataset, config.rounds) == (ARCH, DATASET, 2)
    # The run's directory name is a valid name made of the arch and the dataset.
    assert cli_run["name"] == f"byo_example-build_byo-example-data_{config.hash8()}"
    assert cli_run["name"] == paths.run_name(config)
    imp_out = cli_run["out"]["imp"]
    assert "lth_tf's generic recipe" in imp_out
    assert "Left dense in every round" in imp_out and "depthwise (DepthwiseConv2D)" in imp_out
    finished = rundir.finished_rounds(run_dir)
    assert sorted(finished[rundir.IMP]) == [0, 1, 2]
    assert sorted(finished["lr_rewind_20it"]) == [1, 2]
    assert os.path.isdir(os.path.join(run_dir, "stability"))
    assert "Exported round 2" in cli_run["out"]["export"]


def test_every_layer_tfmot_prunes_through_one_weight_is_masked_and_pruned_weights_stay_zero(
    cli_run,
):
    run_dir = cli_run["run_dir"]
    r0, r2 = paths.round_dir(run_dir, 0), paths.round_dir(run_dir, 2)
    round_masks = files.read_npz(paths.masks_file(r2))
    assert set(round_masks) == MASKED  # not the DepthwiseConv2D
    assert 0.5 < masks.density(round_masks) < 0.8
    final = files.read_npz(paths.checkpoint_file(r2, "final"))
    start = files.read_npz(paths.checkpoint_file(r0, "final"))
    # 'sep/kernel' is the SeparableConv2D's pointwise kernel (the weight the registry names).
    assert final["sep/kernel"].shape == round_masks["sep"].shape == (1, 1, 4, 4)
    assert "sep/depthwise_kernel" in final and "depthwise/depthwise_kernel" in final
    for name, mask in round_masks.items():
        kernel = final[f"{name}/kernel"]
        assert np.all(kernel[mask == 0] == 0), name  # MaskedSGD kept them at zero
        assert np.any(kernel[mask == 1] != start[f"{name}/kernel"][mask == 1]), name  # trained
    # The unmasked layer trained dense.
    assert np.all(final["depthwise/depthwise_kernel"] != 0)


def test_the_export_reloads_in_plain_tensorflow_and_lists_the_dense_layers(cli_run, tmp_path):
    run_dir = cli_run["run_dir"]
    report = files.read_json(paths.export_report_file(run_dir, 2))
    assert report["unmasked_layers"] == {"depthwise": "DepthwiseConv2D"}
    assert report["layers"]["depthwise/depthwise_kernel"]["density"] == 1.0
    assert report["layers"]["sep/pointwise_kernel"]["density"] < 1.0
    assert report["exported_test_accuracy"] == pytest.approx(report["recorded_test_accuracy"])
    data = byo_example.data()
    x = np.stack([image for image, _ in data.raw_eval("test").as_numpy_iterator()])
    labels = data.arrays.y_test
    np.save(tmp_path / "x.npy", x)
    script = tmp_path / "reload.py"
    script.write_text(_RELOAD)
    result = subprocess.run(
        [
            sys.executable,
            str(script),
            paths.saved_model_dir(run_dir, 2),
            str(tmp_path / "x.npy"),
            str(tmp_path / "classes.npy"),
        ],
        capture_output=True,
        text=True,
        env={
            **{
                k: v
                for k, v in os.environ.items()
                if k not in ("TF_USE_LEGACY_KERAS", "PYTHONPATH")
            },
            "TF_CPP_MIN_LOG_LEVEL": "3",
        },
        cwd=str(tmp_path),  # not the repository: `import lth_tf` must not be what loads it
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "IMPORTED []" in result.stdout
    classes = np.load(tmp_path / "classes.npy")
    assert np.mean(classes == labels) == pytest.approx(report["exported_test_accuracy"])


def test_a_users_model_gets_the_generic_recipe_and_the_output_layer_is_its_last_masked_one():
    config = config_lib.make_config(ARCH, dataset=DATASET, **TINY)
    assert config.lr == presets.CUSTOM_RECIPE["lr"] and config.optimizer == "adam"
    model = models.build_model(ARCH, byo_example.SHAPE, byo_example.NUM_CLASSES, seed=1)
    again = models.build_model(ARCH, byo_example.SHAPE, byo_example.NUM_CLASSES, seed=1)
    assert all(
        np.array_equal(a, b) for a, b in zip(model.get_weights(), again.get_weights(), strict=True)
    )
    assert sparsity.output_layer(model) == "logits"
    wrapped = sparsity.wrap(model)
    assert set(sparsity.wrappers(wrapped)) == MASKED
    assert sparsity.layer_kinds(wrapped) == {
        "conv": masks.CONV,
        "sep": masks.CONV,
        "conv1d": masks.CONV,
        "logits": masks.OUTPUT,
    }
    assert sparsity.unmasked_layers(wrapped) == {"depthwise": "DepthwiseConv2D"}
    # output_rate=0 leaves the output layer dense (and it is not "unmasked": by choice).
    without = sparsity.wrap(model, output_rate=0.0)
    assert set(sparsity.wrappers(without)) == MASKED - {"logits"}
    assert sparsity.unmasked_layers(without) == {"depthwise": "DepthwiseConv2D"}
    # A built-in model's output layer is still the Dense named 'output'.
    lenet = models.build_model("lenet_300_100", (8, 8, 1), 4)
    assert sparsity.output_layer(lenet) == models.OUTPUT_LAYER


def test_the_adam_path_masks_a_users_model_with_the_output_layer_dense(tmp_path):
    # MaskedLayer's masked gradient (Adam), the pointwise and Conv1D kernels included.
    config = config_lib.make_config(ARCH, dataset=DATASET, rounds=1, output_rate=0.0, **TINY)
    run_dir = str(tmp_path / "run")
    rundir.open_run_dir(config, run_dir)
    experiment = rounds.Experiment(config, run_dir, checkpoint_seconds=0, log=_noop)
    experiment.run()
    assert experiment.unmasked == {"depthwise": "DepthwiseConv2D"}
    assert set(experiment.layers) == MASKED - {"logits"}
    round_masks = sparsity.get_masks(experiment.model)
    weights = sparsity.get_weights(experiment.model)
    raw = {k: v.numpy() for k, v in sparsity.model_weights(experiment.model).items()}
    for name, mask in round_masks.items():
        assert 0 < mask.mean() < 1, name
        assert np.array_equal(raw[f"{name}/kernel"], weights[f"{name}/kernel"]), name


def _build_wrong_output(input_shape, num_classes, seed):
    inputs = models.keras.Input(input_shape)
    x = models.keras.layers.Flatten()(inputs)
    return models.keras.Model(inputs, models.keras.layers.Dense(num_classes + 1)(x))


def _sequential(input_shape, num_classes, seed):
    return models.keras.Sequential(
        [
            models.keras.Input(input_shape),
            models.keras.layers.Conv2D(3, 3, name="c", kernel_initializer=_he(seed)),
            models.keras.layers.Flatten(),
            models.keras.layers.Dense(num_classes, name="d", kernel_initializer=_he(seed + 1)),
        ]
    )


def _he(seed):
    return models.keras.initializers.HeNormal(seed=seed)


def test_a_sequential_model_is_wrapped_and_masked_like_a_functional_one():
    model = models.build_model("test_byo:_sequential", byo_example.SHAPE, 4, seed=2)
    wrapped = sparsity.wrap(model)
    assert sparsity.layer_kinds(wrapped) == {"c": masks.CONV, "d": masks.OUTPUT}
    mask = {
        n: np.zeros_like(w.pruning_vars[0][1].numpy())
        for n, w in sparsity.wrappers(wrapped).items()
    }
    mask["c"][..., 0] = 1
    mask["d"][:5] = 1
    sparsity.set_masks(wrapped, mask)
    weights = sparsity.get_weights(wrapped)
    assert (
        np.count_nonzero(weights["c/kernel"]) == 9 and np.count_nonzero(weights["d/kernel"]) == 20
    )
    x = np.ones((2, *byo_example.SHAPE), "float32")
    stripped = sparsity.strip(wrapped)
    assert np.allclose(stripped(x), wrapped(x))
    assert np.count_nonzero(stripped.get_layer("c").kernel.numpy()) == 9


def _not_a_dataset(**kwargs):
    return object()


@pytest.mark.parametrize(
    "arch, kwargs, message",
    [
        ("no_such_module_xyz:build", {}, "cannot import module 'no_such_module_xyz'"),
        ("byo_example:nothing", {}, "has no function 'nothing'"),
        ("test_byo:_build_wrong_output", {}, r"expected one output of logits shaped \(batch, 4\)"),
        (ARCH, {"weight_decay": 1e-4}, "Put regularizers in your builder"),
        ("alexnet", {}, "package.module:function for your own builder"),
    ],
)
def test_a_bad_model_builder_is_explained(arch, kwargs, message):
    with pytest.raises(ValueError, match=message):
        models.build_model(arch, byo_example.SHAPE, 4, **kwargs)


def test_a_bad_dataset_function_is_explained():
    with pytest.raises(ValueError, match="lacks eval, input_shape, .*raw_eval.* of the lth_tf"):
        data_lib.load("test_byo:_not_a_dataset")
    with pytest.raises(ValueError, match="cannot import module 'no_such_module_xyz'"):
        data_lib.load("no_such_module_xyz:data")
    dataset = data_lib.load(DATASET, validation_holdout=100)
    assert isinstance(dataset, data_lib.Dataset)
    assert dataset.num_examples("validation") == 100


def test_flags_take_a_users_model_and_explain_the_forms():
    flagdefs.define_imp_flags()
    try:
        flags.FLAGS.unparse_flags()
        flags.FLAGS(
            ["imp", f"--arch={ARCH}", f"--dataset={DATASET}", "--dataset=tfds:svhn_cropped"]
        )
        assert flagdefs.config_from_flags().arch == ARCH
        flags.FLAGS.unparse_flags()
        with pytest.raises(flags.IllegalFlagValueError, match="--arch=package.module:function"):
            flags.FLAGS(["imp", "--arch=my-model.py"])
    finally:
        flags.FLAGS.unparse_flags()


def test_tfds_name_runs_on_mock_data_and_fails_fast_when_not_prepared(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="tfds build fashion_mnist"):
        data_lib.load("tfds:fashion_mnist", data_dir=str(tmp_path / "empty"))
    write_mock_metadata(tmp_path, "fashion_mnist", {"train": 40, "test": 40})
    imp.define_flags()
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        flags.FLAGS.unparse_flags()
        flags.FLAGS(
            [
                "imp",
                "--arch=lenet_300_100",
                "--dataset=tfds:fashion_mnist",
                f"--data_dir={tmp_path}",
                "--batch_size=8",
                "--training_steps=4it",
                "--eval_every=2it",
                "--rounds=1",
                f"--root_dir={tmp_path / 'runs'}",
                "--run_name=r",
                "--verbose=0",
            ]
        )
        with tfds.testing.mock_data(num_examples=40, data_dir=str(tmp_path)):
            assert imp.main(["imp"]) == 0
    finally:
        flags.FLAGS.unparse_flags()
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    run_dir = str(tmp_path / "runs" / "r")
    assert sorted(rundir.finished_rounds(run_dir)[rundir.IMP]) == [0, 1]
    assert rundir.load_config(run_dir).dataset == "tfds:fashion_mnist"
