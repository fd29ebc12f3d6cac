"""Datasets as tf.data pipelines with a seeded, resumable data order.

Dataset names (`--dataset`):
  mnist            the real MNIST bundled inside the package (offline default),
                   55,000 train / 5,000 validation / 10,000 test as in the paper
  tfds:mnist       MNIST from TensorFlow Datasets (prepared in --data_dir)
  cifar10          CIFAR-10 from TensorFlow Datasets; augmentation is random
                   flip + 4-pixel pad-and-crop, per-channel normalisation; all
                   50,000 images train, the test set doubles as validation (as in
                   the authors' framework)
  imagenet2012     ImageNet from TensorFlow Datasets (streaming pipeline)
  npz:PATH         a user's .npz with x_train, y_train, x_test, y_test
  synthetic        random images of the architecture's natural input shape;
  synthetic:HxWxC:N  or of an explicit shape and class count (benchmarks)

The order of training batches is a function of (data_seed, epoch) alone, and a
pipeline started at step k yields exactly the batches a pipeline started at 0
yields from step k on: rewinding to step k replays the dense run's data, and a
different data_seed gives different SGD noise (the stability analyses need
both). Augmentation randomness is stateless too, keyed by (data_seed, step).
Each epoch has floor(N / batch) full batches (the remainder is dropped, as TPUs
need static shapes); the dropped examples differ between epochs.
"""

import dataclasses
import functools
import hashlib
import importlib.resources
import os

import numpy as np

from lth_tf.keras import tf

BUNDLED_MNIST_SHA256 = "06af5dfe73b70e3bc1c36439982b18a8d76803db9b544f6fdf838a37fbb01b64"
VALIDATION_SIZE = 5000
# The natural dataset of each architecture family, for `synthetic` without a shape.
_SYNTHETIC_SHAPES = {
    "mnist": ((28, 28, 1), 10),
    "cifar10": ((32, 32, 3), 10),
    "imagenet2012": ((224, 224, 3), 1000),
}
KNOWN = (
    "mnist",
    "tfds:mnist",
    "cifar10",
    "imagenet2012",
    "npz:PATH",
    "synthetic",
    "synthetic:HxWxC:N",
)


