"""Datasets as tf.data pipelines with a seeded, resumable data order.

Dataset names (`--dataset`):
  mnist            the real MNIST bundled inside the package (offline default),
                   55,000 train / 5,000 validation / 10,000 test as in the paper
  tfds:mnist       MNIST from TensorFlow Datasets (prepared in --data_dir)
  tfds:NAME        any prepared tfds image classification dataset with image and
                   label features and train and test splits (fashion_mnist,
                   svhn_cropped, cifar100, ...), read into memory; the last 10%
                   of the training split validates (or validation_holdout)
  cifar10          CIFAR-10 from TensorFlow Datasets; augmentation is random
                   flip + 4-pixel pad-and-crop, per-channel normalisation; all
                   50,000 images train, the test set doubles as validation (as in
                   the authors' framework), unless validation_holdout > 0 holds
                   out the last N training images (5,000 for Conv-2/4/6, as in
                   the 2019 paper)
  imagenet2012     ImageNet from TensorFlow Datasets (streaming pipeline)
  npz:PATH         a user's .npz with x_train, y_train, x_test, y_test (and
                   optionally num_classes; arrays.load_npz says what is refused)
  synthetic        random images of the architecture's natural input shape;
  synthetic:HxWxC:N  or of an explicit shape and class count (benchmarks)
  package.module:function  your own: `function(data_dir=..., augment=...,
                   validation_holdout=...)` returns a `Dataset` (the whole
                   protocol, export's methods included; `ArrayData(name,
                   Arrays(...), augment)` over your arrays is one)

Every dataset satisfies the `Dataset` protocol (lth_tf.data.base): its training
order is a function of (data_seed, epoch) alone and `train(start_step=k)` yields
exactly the batches the run from step 0 yields from step k on.

Modules: base (the protocol, shared options and helpers), arrays (in-memory
data: bundled MNIST, npz, synthetic), tfds (TensorFlow Datasets: preparedness
checks, small datasets read into memory), imagenet (the streaming ImageNet
pipeline). tensorflow_datasets is imported only when a tfds dataset is loaded
(`tfds:mnist`, `cifar10`, `imagenet2012`), so the bundled data starts fast.
"""

import os

from lth_tf.data.arrays import (
    BUNDLED_MNIST_SHA256,
    VALIDATION_SIZE,
    ArrayData,
    Arrays,
    bundled_mnist_path,
    load_npz,
    split_validation,
    synthetic_arrays,
    synthetic_shape,
)
from lth_tf.data.base import SPLITS, Dataset, no_autotune

__all__ = [
    "BUNDLED_MNIST_SHA256",
    "KNOWN",
    "SPLITS",
    "VALIDATION_SIZE",
    "ArrayData",
    "Arrays",
    "Dataset",
    "ImageNetData",
    "bundled_mnist_path",
    "check_name",
    "load",
    "load_npz",
    "no_autotune",
    "split_validation",
    "synthetic_arrays",
    "synthetic_shape",
]

KNOWN = (
    "mnist",
    "tfds:mnist",
    "cifar10",
    "imagenet2012",
    "npz:PATH",
    "synthetic",
    "synthetic:HxWxC:N",
    "tfds:NAME",
    "package.module:function",
)
# Names served by TensorFlow Datasets, with the tfds name of each.
_TFDS_NAMES = {"tfds:mnist": "mnist", "cifar10": "cifar10", "imagenet2012": "imagenet2012"}


def __getattr__(name: str):
    # ImageNetData lives beside the pipeline that imports tensorflow_datasets; load
    # it on first use so that `import lth_tf.data` stays free of tfds.
    if name == "ImageNetData":
        from lth_tf.data.imagenet import ImageNetData

        return ImageNetData
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def check_name(name: str) -> None:
    """Validates a dataset name without touching the filesystem.

    Raises:
      ValueError: naming the known datasets, or the expected synthetic format.
    """
    if name in ("mnist", "synthetic") or name in _TFDS_NAMES:
        return
    if name.startswith("synthetic:"):
        synthetic_shape(name, "")
        return
    if name.startswith("npz:") and len(name) > 4:
        return
    if name.startswith("tfds:") and len(name) > 5:
        return
    if _is_function(name):
        return
    raise ValueError(f"Unknown --dataset={name!r}. Known datasets: {', '.join(KNOWN)}.")


