"""TensorFlow Datasets: the preparedness checks, and small datasets read into memory.

Nothing here ever downloads. Training machines (TPU VMs, GPU nodes) often have no
network, and a `tfds.load` of a dataset that is not prepared retries its download
for minutes before failing. Every tfds dataset goes through `require_prepared`,
which fails at once and says how to prepare the dataset on a machine that has
network.

This module imports tensorflow_datasets (seconds of startup): lth_tf.data imports
it only when a tfds dataset is loaded.
"""

import os

import numpy as np
import tensorflow_datasets as tfds

from lth_tf.data.arrays import Arrays, split_validation


def require_prepared(name: str, data_dir: str | None) -> tfds.core.DatasetBuilder:
    """Returns the builder of a prepared tfds dataset; never downloads.

    Args:
      name: tfds name, optionally with config and version, e.g. ``'mnist'``,
        ``'imagenet2012'`` or ``'imagenet2012:5.0.0'``.
      data_dir: tfds data directory; ``None`` searches tfds' default directories
        (``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``).

    Returns:
      The `tfds.core.DatasetBuilder`, ready for ``as_dataset``.

    Raises:
      FileNotFoundError: if the dataset is not prepared in ``data_dir``. The message
        names what was looked for and how to prepare it.
    """
    builder = tfds.builder(name, data_dir=data_dir)
    if builder.is_prepared():
        return builder
    raise FileNotFoundError(_not_prepared_message(name, data_dir, builder))


def _not_prepared_message(name: str, data_dir: str | None, builder) -> str:
    root = os.fspath(builder.data_dir_root) if data_dir is None else os.fspath(data_dir)
    base_name = builder.name
    lines = [
        f"tfds dataset {name!r} (version {builder.version}) is not prepared: "
        f"{builder.data_dir} has no dataset_info.json/features.json "
        f"(data_dir={data_dir!r}). lth_tf never downloads datasets (training "
        "machines often have no network, and tfds would retry the download for "
        "minutes), so prepare it once beforehand."
    ]
    # A different version in the same directory is the most common near miss
    # (e.g. imagenet2012 5.0.0 prepared by an older tfds).
    dataset_root = os.path.join(root, base_name)
    if os.path.isdir(dataset_root):
        found = sorted(
            os.path.relpath(dirpath, dataset_root)
            for dirpath, _, files in os.walk(dataset_root)
            if "dataset_info.json" in files
        )
        if found:
            lines.append(
                f"Prepared versions found under {dataset_root}: {', '.join(found)}; "
                f"to use one, pass the name as '{base_name}:<version>'."
            )
    if builder.MANUAL_DOWNLOAD_INSTRUCTIONS:
        manual_dir = os.path.join(root, "downloads", "manual")
        if base_name.startswith("imagenet2012"):
            lines.append(
                "ImageNet cannot be downloaded by tfds: register at "
                "https://image-net.org/download-images, download "
                f"ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar into {manual_dir}, "
                f"then run `tfds build {base_name} --data_dir={root}` "
                "(about 150 GB of disk, some hours)."
            )
        else:
            lines.append(
                f"{base_name} needs a manual download into {manual_dir}: "
                f"{builder.MANUAL_DOWNLOAD_INSTRUCTIONS.strip()} Then run "
                f"`tfds build {base_name} --data_dir={root}`."
            )
    else:
        lines.append(
            f"On a machine with network access run `tfds build {base_name} "
            f"--data_dir={root}` (or `tfds.builder({base_name!r}, data_dir=...)"
            ".download_and_prepare()`), then copy "
            f"{dataset_root} to this machine's data_dir."
        )
    return "\n".join(lines)