@dataclasses.dataclass(frozen=True)
class Arrays:
    """A dataset small enough to hold in memory: uint8 NHWC images, int labels."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int


class ArrayData:
    """tf.data pipelines over in-memory arrays (MNIST, CIFAR-10, npz, synthetic)."""

    def __init__(self, name: str, arrays: Arrays, augment: bool = False):
        self.name = name
        self.arrays = arrays
        self.augment = augment
        self.input_shape = tuple(arrays.x_train.shape[1:])
        self.num_classes = arrays.num_classes
        self.num_train = len(arrays.x_train)
        # Per-channel statistics of the training split, for normalisation.
        x = arrays.x_train.reshape(-1, self.input_shape[-1]).astype(np.float64) / 255.0
        self.mean = x.mean(axis=0).astype(np.float32)
        self.std = np.maximum(x.std(axis=0), 1e-3).astype(np.float32)
        self._tensors = {}

    def steps_per_epoch(self, batch_size: int) -> int:
        steps = self.num_train // batch_size
        if steps == 0:
            raise ValueError(
                f"Batch size {batch_size} is larger than the {self.num_train} training examples "
                f"of {self.name}; use a smaller --batch_size."
            )
        return steps

    def _tensor(self, key):
        # Keep one constant per array: pipelines built repeatedly share it.
        if key not in self._tensors:
            self._tensors[key] = tf.constant(getattr(self.arrays, key))
        return self._tensors[key]

    def _normalize(self, images):
        images = tf.cast(images, tf.float32) / 255.0
        return (images - self.mean) / self.std

    def train(self, batch_size: int, data_seed: int, start_step: int = 0) -> tf.data.Dataset:
        """Infinite training batches (images, labels) from global step `start_step`."""
        n = self.num_train
        spe = self.steps_per_epoch(batch_size)
        start_epoch, offset = divmod(start_step, spe)
        seed = tf.constant(_seed_word(data_seed), tf.int64)
        x, y = self._tensor("x_train"), self._tensor("y_train")

        def epoch_batches(epoch):
            perm = tf.random.experimental.stateless_shuffle(
                tf.range(n, dtype=tf.int64), seed=tf.stack([seed, epoch])
            )
            idx = tf.reshape(perm[: spe * batch_size], [spe, batch_size])
            return tf.data.Dataset.from_tensor_slices(
                (epoch * spe + tf.range(spe, dtype=tf.int64), idx)
            )

        def load(step, idx):
            images = tf.gather(x, idx)
            if self.augment:
                images = _flip_and_crop(images, tf.stack([seed + 1, step]))
            return self._normalize(images), tf.gather(y, idx)

        ds = tf.data.Dataset.range(start_epoch, 2**62).flat_map(epoch_batches).skip(offset)
        ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        return ds.prefetch(tf.data.AUTOTUNE).with_options(_options())

    def eval(self, split: str, batch_size: int) -> tf.data.Dataset:
        """One pass over 'train' (no augmentation), 'validation' or 'test'."""
        key = {"train": "train", "validation": "val", "test": "test"}.get(split)
        if key is None:
            raise ValueError(f"Unknown split {split!r}; expected train, validation or test.")
        x, y = self._tensor(f"x_{key}"), self._tensor(f"y_{key}")
        ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(batch_size)
        ds = ds.map(lambda a, b: (self._normalize(a), b), num_parallel_calls=tf.data.AUTOTUNE)
        return ds.prefetch(tf.data.AUTOTUNE).with_options(_options())

    def num_examples(self, split: str) -> int:
        return len(
            {
                "train": self.arrays.y_train,
                "validation": self.arrays.y_val,
                "test": self.arrays.y_test,
            }[split]
        )


class ImageNetData:
    """Streaming ImageNet from tfds (lth_tf.tfds_data), with the ArrayData interface.

    The validation split of ImageNet serves as both 'validation' and 'test', as in
    the papers (the test labels are not public).
    """

    name = "imagenet2012"
    input_shape = (224, 224, 3)
    num_classes = 1000

    def __init__(self, data_dir, augment: bool = True, image_size: int = 224):
        from lth_tf import tfds_data

        self._tfds = tfds_data
        self.data_dir = data_dir
        self.augment = augment
        self.image_size = image_size
        self.input_shape = (image_size, image_size, 3)
        counts = tfds_data.imagenet_num_examples(data_dir)
        self.num_train = counts["train"]
        self._num_eval = counts["validation"]

    def steps_per_epoch(self, batch_size: int) -> int:
        return ArrayData.steps_per_epoch(self, batch_size)

    def train(self, batch_size: int, data_seed: int, start_step: int = 0, input_context=None):
        return self._tfds.imagenet_dataset(
            self.data_dir,
            "train",
            batch_size=batch_size,
            training=True,
            seed=data_seed,
            image_size=self.image_size,
            start_step=start_step,
            steps_per_epoch=self.steps_per_epoch(batch_size),
            input_context=input_context,
        )

    def eval(self, split: str, batch_size: int, input_context=None):
        tfds_split = {"train": "train", "validation": "validation", "test": "validation"}[split]
        return self._tfds.imagenet_dataset(
            self.data_dir,
            tfds_split,
            batch_size=batch_size,
            training=False,
            seed=0,
            image_size=self.image_size,
            drop_remainder=False,
            input_context=input_context,
        )

    def num_examples(self, split: str) -> int:
        return self.num_train if split == "train" else self._num_eval


def no_autotune() -> tf.data.Options:
    """Options that turn tf.data autotuning off.

    With it on, many short fit() calls on small CPUs sometimes stalled 5-40 s after
    training ended (autotune's background thread); fixed parallelism avoids it.
    """
    options = tf.data.Options()
    options.autotune.enabled = False
    return options


def _options() -> tf.data.Options:
    options = no_autotune()
    options.deterministic = True
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return options


def _seed_word(data_seed: int) -> int:
    # Spread small user seeds over int64 so (seed, epoch) pairs of different runs
    # never coincide.
    digest = hashlib.sha256(f"lth_tf data order {data_seed}".encode()).digest()
    return int.from_bytes(digest[:7], "little")


def _flip_and_crop(images, seed, pad: int = 4):
    """Random horizontal flip and pad-and-crop, independently per image, stateless."""
    b, h, w = tf.shape(images)[0], images.shape[1], images.shape[2]
    flip_seed, crop_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    flip = tf.random.stateless_uniform([b], flip_seed) < 0.5
    images = tf.where(flip[:, None, None, None], tf.reverse(images, axis=[2]), images)
    padded = tf.pad(images, [[0, 0], [pad, pad], [pad, pad], [0, 0]])
    offsets = tf.random.stateless_uniform([b, 2], crop_seed, 0, 2 * pad + 1, dtype=tf.int32)
    rows = offsets[:, :1] + tf.range(h)[None, :]
    cols = offsets[:, 1:] + tf.range(w)[None, :]
    images = tf.gather(padded, rows, axis=1, batch_dims=1)
    return tf.gather(images, cols, axis=2, batch_dims=1)


def _split_validation(x, y, x_test, y_test, num_classes) -> Arrays:
    # The last examples of the training split are held out for validation (early
    # stopping), as the paper holds out 5,000 MNIST training images; npz and
    # synthetic data hold out 10%, at most 5,000.
    n_val = min(VALIDATION_SIZE, len(x) // 10)
    return Arrays(x[:-n_val], y[:-n_val], x[-n_val:], y[-n_val:], x_test, y_test, num_classes)


def _as_nhwc(x: np.ndarray, what: str, path: str) -> np.ndarray:
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4:
        raise ValueError(
            f"{path}: {what} has shape {x.shape}; expected N x H x W or N x H x W x C images."
        )
    return x


def bundled_mnist_path() -> str:
    return str(importlib.resources.files("lth_tf") / "data_files" / "mnist.npz")


@functools.lru_cache(maxsize=4)
def load_npz(path: str, expected_sha256: str | None = None) -> Arrays:
    """Reads an .npz with x_train, y_train, x_test, y_test (uint8 images, integer labels)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"--dataset=npz:{path}: no such file. Give the path of an .npz file holding "
            "x_train, y_train, x_test, y_test."
        )
    with open(path, "rb") as f:
        blob = f.read()
    if expected_sha256 is not None:
        digest = hashlib.sha256(blob).hexdigest()
        if digest != expected_sha256:
            raise ValueError(
                f"{path} is corrupted: sha256 {digest}, expected {expected_sha256}. "
                "Reinstall lth_tf (pip install --force-reinstall .)."
            )
    import io

    try:
        with np.load(io.BytesIO(blob), allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except Exception as e:  # a zip error, a pickled object array, ...
        raise ValueError(f"{path} is not a readable .npz file ({e}).") from e
    missing = {"x_train", "y_train", "x_test", "y_test"} - set(arrays)
    if missing:
        raise ValueError(
            f"{path} lacks {sorted(missing)}; it has {sorted(arrays)}. An npz dataset needs "
            "x_train, y_train, x_test, y_test (uint8 images, integer labels)."
        )
    x_train = _as_nhwc(arrays["x_train"], "x_train", path)
    x_test = _as_nhwc(arrays["x_test"], "x_test", path)
    for key, x in (("x_train", x_train), ("x_test", x_test)):
        if x.dtype != np.uint8:
            raise ValueError(f"{path}: {key} has dtype {x.dtype}; expected uint8 pixels 0..255.")
    if x_train.shape[1:] != x_test.shape[1:]:
        raise ValueError(
            f"{path}: x_train images are {x_train.shape[1:]} but x_test images are {x_test.shape[1:]}."
        )
    labels = {}
    for key, n in (("y_train", len(x_train)), ("y_test", len(x_test))):
        y = arrays[key]
        if y.ndim != 1 or len(y) != n or not np.issubdtype(y.dtype, np.integer):
            raise ValueError(
                f"{path}: {key} has shape {y.shape} and dtype {y.dtype}; expected {n} integer labels."
            )
        if len(y) and y.min() < 0:
            raise ValueError(f"{path}: {key} has negative labels; expected 0..num_classes-1.")
        labels[key] = y.astype(np.int64)
    num_classes = int(max(labels["y_train"].max(), labels["y_test"].max())) + 1
    if num_classes < 2:
        raise ValueError(f"{path}: labels have {num_classes} class; need at least 2.")
    if len(x_train) < 20:
        raise ValueError(f"{path}: only {len(x_train)} training examples; need at least 20.")
    return _split_validation(x_train, labels["y_train"], x_test, labels["y_test"], num_classes)


def synthetic_arrays(shape, num_classes, num_train=2048, num_test=512, seed=0) -> Arrays:
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, size=(num_train + num_test, *shape), dtype=np.uint8)
    y = rng.integers(0, num_classes, size=num_train + num_test).astype(np.int64)
    return _split_validation(
        x[:num_train], y[:num_train], x[num_train:], y[num_train:], num_classes
    )


