"""In-memory datasets: the bundled MNIST, a user's .npz, synthetic images.

`ArrayData` also serves the small tfds datasets (CIFAR-10, tfds:mnist) once
lth_tf.data.tfds has read them into `Arrays`. Augmentation randomness is
stateless, keyed by (data_seed, step), so it replays with the data order.
Each epoch has floor(N / batch) full batches; the dropped examples differ
between epochs.
"""

import dataclasses
import functools
import hashlib
import importlib.resources
import io
import os

import numpy as np

import lth_tf.data.base as base
from lth_tf.keras import tf

BUNDLED_MNIST_SHA256 = "06af5dfe73b70e3bc1c36439982b18a8d76803db9b544f6fdf838a37fbb01b64"
VALIDATION_SIZE = 5000
# The natural dataset of each architecture family, for `synthetic` without a shape.
SYNTHETIC_SHAPES = {
    "mnist": ((28, 28, 1), 10),
    "cifar10": ((32, 32, 3), 10),
    "imagenet2012": ((224, 224, 3), 1000),
}


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
    """A `Dataset` over in-memory arrays (MNIST, CIFAR-10, npz, synthetic).

    Attributes beyond the protocol: `arrays`, `num_train`, and the per-channel
    `mean` and `std` of the training split that normalise every image (export
    builds them into the SavedModel).
    """

    def __init__(self, name: str, arrays: Arrays, augment: bool = False):
        self.name = name
        self.arrays = arrays
        self.augment = augment
        self.input_shape = tuple(arrays.x_train.shape[1:])
        # What serving takes: raw images of exactly the training shape.
        self.serving_shape = self.input_shape
        self.num_classes = arrays.num_classes
        self.num_train = len(arrays.x_train)
        # Per-channel statistics of the training split, for normalisation.
        self.mean, self.std = channel_stats(arrays.x_train)
        self._tensors = {}

    def steps_per_epoch(self, batch_size: int) -> int:
        """Full batches per epoch; raises a ValueError when not even one fits."""
        return base.steps_per_epoch(self.name, self.num_train, batch_size)

    def _tensor(self, key):
        # Keep one tensor per array: pipelines built repeatedly share it.
        if key not in self._tensors:
            self._tensors[key] = shared_tensor(getattr(self.arrays, key))
        return self._tensors[key]

    def _normalize(self, images):
        images = tf.cast(images, tf.float32) / 255.0
        return (images - self.mean) / self.std

    def train(
        self,
        batch_size: int,
        data_seed: int,
        start_step: int = 0,
        input_context: tf.distribute.InputContext | None = None,
    ) -> tf.data.Dataset:
        """Infinite training batches (images, labels) from global step `start_step`.

        Args:
          batch_size: the global batch.
          data_seed: the order and augmentation seed.
          start_step: the first step yielded (rewinding, resuming).
          input_context: under `distribute_datasets_from_function`: yield only this
            pipeline's share of every global batch, as per-replica batches (see
            lth_tf.data.base). None: the whole global batches.
        """
        n = self.num_train
        spe = self.steps_per_epoch(batch_size)
        start_epoch, offset = divmod(start_step, spe)
        seed = tf.constant(base.seed_word(data_seed), tf.int64)
        x, y = self._tensor("x_train"), self._tensor("y_train")
        if input_context is None:
            # One pipeline: whole global batches.
            part = base.Share(batch_size, batch_size, 1, 0)
        else:
            part = base.share(batch_size, input_context)

        def epoch_batches(epoch):
            perm = tf.random.experimental.stateless_shuffle(
                tf.range(n, dtype=tf.int64), seed=tf.stack([seed, epoch])
            )
            idx = tf.reshape(perm[: spe * batch_size], [spe, batch_size])
            # This pipeline's positions of each global batch, cut into its replicas'
            # consecutive batches: [spe * replicas, per_replica].
            idx = tf.reshape(
                idx[:, part.first : part.first + part.size],
                [spe * part.replicas, part.per_replica],
            )
            steps = tf.repeat(epoch * spe + tf.range(spe, dtype=tf.int64), part.replicas)
            firsts = part.first + part.per_replica * tf.tile(
                tf.range(part.replicas, dtype=tf.int32), [spe]
            )
            return tf.data.Dataset.from_tensor_slices((steps, firsts, idx))

        def load(step, first, idx):
            images = tf.gather(x, idx)
            if self.augment:
                # Random numbers are drawn for the whole global batch and this share
                # picked from them, so that an example's augmentation does not depend
                # on how many pipelines there are.
                images = _flip_and_crop(
                    images, tf.stack([seed + 1, step]), batch_size=batch_size, first=first
                )
            return self._normalize(images), tf.gather(y, idx)

        ds = tf.data.Dataset.range(start_epoch, 2**62).flat_map(epoch_batches)
        ds = ds.skip(offset * part.replicas)
        ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        options = base.in_memory_options()
        if input_context is not None:
            options = base.per_pipeline_options(options)
        return ds.prefetch(tf.data.AUTOTUNE).with_options(options)

    def eval(
        self,
        split: str,
        batch_size: int,
        input_context: tf.distribute.InputContext | None = None,
    ) -> tf.data.Dataset:
        """One pass over 'train' (no augmentation), 'validation' or 'test'.

        With `input_context`, this pipeline's per-replica batches of its share of
        the split (`base.eval_share`).
        """
        base.check_split(split)
        key = {"train": "train", "validation": "val", "test": "test"}[split]
        x, y = self._tensor(f"x_{key}"), self._tensor(f"y_{key}")
        ds = tf.data.Dataset.from_tensor_slices((x, y))
        if input_context is not None:
            ds = base.eval_share(
                ds,
                self.num_examples(split),
                batch_size,
                input_context,
                lambda a, b: (self._normalize(a), b),
            )
            return ds.with_options(base.per_pipeline_options(base.in_memory_options()))
        ds = ds.batch(batch_size)
        ds = ds.map(lambda a, b: (self._normalize(a), b), num_parallel_calls=tf.data.AUTOTUNE)
        return ds.prefetch(tf.data.AUTOTUNE).with_options(base.in_memory_options())

    def num_examples(self, split: str) -> int:
        """The number of examples of 'train', 'validation' or 'test'."""
        base.check_split(split)
        return len(
            {
                "train": self.arrays.y_train,
                "validation": self.arrays.y_val,
                "test": self.arrays.y_test,
            }[split]
        )

    def serving_preprocess(self, images: tf.Tensor) -> tf.Tensor:
        """Model inputs from a batch of raw images (pixels 0-255, uint8 or float).

        The normalisation of `train` and `eval`.
        """
        return self._normalize(images)

    def serving_preprocess_encoded(self, image_bytes: tf.Tensor) -> tf.Tensor:
        """The model input of one encoded image (PNG, JPEG, GIF or BMP; scalar string).

        The image must have the dataset's shape (e.g. 28x28 for MNIST; colour
        images are converted to the dataset's number of channels).
        """
        image = tf.io.decode_image(
            image_bytes, channels=self.input_shape[-1], expand_animations=False
        )
        image = tf.ensure_shape(image, self.input_shape)
        return self._normalize(image[None])[0]

    def raw_eval(self, split: str) -> tf.data.Dataset:
        """The examples of `eval(split, ...)`, in its order, as raw (uint8 image, label); unbatched."""
        base.check_split(split)
        key = {"train": "train", "validation": "val", "test": "test"}[split]
        return tf.data.Dataset.from_tensor_slices(
            (self._tensor(f"x_{key}"), self._tensor(f"y_{key}"))
        )


