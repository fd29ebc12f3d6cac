"""Contracts of lth_tf.data: the Dataset protocol for every kind of dataset, and the
in-memory datasets' splits, order, augmentation and bad files."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from conftest import write_mock_metadata

from lth_tf import data


def _take(ds, n):
    return [(x.numpy(), y.numpy()) for x, y in ds.take(n)]


@pytest.fixture(scope="module")
def mnist():
    return data.load("mnist")


def test_bundled_mnist_is_the_real_mnist_split_as_in_the_paper(mnist):
    a = mnist.arrays
    assert (len(a.x_train), len(a.x_val), len(a.x_test)) == (55000, 5000, 10000)
    assert mnist.input_shape == (28, 28, 1) and mnist.num_classes == 10
    assert a.x_train.dtype == np.uint8
    test_counts = np.bincount(a.y_test, minlength=10)
    assert test_counts.tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    train_counts = np.bincount(np.concatenate([a.y_train, a.y_val]), minlength=10)
    assert train_counts.tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    assert mnist.mean[0] == pytest.approx(0.1307, abs=2e-3)
    assert mnist.steps_per_epoch(60) == 916


def test_corrupted_bundled_file_is_detected(tmp_path):
    path = tmp_path / "mnist.npz"
    with open(data.bundled_mnist_path(), "rb") as f:
        blob = bytearray(f.read())
    blob[1000] ^= 0xFF
    path.write_bytes(bytes(blob))
    with pytest.raises(ValueError, match="corrupted"):
        data.load_npz(str(path), data.BUNDLED_MNIST_SHA256)


def test_a_run_started_at_step_k_sees_the_batches_the_full_run_saw_from_k(mnist):
    full = _take(mnist.train(60, data_seed=3), 920)
    for k in (0, 5, 916, 917):
        resumed = _take(mnist.train(60, data_seed=3, start_step=k), 3)
        for (x, y), (fx, fy) in zip(resumed, full[k : k + 3], strict=True):
            np.testing.assert_array_equal(x, fx)
            np.testing.assert_array_equal(y, fy)


def test_different_data_seeds_give_different_orders_and_epochs_differ(mnist):
    a = _take(mnist.train(60, data_seed=0), 1)[0][1]
    b = _take(mnist.train(60, data_seed=1), 1)[0][1]
    assert not np.array_equal(a, b)
    epoch0 = _take(mnist.train(60, data_seed=0), 1)[0][1]
    epoch1 = _take(mnist.train(60, data_seed=0, start_step=916), 1)[0][1]
    assert not np.array_equal(epoch0, epoch1)


def test_every_example_is_seen_once_per_epoch():
    # Each training example's label is its own index, so the labels say which examples came.
    n = 113
    x = np.random.default_rng(0).integers(0, 256, (n, 4, 4, 1), dtype=np.uint8)
    ids = np.arange(n, dtype=np.int64)
    ds = data.ArrayData("indexed", data.Arrays(x, ids, x[:8], ids[:8], x[:8], ids[:8], n))
    spe = ds.steps_per_epoch(10)
    assert spe == n // 10  # the last partial batch is dropped
    batches = _take(ds.train(10, 0), 3 * spe)
    epochs = [np.concatenate([y for _, y in batches[e * spe : (e + 1) * spe]]) for e in range(3)]
    for seen in epochs:
        assert len(seen) == spe * 10
        assert len(np.unique(seen)) == len(seen)  # no example twice in an epoch
        assert set(seen) <= set(ids)
    # Those left out of one epoch (n % 10 of them) are seen in another.
    assert set(np.concatenate(epochs)) == set(ids)
    # ... and each image comes with its own label.
    for images, labels in batches[:spe]:
        np.testing.assert_allclose(images, ds.serving_preprocess(x[labels]).numpy(), atol=1e-6)


def test_augmentation_is_per_image_and_reproducible():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (64, 32, 32, 3), dtype=np.uint8)
    y = rng.integers(0, 10, 64)
    arrays = data.Arrays(x, y, x[:8], y[:8], x[:8], y[:8], 10)
    aug = data.ArrayData("cifar-like", arrays, augment=True)
    plain = data.ArrayData("cifar-like", arrays, augment=False)
    a1 = _take(aug.train(32, 5), 2)
    a2 = _take(aug.train(32, 5), 2)
    p = _take(plain.train(32, 5), 2)
    for (x1, y1), (x2, _), (xp, yp) in zip(a1, a2, p, strict=True):
        np.testing.assert_array_equal(x1, x2)  # same seed, same augmentation
        np.testing.assert_array_equal(y1, yp)  # augmentation keeps the order and labels
        changed = [not np.array_equal(x1[i], xp[i]) for i in range(32)]
        assert any(changed)  # the images moved
    assert a1[0][0].shape == (32, 32, 32, 3)
    # Each image on its own draw: one image repeated over a batch comes out in several ways.
    same = np.repeat(x[:1], 64, axis=0)
    one = data.ArrayData("cifar-like", data.Arrays(same, y, x[:8], y[:8], x[:8], y[:8], 10), True)
    ((batch, _),) = _take(one.train(32, 5), 1)
    assert len({image.tobytes() for image in batch}) > 4


def test_eval_splits_cover_every_example_once(mnist):
    ys = np.concatenate([y.numpy() for _, y in mnist.eval("test", 1000)])
    np.testing.assert_array_equal(ys, mnist.arrays.y_test)
    with pytest.raises(ValueError, match="train, validation or test"):
        mnist.eval("dev", 10)


def _write_npz(path, **arrays):
    np.savez(path, **arrays)
    return f"npz:{path}"


def test_npz_dataset_takes_shape_and_classes_from_the_file(tmp_path):
    rng = np.random.default_rng(0)
    name = _write_npz(
        tmp_path / "d.npz",
        x_train=rng.integers(0, 256, (200, 12, 10), dtype=np.uint8),
        y_train=rng.integers(0, 7, 200),
        x_test=rng.integers(0, 256, (30, 12, 10), dtype=np.uint8),
        y_test=rng.integers(0, 7, 30),
    )
    ds = data.load(name)
    assert ds.input_shape == (12, 10, 1)
    assert ds.num_classes == int(max(ds.arrays.y_train.max(), ds.arrays.y_test.max())) + 1
    assert ds.num_train + ds.num_examples("validation") == 200


@pytest.mark.parametrize(
    "arrays, message",
    [
        (dict(x_train=np.zeros((50, 4, 4), np.uint8), y_train=np.zeros(50, int)), "lacks"),
        (
            dict(
                x_train=np.zeros((50, 4, 4), np.float32),
                y_train=np.zeros(50, int),
                x_test=np.zeros((5, 4, 4), np.float32),
                y_test=np.zeros(5, int),
            ),
            "uint8",
        ),
        (
            dict(
                x_train=np.zeros((50, 4, 4), np.uint8),
                y_train=np.zeros(49, int),
                x_test=np.zeros((5, 4, 4), np.uint8),
                y_test=np.zeros(5, int),
            ),
            "49",
        ),
        (
            dict(
                x_train=np.zeros((50, 4, 4), np.uint8),
                y_train=np.zeros(50, int),
                x_test=np.zeros((5, 5, 4), np.uint8),
                y_test=np.zeros(5, int),
            ),
            "x_test images",
        ),
        (
            dict(
                x_train=np.zeros((50,), np.uint8),
                y_train=np.zeros(50, int),
                x_test=np.zeros((5,), np.uint8),
                y_test=np.zeros(5, int),
            ),
            "N x H x W",
        ),
    ],
)
def test_malformed_npz_gets_a_clear_error(tmp_path, arrays, message):
    name = _write_npz(tmp_path / "bad.npz", **arrays)
    with pytest.raises(ValueError, match=message):
        data.load(name)


def test_missing_npz_and_unknown_names_are_explained(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        data.load(f"npz:{tmp_path}/nope.npz")
    with pytest.raises(ValueError, match="Known datasets"):
        data.load("svhn")
    with pytest.raises(ValueError, match="synthetic:HxWxC"):
        data.load("synthetic:big:10")


def test_synthetic_data_copies_the_architecture_shape():
    assert data.load("synthetic", arch_dataset="cifar10").input_shape == (32, 32, 3)
    ds = data.load("synthetic:16x16x3:5")
    assert ds.input_shape == (16, 16, 3) and ds.num_classes == 5


def test_cifar10_trains_on_all_50000_images_and_validates_on_test(monkeypatch):
    from lth_tf.data import tfds as tfds_lib

    rng = np.random.default_rng(0)
    fake = dict(
        x_train=rng.integers(0, 256, (500, 32, 32, 3), dtype=np.uint8),
        y_train=rng.integers(0, 10, 500),
        x_test=rng.integers(0, 256, (100, 32, 32, 3), dtype=np.uint8),
        y_test=rng.integers(0, 10, 100),
    )
    monkeypatch.setattr(tfds_lib, "load_arrays", lambda name, data_dir: fake)
    cifar = data.load("cifar10", augment=True)
    assert cifar.num_train == 500  # nothing held out: epochs have the paper's length
    np.testing.assert_array_equal(cifar.arrays.y_val, fake["y_test"])
    mnist = data.load("tfds:mnist")
    assert mnist.num_train == 450  # MNIST-like data holds out validation images


def _cifar_with_ids(monkeypatch, num_train=500, num_test=100):
    """Fakes tfds' CIFAR-10 with each training image's label its index (a unique id)."""
    from lth_tf.data import tfds as tfds_lib

    rng = np.random.default_rng(0)
    fake = dict(
        x_train=rng.integers(0, 256, (num_train, 32, 32, 3), dtype=np.uint8),
        y_train=np.arange(num_train),
        x_test=rng.integers(0, 256, (num_test, 32, 32, 3), dtype=np.uint8),
        y_test=np.arange(num_test),
    )
    monkeypatch.setattr(tfds_lib, "load_arrays", lambda name, data_dir: fake)
    return fake


def test_cifar10_validation_holdout_is_a_fixed_split_of_the_training_images(monkeypatch):
    fake = _cifar_with_ids(monkeypatch)
    cifar = data.load("cifar10", augment=True, validation_holdout=100)
    # The 2019 paper's protocol at 1/100 scale: 45,000 train + 5,000 validation.
    assert cifar.num_train == 400 and cifar.num_examples("validation") == 100
    assert cifar.steps_per_epoch(60) == 400 // 60  # epochs are over the kept images only
    # The last 100 stored training images, whatever the data seed; the test set is apart.
    np.testing.assert_array_equal(cifar.arrays.y_val, np.arange(400, 500))
    np.testing.assert_array_equal(cifar.arrays.x_val, fake["x_train"][400:])
    np.testing.assert_array_equal(cifar.arrays.x_test, fake["x_test"])
    again = data.load("cifar10", validation_holdout=100)
    np.testing.assert_array_equal(again.arrays.x_val, cifar.arrays.x_val)


@pytest.mark.parametrize("data_seed", [0, 7])
def test_cifar10_held_out_images_never_reach_training(monkeypatch, data_seed):
    _cifar_with_ids(monkeypatch)
    cifar = data.load("cifar10", augment=True, validation_holdout=100)
    held_out = set(cifar.arrays.y_val.tolist())
    spe = cifar.steps_per_epoch(50)
    seen = set()
    for _, y in _take(cifar.train(50, data_seed=data_seed), 3 * spe):  # three epochs
        seen.update(y.tolist())
    assert not seen & held_out
    assert seen == set(range(400))  # every kept image trains (8 full batches, none dropped)
    # The normalisation statistics come from the training images only.
    x = cifar.arrays.x_train.reshape(-1, 3) / 255.0
    np.testing.assert_allclose(cifar.mean, x.mean(axis=0), rtol=1e-5)


def test_cifar10_on_mocked_tfds_holds_out_disjoint_images(tmp_path):
    import tensorflow_datasets as tfds

    write_mock_metadata(tmp_path, "cifar10", {"train": 40, "test": 20})
    with tfds.testing.mock_data(num_examples=40, data_dir=os.fspath(tmp_path)):
        ds = data.load("cifar10", data_dir="/ignored/by/mock_data", validation_holdout=10)
        default = data.load("cifar10", data_dir="/ignored/by/mock_data")
    assert (ds.num_train, ds.num_examples("validation")) == (30, 10)
    train = {x.tobytes() for x in ds.arrays.x_train}
    assert not train & {x.tobytes() for x in ds.arrays.x_val}
    # The same 40 training images as without a holdout, split in two.
    everything = np.concatenate([ds.arrays.x_train, ds.arrays.x_val])
    np.testing.assert_array_equal(everything, default.arrays.x_train)
    np.testing.assert_array_equal(default.arrays.x_val, default.arrays.x_test)


def test_bundled_mnist_keeps_its_55000_5000_split(mnist):
    held = data.load("mnist", validation_holdout=5000)
    np.testing.assert_array_equal(held.arrays.y_val, mnist.arrays.y_val)
    assert held.num_train == mnist.num_train == 55000


def test_a_holdout_the_dataset_cannot_take_is_refused():
    with pytest.raises(ValueError, match="validation_holdout=2048 leaves no training"):
        data.load("synthetic:4x4x1:3", validation_holdout=2048)
    assert data.load("synthetic:4x4x1:3", validation_holdout=48).num_train == 2000
    with pytest.raises(ValueError, match="validation_holdout=5000.*imagenet2012"):
        data.load("imagenet2012", validation_holdout=5000)


# --------------------------------------------------------------------------- #
# The Dataset protocol, on every kind of dataset                              #
# --------------------------------------------------------------------------- #


def _assert_dataset_contract(ds, batch_size):
    """The protocol's methods, and resuming at step k across an epoch boundary."""
    assert isinstance(ds, data.Dataset)
    assert isinstance(ds.name, str) and ds.num_classes >= 2
    assert len(ds.input_shape) == 3
    spe = ds.steps_per_epoch(batch_size)
    assert spe >= 1
    # k and k + 1 are the last step of epoch 0 and the first of epoch 1.
    k = spe - 1
    full = _take(ds.train(batch_size, data_seed=3), k + 2)
    resumed = _take(ds.train(batch_size, data_seed=3, start_step=k), 2)
    for (x, y), (fx, fy) in zip(resumed, full[k:], strict=True):
        np.testing.assert_array_equal(x, fx)
        np.testing.assert_array_equal(y, fy)
    for x, y in full:
        assert x.shape == (batch_size, *ds.input_shape) and y.shape == (batch_size,)
        assert y.min() >= 0 and y.max() < ds.num_classes
    for split in data.SPLITS:
        sizes = [len(y) for _, y in ds.eval(split, batch_size)]
        assert sum(sizes) == ds.num_examples(split) > 0
        assert max(sizes) <= batch_size
    for method in (ds.num_examples, lambda s: ds.eval(s, batch_size)):
        with pytest.raises(ValueError, match="train, validation or test"):
            method("dev")