def require_split(builder, split: str) -> None:
    """Fails early, listing the known splits, when ``split`` is not one of them."""
    known = list(builder.info.splits.keys())
    if not known:  # Metadata without split information: let tfds decide.
        return
    try:
        builder.info.splits[split]
    except (KeyError, ValueError) as e:
        raise ValueError(
            f"Split {split!r} is not available in {builder.name} "
            f"{builder.version} at {builder.data_dir}; known splits: {known}. "
            "ImageNet's held-out split is called 'validation'."
        ) from e


# --------------------------------------------------------------------------- #
# Small datasets as numpy                                                     #
# --------------------------------------------------------------------------- #


def load_arrays(name: str, data_dir: str | None) -> dict[str, np.ndarray]:
    """Loads the full train and test splits of a small image dataset as numpy.

    Meant for datasets that fit in memory ('mnist', 'cifar10', 'fashion_mnist',
    'cifar100'...). The examples keep tfds' stored order (no file shuffling), so
    two calls return identical arrays.

    Args:
      name: tfds name of a dataset with ``('image', 'label')`` supervised keys and
        'train' and 'test' splits.
      data_dir: tfds data directory (see `require_prepared`).

    Returns:
      ``{'x_train', 'y_train', 'x_test', 'y_test'}``: images as uint8 arrays of
      shape (N, H, W, C) and labels as int64 arrays of shape (N,).

    Raises:
      FileNotFoundError: if the dataset is not prepared (see `require_prepared`).
      ValueError: if the dataset has no supervised keys or lacks a split.
    """
    builder = require_prepared(name, data_dir)
    if builder.info.supervised_keys is None:
        raise ValueError(
            f"tfds dataset {name!r} has no supervised (image, label) keys; "
            "load_arrays expects an image classification dataset such as "
            "'mnist' or 'cifar10'."
        )
    arrays = {}
    for split in ("train", "test"):
        require_split(builder, split)
        # batch_size=-1 returns the whole split as one pair of tensors, which
        # tfds.as_numpy converts far faster than iterating example by example.
        ds = builder.as_dataset(
            split=split,
            batch_size=-1,
            as_supervised=True,
            shuffle_files=False,
            read_config=tfds.ReadConfig(try_autocache=False),
        )
        images, labels = tfds.as_numpy(ds)
        if images.ndim == 3:  # Some datasets store grayscale as (H, W).
            images = images[..., np.newaxis]
        arrays[f"x_{split}"] = np.asarray(images, dtype=np.uint8)
        arrays[f"y_{split}"] = np.asarray(labels, dtype=np.int64)
    return arrays


def arrays(name: str, data_dir: str | None, validation_holdout: int = 0) -> Arrays:
    """A small tfds dataset ('mnist', 'cifar10', ...) as `Arrays` with its validation split.

    With `validation_holdout` > 0 the last that many training examples (in tfds'
    stored order: the same in every run, whatever the data_seed) are held out for
    validation and the rest train, as the 2019 paper holds out 5,000 CIFAR-10
    images for Conv-2/4/6. With 0, the dataset's convention: CIFAR-10 trains on
    all 50,000 images, as the authors' framework does (so '160ep' and the LR drops
    fall on the paper's iterations), and evaluates on the test set, which therefore
    also serves as the 'validation' split; other datasets hold out the last
    training examples for validation (5,000 for MNIST), as the paper does.

    Args:
      name: tfds name (see `load_arrays`).
      data_dir: tfds data directory (see `require_prepared`).
      validation_holdout: training examples held out for validation (0: the
        convention above).

    Raises:
      ValueError: if `validation_holdout` leaves no training example.
    """
    a = load_arrays(name, data_dir)
    num_classes = int(max(a["y_train"].max(), a["y_test"].max())) + 1
    if name == "cifar10" and not validation_holdout:
        return Arrays(
            a["x_train"],
            a["y_train"],
            a["x_test"],
            a["y_test"],
            a["x_test"],
            a["y_test"],
            num_classes,
        )
    return split_validation(
        a["x_train"], a["y_train"], a["x_test"], a["y_test"], num_classes, validation_holdout
    )
