"""Contracts of lth_tf.data.tfds and lth_tf.data.imagenet: no downloads, reproducible
and resumable ImageNet.

ImageNet is tested on a real tfds preparation of a tiny fake ImageNet (JPEG tar
files in the layout of the official ones, built by `tfds build`'s own code path),
so the file reading, file shuffling and JPEG decoding are the ones used in
production. mnist and cifar10 use `tfds.testing.mock_data`; so does one ImageNet
test, to show that mocked data goes through the same pipeline.
"""

import os
import time

import numpy as np
import pytest
import tensorflow_datasets as tfds
from conftest import NUM_TRAIN, NUM_VALIDATION, _jpeg, write_mock_metadata

from lth_tf.data import imagenet
from lth_tf.data import tfds as tfds_lib
from lth_tf.keras import tf

BATCH = 4
SIZE = 16


def _batches(ds, n):
    return [(x.numpy(), y.numpy()) for x, y in ds.take(n)]


def _train(data_dir, **kwargs):
    kwargs.setdefault("batch_size", BATCH)
    kwargs.setdefault("seed", 0)
    kwargs.setdefault("image_size", SIZE)
    return imagenet.imagenet_dataset(data_dir, "train", training=True, **kwargs)


def _assert_same_batches(got, want):
    assert len(got) == len(want)
    for (x, y), (wx, wy) in zip(got, want, strict=True):
        np.testing.assert_array_equal(x, wx)
        np.testing.assert_array_equal(y, wy)


# --------------------------------------------------------------------------- #
# Preparedness                                                                #
# --------------------------------------------------------------------------- #


def test_require_prepared_fails_fast_and_says_how_to_prepare(tmp_path):
    start = time.monotonic()
    with pytest.raises(FileNotFoundError) as raised:
        tfds_lib.require_prepared("mnist", os.fspath(tmp_path))
    assert time.monotonic() - start < 5
    message = str(raised.value)
    assert "'mnist'" in message and "3.0.1" in message
    assert os.fspath(tmp_path) in message
    assert f"tfds build mnist --data_dir={tmp_path}" in message
    assert not any(tmp_path.iterdir()), "require_prepared must not write or download"


def test_require_prepared_imagenet_explains_the_manual_download(tmp_path):
    with pytest.raises(FileNotFoundError) as raised:
        imagenet.imagenet_num_examples(os.fspath(tmp_path))
    message = str(raised.value)
    assert "imagenet2012" in message
    assert "ILSVRC2012_img_train.tar" in message
    assert os.path.join(os.fspath(tmp_path), "downloads", "manual") in message
    assert "tfds build imagenet2012" in message