def test_in_memory_arrays_satisfy_the_protocol():
    arrays = data.synthetic_arrays((6, 6, 3), 3, num_train=50, num_test=10)
    _assert_dataset_contract(data.ArrayData("arrays", arrays, augment=True), 8)


def test_bundled_mnist_satisfies_the_protocol(mnist):
    _assert_dataset_contract(mnist, 5000)


def test_synthetic_satisfies_the_protocol():
    _assert_dataset_contract(data.load("synthetic:5x7x2:3"), 64)


def test_npz_satisfies_the_protocol(tmp_path):
    rng = np.random.default_rng(1)
    name = _write_npz(
        tmp_path / "d.npz",
        x_train=rng.integers(0, 256, (60, 5, 5, 3), dtype=np.uint8),
        y_train=rng.integers(0, 4, 60),
        x_test=rng.integers(0, 256, (9, 5, 5, 3), dtype=np.uint8),
        y_test=rng.integers(0, 4, 9),
    )
    _assert_dataset_contract(data.load(name, augment=True), 16)


@pytest.mark.parametrize("name, tfds_name", [("tfds:mnist", "mnist"), ("cifar10", "cifar10")])
def test_tfds_datasets_satisfy_the_protocol(tmp_path, name, tfds_name):
    import tensorflow_datasets as tfds

    write_mock_metadata(tmp_path, tfds_name, {"train": 40, "test": 40})
    with tfds.testing.mock_data(num_examples=40, data_dir=os.fspath(tmp_path)):
        ds = data.load(name, data_dir="/ignored/by/mock_data", augment=name == "cifar10")
    _assert_dataset_contract(ds, 8)