# What `Dataset` declares (typing lists a protocol's members only from Python 3.12).
_PROTOCOL_MEMBERS = (
    "name",
    "input_shape",
    "num_classes",
    "serving_shape",
    "steps_per_epoch",
    "train",
    "eval",
    "num_examples",
    "serving_preprocess",
    "serving_preprocess_encoded",
    "raw_eval",
)


def _is_function(name: str) -> bool:
    from lth_tf import presets  # the same spelling as --arch=package.module:function

    return not name.startswith(("tfds:", "npz:", "synthetic:")) and presets.is_custom(name)


def _load_function(name: str, **kwargs) -> Dataset:
    """Calls the user's dataset function `name` and checks the protocol of its result."""
    from lth_tf import plugins

    fn = plugins.import_function(name, "dataset")
    dataset = fn(**kwargs)
    missing = [m for m in _PROTOCOL_MEMBERS if not hasattr(dataset, m)]
    if missing:
        raise ValueError(
            f"--dataset={name} returned a {type(dataset).__name__}, which lacks "
            f"{', '.join(sorted(missing))} of the lth_tf.data.Dataset protocol. Return an "
            "lth_tf.data.ArrayData over your arrays, or implement the whole protocol."
        )
    return dataset


def load(
    name: str,
    *,
    data_dir: str | None = None,
    augment: bool = False,
    arch_dataset: str = "mnist",
    validation_holdout: int = 0,
    input_shards: int = 0,
) -> Dataset:
    """Returns the dataset called `name` (see the module docstring).

    Args:
      name: the --dataset value.
      data_dir: where tfds datasets are prepared.
      augment: apply the dataset's training augmentation.
      arch_dataset: the architecture's natural dataset; `synthetic` copies its shape.
      validation_holdout: hold the last this many training examples out for
        validation (a fixed split, independent of the data seed); 0 keeps the
        dataset's convention. In-memory datasets only (not imagenet2012).
      input_shards: imagenet2012 only: the virtual shards that define its training
        order (`lth_tf.data.imagenet.imagenet_dataset`); 0 for the others.

    Raises:
      ValueError: for an unknown name, a malformed npz file, or a
        validation_holdout the dataset cannot take.
      FileNotFoundError: for a missing npz file or a tfds dataset not prepared in
        `data_dir` (the message says how to prepare it).
    """
    check_name(name)
    holdout = validation_holdout
    if input_shards and name != "imagenet2012":
        raise ValueError(
            f"input_shards={input_shards}: only imagenet2012 is read in shards; {name} is "
            "read whole by every host. Use --input_shards=0."
        )
    if _is_function(name):
        return _load_function(name, data_dir=data_dir, augment=augment, validation_holdout=holdout)
    if name == "mnist":
        arrays = load_npz(bundled_mnist_path(), BUNDLED_MNIST_SHA256, holdout)
        return ArrayData(name, arrays, augment)
    if name.startswith("npz:"):
        return ArrayData(name, load_npz(os.path.abspath(name[4:]), None, holdout), augment)
    if name.startswith("synthetic"):
        shape, classes = synthetic_shape(name, arch_dataset)
        return ArrayData(
            name, synthetic_arrays(shape, classes, validation_holdout=holdout), augment
        )
    if name == "imagenet2012":
        if holdout:
            raise ValueError(
                f"validation_holdout={holdout}: imagenet2012 validates on its own held-out "
                "split and cannot hold training images out; use --validation_holdout=0."
            )
        from lth_tf.data.imagenet import ImageNetData

        return ImageNetData(data_dir, augment=augment, input_shards=input_shards)
    from lth_tf.data import tfds

    tfds_name = _TFDS_NAMES.get(name) or name.removeprefix("tfds:")
    return ArrayData(name, tfds.arrays(tfds_name, data_dir, holdout), augment)