def test_require_prepared_points_at_other_prepared_versions(tmp_path):
    old = tmp_path / "imagenet2012" / "5.0.0"
    old.mkdir(parents=True)
    (old / "dataset_info.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="5.0.0.*imagenet2012:<version>"):
        tfds_lib.require_prepared("imagenet2012", os.fspath(tmp_path))


def test_require_prepared_returns_the_builder(imagenet_dir):
    builder = tfds_lib.require_prepared("imagenet2012", imagenet_dir)
    assert builder.is_prepared() and builder.name == "imagenet2012"


# --------------------------------------------------------------------------- #
# Small datasets                                                              #
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("name, shape", [("mnist", (28, 28, 1)), ("cifar10", (32, 32, 3))])
def test_load_arrays_on_mocked_data(tmp_path, name, shape):
    write_mock_metadata(tmp_path, name, {"train": 12, "test": 12})
    with tfds.testing.mock_data(num_examples=12, data_dir=os.fspath(tmp_path)):
        arrays = tfds_lib.load_arrays(name, "/ignored/by/mock_data")
        again = tfds_lib.load_arrays(name, "/ignored/by/mock_data")
    assert sorted(arrays) == ["x_test", "x_train", "y_test", "y_train"]
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        assert x.shape == (12, *shape) and x.dtype == np.uint8
        assert y.shape == (12,) and y.dtype == np.int64
        assert y.min() >= 0 and y.max() < 10
        np.testing.assert_array_equal(x, again[f"x_{split}"])


# --------------------------------------------------------------------------- #
# ImageNet: preprocessing of one JPEG                                         #
# --------------------------------------------------------------------------- #


def test_eval_crop_normalizes_the_mean_color_to_zero():
    mean_color = np.broadcast_to(np.round(imagenet.IMAGENET_MEAN_RGB), (40, 70, 3))
    jpeg = tf.io.encode_jpeg(mean_color.astype(np.uint8), quality=100)
    image = imagenet.decode_and_center_crop(jpeg, 24)
    assert image.shape == (24, 24, 3) and image.dtype == tf.float32
    np.testing.assert_allclose(image.numpy(), 0.0, atol=0.05)


def test_random_crop_is_a_function_of_the_seed():
    rng = np.random.default_rng(1)
    jpeg = tf.constant(_jpeg(rng, 37, 91))
    seed = tf.constant([3, 4], tf.int64)
    first = imagenet.decode_and_random_crop(jpeg, seed, 20)
    assert first.shape == (20, 20, 3) and np.isfinite(first.numpy()).all()
    np.testing.assert_array_equal(first, imagenet.decode_and_random_crop(jpeg, seed, 20))
    other = imagenet.decode_and_random_crop(jpeg, tf.constant([3, 5], tf.int64), 20)
    assert not np.array_equal(first.numpy(), other.numpy())
    bf16 = imagenet.decode_and_random_crop(jpeg, seed, 20, tf.bfloat16)
    assert bf16.dtype == tf.bfloat16


# --------------------------------------------------------------------------- #
# ImageNet: pipelines                                                         #
# --------------------------------------------------------------------------- #


def test_imagenet_num_examples(imagenet_dir):
    assert imagenet.imagenet_num_examples(imagenet_dir) == {
        "train": NUM_TRAIN,
        "validation": NUM_VALIDATION,
    }


def test_training_batches_have_the_promised_shape(imagenet_dir):
    # 8 batches of 4 cover more than one 24-example epoch: the stream is infinite.
    batches = _batches(_train(imagenet_dir), 8)
    assert len(batches) == 8
    for x, y in batches:
        assert x.shape == (BATCH, SIZE, SIZE, 3) and x.dtype == np.float32
        assert np.isfinite(x).all() and -3 < x.mean() < 3
        assert y.shape == (BATCH,) and y.dtype == np.int32
        assert set(y) <= {0, 1, 2}


def test_same_seed_same_batches_and_other_seed_other_batches(imagenet_dir):
    first = _batches(_train(imagenet_dir, seed=7), 3)
    _assert_same_batches(_batches(_train(imagenet_dir, seed=7), 3), first)
    other = _batches(_train(imagenet_dir, seed=8), 3)
    assert not all(np.array_equal(x, ox) for (x, _), (ox, _) in zip(first, other, strict=True))


def test_order_does_not_depend_on_the_global_tf_seed(imagenet_dir):
    tf.random.set_seed(1)
    first = _batches(_train(imagenet_dir), 2)
    tf.random.set_seed(2)
    _assert_same_batches(_batches(_train(imagenet_dir), 2), first)


@pytest.mark.parametrize("start_step", [1, 7])  # 7 is in the second epoch.
def test_start_step_resumes_the_run_from_zero(imagenet_dir, start_step):
    from_zero = _batches(_train(imagenet_dir, seed=3), start_step + 2)
    resumed = _batches(_train(imagenet_dir, seed=3, start_step=start_step), 2)
    _assert_same_batches(resumed, from_zero[start_step:])


def test_deep_resume_jumps_to_its_epoch_instead_of_reading_the_earlier_ones(imagenet_dir):
    # Step 10**5 is 4e5 records in: reading them all takes minutes on 2 cores.
    start = time.monotonic()
    ((x, _),) = _batches(_train(imagenet_dir, start_step=10**5), 1)
    assert time.monotonic() - start < 10
    assert x.shape == (BATCH, SIZE, SIZE, 3)


def test_every_epoch_is_a_new_permutation_of_the_split(imagenet_dir):
    builder = tfds_lib.require_prepared("imagenet2012", imagenet_dir)
    records = imagenet._training_records(
        builder,
        "train",
        batch_size=BATCH,
        seed=0,
        start_step=0,
        steps_per_epoch=None,
        shuffle_buffer_size=8,
    )
    indices, jpegs = [], []
    for index, jpeg, _ in records.take(3 * NUM_TRAIN).as_numpy_iterator():
        indices.append(index)
        jpegs.append(jpeg)
    assert indices == list(range(3 * NUM_TRAIN))  # Augmentation seeds never repeat.
    epochs = [jpegs[e * NUM_TRAIN : (e + 1) * NUM_TRAIN] for e in range(3)]
    assert len(set(epochs[0])) == NUM_TRAIN
    assert all(sorted(epoch) == sorted(epochs[0]) for epoch in epochs)
    assert epochs[0] != epochs[1] != epochs[2]


def test_steps_per_epoch_starts_epochs_on_batch_boundaries(imagenet_dir):
    from_zero = _batches(_train(imagenet_dir, steps_per_epoch=2), 5)
    resumed = _batches(_train(imagenet_dir, steps_per_epoch=2, start_step=3), 2)
    _assert_same_batches(resumed, from_zero[3:])
    with pytest.raises(ValueError, match="at most 6 steps per epoch"):
        _train(imagenet_dir, steps_per_epoch=7)


def test_eval_pipeline_is_one_ordered_pass(imagenet_dir):
    def evaluate(**kwargs):
        return imagenet.imagenet_dataset(
            imagenet_dir,
            "validation",
            batch_size=BATCH,
            training=False,
            seed=0,
            image_size=SIZE,
            **kwargs,
        )

    batches = _batches(evaluate(drop_remainder=False, dtype=tf.bfloat16), 10)
    assert [y.shape[0] for _, y in batches] == [BATCH, NUM_VALIDATION - BATCH]
    x, y = batches[0]
    assert x.shape == (BATCH, SIZE, SIZE, 3) and x.dtype == tf.bfloat16.as_numpy_dtype
    assert y.dtype == np.int32
    assert len(_batches(evaluate(), 10)) == 1  # drop_remainder=True by default.
    again = _batches(evaluate(drop_remainder=False, dtype=tf.bfloat16), 10)
    _assert_same_batches(again, batches)


def test_unknown_split_lists_the_known_ones(imagenet_dir):
    with pytest.raises(ValueError, match="known splits: .*'validation'"):
        imagenet.imagenet_dataset(imagenet_dir, "val", batch_size=BATCH, training=False, seed=0)


def test_mocked_imagenet_goes_through_the_same_pipeline(tmp_path):
    # With the SkipDecoding decoder mock_data serves real (random) JPEG bytes, not
    # decoded images, so the production decode path runs on mocked data too.
    write_mock_metadata(tmp_path, "imagenet2012", {"train": 10, "validation": 10})
    with tfds.testing.mock_data(num_examples=10, data_dir=os.fspath(tmp_path)):
        train = _batches(_train("/ignored/by/mock_data"), 4)
        resumed = _batches(_train("/ignored/by/mock_data", start_step=3), 1)
        evaluation = _batches(
            imagenet.imagenet_dataset(
                "/ignored", "validation", batch_size=BATCH, training=False, seed=0, image_size=SIZE
            ),
            10,
        )
    assert all(x.shape == (BATCH, SIZE, SIZE, 3) and np.isfinite(x).all() for x, _ in train)
    _assert_same_batches(resumed, train[3:])
    assert len(evaluation) == 2


def test_evaluation_refuses_training_only_arguments(imagenet_dir):
    for kwargs in (dict(start_step=1), dict(steps_per_epoch=1)):
        with pytest.raises(ValueError, match="only apply to training pipelines"):
            imagenet.imagenet_dataset(
                imagenet_dir, "validation", batch_size=BATCH, training=False, seed=0, **kwargs
            )