def test_imagenet_satisfies_the_protocol(imagenet_dir):
    ds = data.ImageNetData(imagenet_dir, image_size=16)
    assert (ds.num_examples("train"), ds.num_examples("test")) == (24, 6)
    _assert_dataset_contract(ds, 4)


def test_the_bundled_mnist_never_imports_tensorflow_datasets():
    # tensorflow_datasets takes seconds to import; runs on the bundled data skip it.
    script = textwrap.dedent(
        """
        import sys
        import lth_tf.data
        ds = lth_tf.data.load("mnist")
        next(iter(ds.train(60, 0)))
        assert "tensorflow_datasets" not in sys.modules, "tensorflow_datasets was imported"
        """
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr[-2000:]


def _numpy_channel_stats(x):
    # The float64 formula ArrayData used before channel_stats (kept as the reference).
    x = x.reshape(-1, x.shape[-1]).astype(np.float64) / 255.0
    return x.mean(axis=0).astype(np.float32), np.maximum(x.std(axis=0), 1e-3).astype(np.float32)


def test_channel_stats_are_numpys_float64_statistics_bit_for_bit(mnist):
    from lth_tf.data import arrays

    rng = np.random.default_rng(3)
    cases = [mnist.arrays.x_train, rng.integers(0, 256, (700, 9, 7, 3), dtype=np.uint8)]
    cases.append(np.full((20, 4, 4, 2), 7, np.uint8))  # constant: std clipped to 1e-3
    for x in cases:
        mean, std = arrays.channel_stats(x, chunk=1000)
        expected_mean, expected_std = _numpy_channel_stats(x)
        np.testing.assert_array_equal(mean, expected_mean)
        np.testing.assert_array_equal(std, expected_std)
        assert mean.dtype == std.dtype == np.float32


def test_pipeline_tensors_share_the_arrays_memory_and_freeze_them():
    from lth_tf.data import arrays

    ds = arrays.ArrayData("synthetic", arrays.synthetic_arrays((5, 5, 1), 3, num_train=300))
    x = ds.arrays.x_train
    assert x.ctypes.data % 64 == 0 and x.flags.c_contiguous
    tensor = ds._tensor("x_train")
    np.testing.assert_array_equal(tensor.numpy(), x)
    # The tensor reads the array's memory, so the array must not change any more.
    assert not x.flags.writeable
    # Arrays TensorFlow cannot share (unaligned) are copied and stay writable.
    unaligned = np.zeros(65, np.uint8)[1:]
    np.testing.assert_array_equal(arrays.shared_tensor(unaligned).numpy(), unaligned)
    assert unaligned.flags.writeable