def _parse_synthetic(name: str, arch_dataset: str):
    if name == "synthetic":
        return _SYNTHETIC_SHAPES[arch_dataset if arch_dataset in _SYNTHETIC_SHAPES else "mnist"]
    try:
        _, shape, classes = name.split(":")
        dims = tuple(int(d) for d in shape.lower().split("x"))
        if len(dims) not in (2, 3) or min(dims) < 1 or int(classes) < 2:
            raise ValueError
        return (dims if len(dims) == 3 else (*dims, 1)), int(classes)
    except ValueError:
        raise ValueError(
            f"--dataset={name!r}: expected 'synthetic' or 'synthetic:HxWxC:NUM_CLASSES', "
            "e.g. synthetic:32x32x3:10."
        ) from None


def check_name(name: str) -> None:
    """Validates a dataset name without touching the filesystem."""
    if name in ("mnist", "tfds:mnist", "cifar10", "imagenet2012", "synthetic"):
        return
    if name.startswith("synthetic:"):
        _parse_synthetic(name, "")
        return
    if name.startswith("npz:") and len(name) > 4:
        return
    raise ValueError(f"Unknown --dataset={name!r}. Known datasets: {', '.join(KNOWN)}.")


def load(
    name: str, *, data_dir: str | None = None, augment: bool = False, arch_dataset: str = "mnist"
):
    """Returns the dataset called `name` (see the module docstring).

    Args:
      name: the --dataset value.
      data_dir: where tfds datasets are prepared.
      augment: apply the dataset's training augmentation.
      arch_dataset: the architecture's natural dataset; `synthetic` copies its shape.
    """
    check_name(name)
    if name == "mnist":
        return ArrayData(name, load_npz(bundled_mnist_path(), BUNDLED_MNIST_SHA256), augment)
    if name.startswith("npz:"):
        return ArrayData(name, load_npz(os.path.abspath(name[4:])), augment)
    if name.startswith("synthetic"):
        shape, classes = _parse_synthetic(name, arch_dataset)
        return ArrayData(name, synthetic_arrays(shape, classes), augment)
    from lth_tf import tfds_data

    if name == "imagenet2012":
        return ImageNetData(data_dir, augment=augment)
    tfds_name = name.removeprefix("tfds:")
    a = tfds_data.load_arrays(tfds_name, data_dir)
    num_classes = int(max(a["y_train"].max(), a["y_test"].max())) + 1
    if tfds_name == "cifar10":
        # The authors' framework trains CIFAR-10 on all 50,000 images (so '160ep' and
        # the LR drops fall on the paper's iterations) and evaluates on the test set,
        # which therefore also serves as the 'validation' split here.
        arrays = Arrays(
            a["x_train"],
            a["y_train"],
            a["x_test"],
            a["y_test"],
            a["x_test"],
            a["y_test"],
            num_classes,
        )
    else:
        arrays = _split_validation(
            a["x_train"], a["y_train"], a["x_test"], a["y_test"], num_classes
        )
    return ArrayData(name, arrays, augment)
