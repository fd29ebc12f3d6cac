"""Contracts of a ResNet-50 ImageNet run under MirroredStrategy, exported as a user ships it.

On the tfds-built fake ImageNet of tests/conftest.py (24 training and 6 validation
JPEGs of 20-60 pixels): a 2-round IMP run of ResNet-50 at a 32-pixel input size,
a few steps per round, under MirroredStrategy on two logical CPUs, then the
stability of its round 1 in the same process (logical devices must be made
before TensorFlow starts: a fresh interpreter, once for both), then the export
of round 2. A fresh Python that imports only TensorFlow loads the SavedModel
and answers a JPEG file's bytes through `serving_bytes` and raw images of other
sizes through `serving_default`; the answers must be the in-training model's on
the evaluation preprocessing.
"""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from lth_tf import config, files, paths, rounds, sparse_export, sparsity
from lth_tf.data import imagenet
from lth_tf.keras import tf

IMAGE_SIZE = 32
ROUND = 2


def _noop(*args):
    pass


# The run's config: resnet50 with these settings and the fake ImageNet's data_dir.
SETTINGS = dict(
    batch_size=8,
    training_steps="2it",
    eval_every="2it",
    rewind_step="1it",
    warmup="0",
    lr_drops=(),
    rounds=ROUND,
    verbose=0,
)


# The run's IMP rounds and the stability of its round 1, under MirroredStrategy on
# 2 logical CPUs. After the rounds, every replica of every wrapped kernel must
# hold exact zeros where round 2's mask is 0.
_MIRRORED_RUN = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    from lth_tf.keras import tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    from lth_tf import config, distribute, linear_mode, rounds, rundir, sparsity
    from lth_tf.data import imagenet
    cfg = config.make_config("resnet50", **json.loads(sys.argv[1]))
    run_dir, image_size = sys.argv[2], int(sys.argv[3])
    strategy = distribute.get_strategy("mirrored", devices=["/cpu:0", "/cpu:1"])
    data = imagenet.ImageNetData(cfg.data_dir, augment=True, image_size=image_size)
    rundir.open_run_dir(cfg, run_dir)
    e = rounds.Experiment(cfg, run_dir, strategy=strategy, checkpoint_seconds=0,
                          log=lambda *a: None, data=data)
    summaries = e.run()
    bad = 0
    for wrapper in sparsity.wrappers(e.model).values():
        kernel, mask = wrapper.pruning_vars[0][0], wrapper.pruning_vars[0][1]
        for k, m in zip(kernel.values, mask.values, strict=True):
            bad += int(np.count_nonzero(k.numpy()[m.numpy() == 0]))
    analysis = linear_mode.Stability(
        run_dir,
        strategy=strategy,
        num_alphas=3,
        repeats=1,
        eval_examples=6,
        log=lambda *a: None,
        data=data,
    )
    stability = analysis.point(1, analysis.schedule.rewind)
    print(json.dumps({
        "replicas": strategy.num_replicas_in_sync,
        "densities": [s["density"] for s in summaries],
        "wrapped": len(sparsity.wrappers(e.model)),
        "nonzero_pruned": bad,
        "stability": stability,
    }))
    """
)


@pytest.fixture(scope="module")
def run(tmp_path_factory, imagenet_dir):
    """A finished 2-round ResNet-50 run under mirrored on the fake ImageNet, its export of round 2."""
    settings = {**SETTINGS, "data_dir": imagenet_dir}
    cfg = config.make_config("resnet50", **settings)
    base = tmp_path_factory.mktemp("imagenet_export")
    run_dir = str(base / "run")
    script = base / "mirrored_run.py"
    script.write_text(_MIRRORED_RUN)
    proc = subprocess.run(
        [sys.executable, str(script), json.dumps(settings), run_dir, str(IMAGE_SIZE)],
        capture_output=True,
        text=True,
        timeout=1200,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    mirrored = json.loads(proc.stdout.strip().splitlines()[-1])
    data = imagenet.ImageNetData(imagenet_dir, augment=True, image_size=IMAGE_SIZE)
    result = sparse_export.export(run_dir, round_index=ROUND, log=_noop, data=data)
    return {"cfg": cfg, "run_dir": run_dir, "data": data, "result": result, "mirrored": mirrored}


@pytest.fixture(scope="module")
def trained(run):
    """The in-training (wrapped, masked) model of round 2."""
    experiment = rounds.Experiment(
        run["cfg"], run["run_dir"], write=False, log=_noop, data=run["data"]
    )
    rdir = paths.round_dir(run["run_dir"], ROUND)
    sparsity.set_masks(experiment.model, files.read_npz(paths.masks_file(rdir)))
    sparsity.set_weights(experiment.model, files.read_npz(paths.checkpoint_file(rdir, "final")))
    return experiment.model


def test_resnet50_wraps_and_trains_under_mirrored_on_fake_imagenet(run):
    out = run["mirrored"]
    assert out["replicas"] == 2
    assert out["wrapped"] == 54  # 53 convolutions + the output layer
    assert out["densities"] == pytest.approx([1.0, 0.8, 0.64], abs=1e-3)
    assert out["nonzero_pruned"] == 0


def test_stability_of_round_1_under_mirrored_on_two_logical_cpus(run):
    result = run["mirrored"]["stability"]
    (rep,) = result["repeats"]
    assert len(rep["alpha"]) == len(rep["test_error"]) == len(rep["train_error"]) == 3
    assert all(0.0 <= e <= 1.0 for e in rep["test_error"] + rep["train_error"])
    assert result["test_barrier_mean"] >= 0.0 and result["data_order_distance_mean"] > 0
    assert abs(result["density"] - 0.8) < 1e-3
    written = paths.join(paths.stability_point_dir(run["run_dir"], 1, 1), "interpolation.json")
    assert files.read_json(written) == result


# Runs in a fresh interpreter: TensorFlow only, no lth_tf, tf_keras or tfmot.
_SERVE = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import tensorflow as tf

    saved_model, jpeg_path, raw_path, out_path = sys.argv[1:]
    loaded = tf.saved_model.load(saved_model)
    with open(jpeg_path, "rb") as f:
        jpeg = f.read()
    by_bytes = loaded.signatures["serving_bytes"](image_bytes=tf.constant([jpeg, jpeg]))
    raw = np.load(raw_path)  # a uint8 image of another size than the training one
    by_raw = loaded.signatures["serving_default"](images=tf.constant(raw[None]))
    by_png = loaded.signatures["serving_bytes"](image_bytes=tf.io.encode_png(raw)[None])
    banned = ("lth_tf", "tf_keras", "tensorflow_model_optimization")
    with open(out_path, "w") as f:
        json.dump({
            "jpeg_classes": by_bytes["classes"].numpy().tolist(),
            "jpeg_probabilities": by_bytes["probabilities"].numpy().tolist(),
            "raw_classes": by_raw["classes"].numpy().tolist(),
            "raw_probabilities": by_raw["probabilities"].numpy().tolist(),
            "png_probabilities": by_png["probabilities"].numpy().tolist(),
            "imported": sorted(m for m in sys.modules if m.split(".")[0] in banned),
        }, f)
    """
)