def channel_stats(images: np.ndarray, chunk: int = 1 << 20) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and standard deviation (at least 1e-3) of uint8 images scaled to [0, 1].

    Computed exactly from integer sums, one chunk of pixels at a time: a float64
    copy of the whole split (345 MB for MNIST, twice that during `std`) used to
    make the peak memory of a run. The float64 results are the exactly rounded
    statistics, and their float32 values are those of numpy's `mean` and `std`
    of `images / 255.0` (tests/test_data.py checks MNIST and synthetic data).

    Returns:
      (mean, std), float32 arrays of one value per channel.
    """
    pixels = images.reshape(-1, images.shape[-1])
    n = len(pixels)
    total = np.zeros(pixels.shape[1], np.int64)
    squares = np.zeros(pixels.shape[1], np.int64)
    for i in range(0, n, chunk):
        block = pixels[i : i + chunk].astype(np.int64)
        total += block.sum(axis=0)
        squares += (block * block).sum(axis=0)
    # Python integers are exact; one true division rounds once (to float64).
    mean = [int(s) / (255 * n) for s in total]
    var = [
        (n * int(q) - int(s) ** 2) / (255**2 * n**2) for s, q in zip(total, squares, strict=True)
    ]
    std = np.sqrt(np.asarray(var, np.float64))
    return np.asarray(mean, np.float64).astype(np.float32), np.maximum(std, 1e-3).astype(np.float32)


def _flip_and_crop(images, seed, pad: int = 4, *, batch_size=None, first=0):
    """Random horizontal flip and pad-and-crop, independently per image, stateless.

    The random numbers are drawn for a batch of `batch_size` (default: the
    images') and those of positions [first, first + len(images)) are used.
    """
    b, h, w = tf.shape(images)[0], images.shape[1], images.shape[2]
    n = b if batch_size is None else batch_size
    flip_seed, crop_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    flip = tf.random.stateless_uniform([n], flip_seed)[first : first + b] < 0.5
    images = tf.where(flip[:, None, None, None], tf.reverse(images, axis=[2]), images)
    padded = tf.pad(images, [[0, 0], [pad, pad], [pad, pad], [0, 0]])
    offsets = tf.random.stateless_uniform([n, 2], crop_seed, 0, 2 * pad + 1, dtype=tf.int32)
    offsets = offsets[first : first + b]
    rows = offsets[:, :1] + tf.range(h)[None, :]
    cols = offsets[:, 1:] + tf.range(w)[None, :]
    images = tf.gather(padded, rows, axis=1, batch_dims=1)
    return tf.gather(images, cols, axis=2, batch_dims=1)


# TensorFlow's CPU kernels need buffers aligned to 64 bytes (EIGEN_MAX_ALIGN_BYTES).
_ALIGN = 64


def aligned(x: np.ndarray) -> np.ndarray:
    """`x` itself when it is C-contiguous and 64-byte aligned, else such a copy of it."""
    if x.flags.c_contiguous and x.ctypes.data % _ALIGN == 0:
        return x
    buffer = np.empty(x.nbytes + _ALIGN, np.uint8)
    start = -buffer.ctypes.data % _ALIGN
    out = buffer[start : start + x.nbytes].view(x.dtype).reshape(x.shape)
    out[...] = x
    return out


def shared_tensor(x: np.ndarray) -> tf.Tensor:
    """A tensor of `x`'s values that reads `x`'s own memory when TensorFlow can.

    `tf.constant` copies: with the numpy arrays kept too (`ArrayData.arrays`),
    every in-memory dataset used to be held twice (55 MB more for MNIST, 180 MB
    for CIFAR-10). A C-contiguous, 64-byte aligned array (as `split_validation`
    makes them) is shared through DLPack instead, and made read-only, since the
    tensor must never change under a pipeline. Other arrays are copied.
    """
    if x.size and x.flags.c_contiguous and x.flags.writeable and x.ctypes.data % _ALIGN == 0:
        tensor = tf.experimental.dlpack.from_dlpack(x.__dlpack__())
        x.flags.writeable = False
        return tensor
    return tf.constant(x)


def split_validation(x, y, x_test, y_test, num_classes, size: int = 0) -> Arrays:
    """Holds the last `size` training examples out for validation (early stopping).

    The last examples in the stored order, so the split is the same in every run
    whatever its data_seed, and the training split never contains a validation
    example. `size` 0 is the default: 10% of the training split, at most 5,000 (the
    paper holds out 5,000 of MNIST's 60,000).

    Raises:
      ValueError: if `size` leaves no training example.
    """
    if not isinstance(size, int) or size < 0:
        raise ValueError(f"validation_holdout must be an integer >= 0, got {size!r}.")
    if size >= len(x):
        raise ValueError(
            f"validation_holdout={size} leaves no training examples: the training split has "
            f"{len(x)}. Hold out fewer (--validation_holdout below {len(x)}), or 0 for the "
            "dataset's default validation split."
        )
    n_val = size or min(VALIDATION_SIZE, len(x) // 10)
    # Each split gets its own aligned buffer, which the pipelines' tensors share
    # (`shared_tensor`): no second copy of the images.
    splits = (x[:-n_val], y[:-n_val], x[-n_val:], y[-n_val:], x_test, y_test)
    return Arrays(*(aligned(a) for a in splits), num_classes)


def _as_nhwc(x: np.ndarray, what: str, path: str) -> np.ndarray:
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4:
        raise ValueError(
            f"{path}: {what} has shape {x.shape}; expected N x H x W or N x H x W x C images."
        )
    return x


def _num_classes(arrays: dict, path: str) -> int:
    """The number of classes of an npz dataset: declared, or read from dense labels.

    A `num_classes` entry (an integer scalar) declares it: every label must lie in
    0..num_classes-1 (classes without a training example are allowed). Without it
    the labels must be dense: the classes are 0..max(y_train) and each of them has
    a training example, so that a stray label (200000 among 10 classes) cannot
    build a 200001-class model.
    """
    if "num_classes" in arrays:
        declared = arrays["num_classes"]
        if declared.shape != () or not np.issubdtype(declared.dtype, np.integer) or declared < 2:
            raise ValueError(
                f"{path}: num_classes is {declared!r}; expected one integer >= 2 (the number "
                "of classes; labels run 0..num_classes-1)."
            )
        return int(declared)
    y = arrays["y_train"]
    top = int(y.max())
    if top < 1:
        raise ValueError(f"{path}: y_train has a single class ({top}); need at least 2.")
    present = np.unique(y)
    if len(present) != top + 1:
        missing = top + 1 - len(present)
        raise ValueError(
            f"{path}: y_train's labels run up to {top} but {missing:,} of the classes "
            f"0..{top} have no training example ({len(present)} distinct labels): labels "
            "must be dense. Renumber the classes 0..K-1, or declare the number of classes "
            "with a num_classes entry (np.savez(..., num_classes=K))."
        )
    return top + 1


def bundled_mnist_path() -> str:
    """The path of the MNIST .npz shipped inside the package (lth_tf/data_files)."""
    return str(importlib.resources.files("lth_tf") / "data_files" / "mnist.npz")


@functools.lru_cache(maxsize=4)
def load_npz(path: str, expected_sha256: str | None = None, validation_holdout: int = 0) -> Arrays:
    """Reads an .npz with x_train, y_train, x_test, y_test (uint8 images, integer labels).

    Optionally num_classes (an integer scalar); without it the labels must be
    dense (`_num_classes`). Every value that cannot make sense is refused here,
    before a run directory is written: images of 0 pixels, an empty split, labels
    outside 0..num_classes-1 or of a non-integer dtype.

    The last `validation_holdout` training examples (0: the default, see
    `split_validation`) are held out for validation.
    """
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
        if min(x.shape[1:]) < 1:
            raise ValueError(
                f"{path}: {key} has shape {x.shape}: images of {'x'.join(map(str, x.shape[1:]))} "
                "pixels hold nothing; expected images of at least 1x1 pixel and 1 channel."
            )
    if x_train.shape[1:] != x_test.shape[1:]:
        raise ValueError(
            f"{path}: x_train images are {x_train.shape[1:]} but x_test images are {x_test.shape[1:]}."
        )
    if len(x_train) < 20:
        raise ValueError(f"{path}: only {len(x_train)} training examples; need at least 20.")
    if len(x_test) == 0:
        raise ValueError(f"{path}: x_test holds no image; the test split needs at least one.")
    for key, n in (("y_train", len(x_train)), ("y_test", len(x_test))):
        y = arrays[key]
        if y.ndim != 1 or len(y) != n or not np.issubdtype(y.dtype, np.integer):
            raise ValueError(
                f"{path}: {key} has shape {y.shape} and dtype {y.dtype}; expected {n} integer labels."
            )
        if y.min() < 0:
            raise ValueError(f"{path}: {key} has negative labels; expected 0..num_classes-1.")
    num_classes = _num_classes(arrays, path)
    labels = {}
    for key in ("y_train", "y_test"):
        y = arrays[key]
        top = int(y.max())  # a Python int: exact for uint64 labels >= 2**63
        if top >= num_classes:
            raise ValueError(
                f"{path}: {key} has the label {top}, outside 0..{num_classes - 1} "
                f"({num_classes} classes). Fix the labels, or declare the number of classes "
                "with a num_classes entry in the file."
            )
        labels[key] = y.astype(np.int64)
    return split_validation(
        x_train, labels["y_train"], x_test, labels["y_test"], num_classes, validation_holdout
    )


def synthetic_arrays(
    shape, num_classes, num_train=2048, num_test=512, seed=0, validation_holdout: int = 0
) -> Arrays:
    """Uniform random uint8 images of `shape` with random labels (benchmarks, tests)."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, size=(num_train + num_test, *shape), dtype=np.uint8)
    y = rng.integers(0, num_classes, size=num_train + num_test).astype(np.int64)
    return split_validation(
        x[:num_train], y[:num_train], x[num_train:], y[num_train:], num_classes, validation_holdout
    )


def synthetic_shape(name: str, arch_dataset: str) -> tuple[tuple[int, int, int], int]:
    """(image shape, number of classes) of a `synthetic[:HxWxC:N]` dataset name.

    Args:
      name: 'synthetic' (the shape of `arch_dataset`, MNIST when unknown) or
        'synthetic:HxWxC:N' / 'synthetic:HxW:N'.
      arch_dataset: the architecture's natural dataset.

    Raises:
      ValueError: for a malformed name, showing the expected format.
    """
    if name == "synthetic":
        return SYNTHETIC_SHAPES[arch_dataset if arch_dataset in SYNTHETIC_SHAPES else "mnist"]
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