@pytest.fixture(scope="module")
def served(run, tmp_path_factory):
    """A JPEG file and a raw 45x70 image, and what the SavedModel answers for them."""
    out = tmp_path_factory.mktemp("served")
    # An image of the fake data (a validation image, 30x45), as a JPEG file.
    image, _ = next(iter(run["data"].raw_eval("test")))
    jpeg = tf.io.encode_jpeg(image).numpy()
    (out / "image.jpg").write_bytes(jpeg)
    raw = np.random.default_rng(1).integers(0, 256, size=(45, 70, 3), dtype=np.uint8)
    np.save(out / "raw.npy", raw)
    script = out / "serve.py"
    script.write_text(_SERVE)
    env = {k: v for k, v in os.environ.items() if k != "TF_USE_LEGACY_KERAS"}
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    proc = subprocess.run(
        [
            sys.executable,
            str(script),
            run["result"]["sparse"]["path"],
            str(out / "image.jpg"),
            str(out / "raw.npy"),
            str(out / "answers.json"),
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=str(out),  # not the repository: `import lth_tf` must not be what loads it
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(out / "answers.json") as f:
        answers = json.load(f)
    return {"jpeg": jpeg, "raw": raw, **answers}


def test_serving_bytes_of_a_jpeg_file_gives_the_in_training_models_class(served, trained):
    assert served["imported"] == []
    # The evaluation pipeline's own preprocessing of these bytes.
    x = imagenet.decode_and_center_crop(tf.constant(served["jpeg"]), IMAGE_SIZE)[None]
    expected = tf.nn.softmax(trained(x, training=False), axis=-1).numpy()[0]
    assert served["jpeg_classes"] == [int(expected.argmax())] * 2
    np.testing.assert_allclose(served["jpeg_probabilities"][0], expected, rtol=1e-4, atol=1e-6)


def test_serving_default_takes_raw_images_of_any_size(served, trained):
    x = imagenet.center_crop(tf.constant(served["raw"]), IMAGE_SIZE)[None]
    expected = tf.nn.softmax(trained(x, training=False), axis=-1).numpy()[0]
    assert served["raw_classes"] == [int(expected.argmax())]
    np.testing.assert_allclose(served["raw_probabilities"][0], expected, rtol=1e-4, atol=1e-6)
    # A PNG of the same pixels through serving_bytes: the same preprocessing.
    np.testing.assert_allclose(
        served["png_probabilities"], served["raw_probabilities"], rtol=1e-5, atol=1e-7
    )


def test_export_measures_the_validation_split_through_the_eval_pipeline(run):
    result = run["result"]
    summary = files.read_json(paths.summary_file(paths.round_dir(run["run_dir"], ROUND)))
    assert result["eval_split"] == "test"  # ImageNet's test split is its validation split
    assert result["eval_examples"] == run["data"].num_examples("test") == 6
    assert result["exported_test_accuracy"] == pytest.approx(summary["test_accuracy"], abs=1e-6)
    assert result["density_prunable"] == pytest.approx(0.8**ROUND, abs=1e-3)
    assert len(result["layers"]) == 54  # 53 convolutions + the output layer
    assert result["sparse"]["zip_bytes"] < result["dense"]["zip_bytes"]
    assert set(result["signatures"]) >= {"serving_default", "serving_bytes"}


def test_eval_examples_caps_the_streamed_evaluation(run, tmp_path):
    saved_model = run["result"]["sparse"]["path"]
    measured = sparse_export.measure(saved_model, run["data"], batch_size=4, eval_examples=5)
    assert measured["examples"] == 5  # a full batch of 4 and 1 of the next


def test_center_crop_window_is_the_float_formula_it_replaced():
    # decode_and_center_crop used tf.round(shorter / (256 / 224)) in float64 (half to
    # even); the integer version must give the same crop for every image size.
    sides = np.arange(1, 20001)
    old = tf.maximum(
        tf.cast(tf.round(tf.constant(sides, tf.float64) / (256.0 / 224.0)), tf.int32), 1
    ).numpy()
    _, _, new = imagenet._center_crop_window(tf.constant(sides), tf.constant(sides + 7))
    np.testing.assert_array_equal(new.numpy(), old)
