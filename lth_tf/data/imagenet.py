"""ImageNet (tfds ``imagenet2012``) as a streaming tf.data pipeline, and its `Dataset`.

Nothing here downloads: the dataset must be prepared (see
`lth_tf.data.tfds.require_prepared`). The training pipeline is reproducible and
resumable:

* the order of epoch ``e`` (which files are read first, and the shuffle buffer) is
  a function of ``(seed, e)`` only, so epoch ``e`` can be rebuilt without reading
  epochs ``0 .. e-1``;
* all augmentation is stateless, seeded by ``(seed, global example index)``;
* ``start_step=k`` jumps to the epoch that holds step ``k`` and skips the records
  before it without decoding them, so a run resumed (or rewound) at step ``k`` sees
  the same batches as an uninterrupted run did from step ``k``.

With ``input_shards=V`` (a run's ``--input_shards``) the training order is
defined over V virtual shards instead, so that each of H hosts reads only its
share of the files (see `virtual_shards` and `imagenet_dataset`).
"""

import os

import tensorflow_datasets as tfds

import lth_tf.data.base as base
from lth_tf.data.tfds import require_prepared, require_split
from lth_tf.keras import tf

IMAGENET_NAME = "imagenet2012"

# Per-channel statistics of the ImageNet training set on the 0-255 scale (RGB).
IMAGENET_MEAN_RGB = (123.675, 116.28, 103.53)
IMAGENET_STDDEV_RGB = (58.395, 57.12, 57.375)

# Standard Inception-style random-resized-crop parameters.
_CROP_AREA_RANGE = (0.08, 1.0)
_CROP_ASPECT_RATIO_RANGE = (3.0 / 4.0, 4.0 / 3.0)
_CROP_MIN_OBJECT_COVERED = 0.1
_CROP_MAX_ATTEMPTS = 10

# Evaluation resizes the shorter side to 256 and center-crops 224 (scaled with
# image_size), so the crop keeps 224/256 = 7/8 of the shorter side.
_EVAL_CROP_NUMERATOR, _EVAL_CROP_DENOMINATOR = 7, 8

# Tags that keep the per-epoch order seeds and the per-example augmentation seeds
# of one user seed on independent random streams.
_ORDER_STREAM = 1
_EXAMPLE_STREAM = 2
_SHARD_ORDER_STREAM = 3

# Sharded training reads the files of one virtual shard this many at a time
# (interleaved record by record) and with this read buffer, so that a shard's
# stream mixes files and reads large blocks from network storage.
_FILES_READ_AT_ONCE = 4
_READ_BUFFER_BYTES = 8 << 20


def imagenet_num_examples(data_dir: str | None, *, name: str = IMAGENET_NAME) -> dict[str, int]:
    """Returns the number of examples per prepared split, from the builder info.

    Args:
      data_dir: tfds data directory (see `require_prepared`).
      name: tfds name, e.g. ``'imagenet2012:5.0.0'`` for an older preparation.

    Returns:
      E.g. ``{'train': 1281167, 'validation': 50000}`` (plus ``'test'`` when that
      split was prepared too).
    """
    builder = require_prepared(name, data_dir)
    return {split: int(info.num_examples) for split, info in builder.info.splits.items()}


def _normalize(image: tf.Tensor, dtype: tf.DType) -> tf.Tensor:
    """Scales an RGB image (0-255) to zero mean, unit variance per channel."""
    image = tf.cast(image, tf.float32)
    image = (image - tf.constant(IMAGENET_MEAN_RGB)) / tf.constant(IMAGENET_STDDEV_RGB)
    return tf.cast(image, dtype)


def decode_and_random_crop(
    image_bytes: tf.Tensor,
    seed: tf.Tensor,
    image_size: int,
    dtype: tf.DType = tf.float32,
) -> tf.Tensor:
    """Training preprocessing of one JPEG: Inception crop, flip, normalize.

    The crop window is sampled before decoding, so only the cropped region of the
    JPEG is decoded. All randomness is stateless: the same ``seed`` always gives
    the same output.

    Args:
      image_bytes: scalar string tensor holding a JPEG.
      seed: int64 tensor of shape [2].
      image_size: side of the square output.
      dtype: output dtype (e.g. tf.bfloat16 on TPU).

    Returns:
      A normalized (image_size, image_size, 3) tensor of ``dtype``.
    """
    crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    shape = tf.io.extract_jpeg_shape(image_bytes)
    whole_image = tf.constant([0.0, 0.0, 1.0, 1.0], dtype=tf.float32, shape=[1, 1, 4])
    # If no window satisfies the constraints in max_attempts, this returns the
    # whole image, as the reference Inception preprocessing does.
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        shape,
        bounding_boxes=whole_image,
        seed=crop_seed,
        min_object_covered=_CROP_MIN_OBJECT_COVERED,
        aspect_ratio_range=_CROP_ASPECT_RATIO_RANGE,
        area_range=_CROP_AREA_RANGE,
        max_attempts=_CROP_MAX_ATTEMPTS,
        use_image_if_no_bounding_boxes=True,
    )
    offset_y, offset_x, _ = tf.unstack(begin)
    height, width, _ = tf.unstack(size)
    window = tf.stack([offset_y, offset_x, height, width])
    image = tf.image.decode_and_crop_jpeg(image_bytes, window, channels=3)
    image = tf.image.resize(image, [image_size, image_size], method="bilinear")
    image = tf.image.stateless_random_flip_left_right(image, seed=flip_seed)
    return _normalize(image, dtype)


def decode_and_center_crop(
    image_bytes: tf.Tensor, image_size: int, dtype: tf.DType = tf.float32
) -> tf.Tensor:
    """Evaluation preprocessing of one JPEG: center crop, resize, normalize.

    Equivalent to resizing the shorter side to ``image_size * 256 / 224`` and
    cropping the central ``image_size`` square, but crops first so that only the
    needed region is decoded and resized.

    Args:
      image_bytes: scalar string tensor holding a JPEG.
      image_size: side of the square output.
      dtype: output dtype.

    Returns:
      A normalized (image_size, image_size, 3) tensor of ``dtype``.
    """
    shape = tf.io.extract_jpeg_shape(image_bytes)
    offset_y, offset_x, crop = _center_crop_window(shape[0], shape[1])
    window = tf.stack([offset_y, offset_x, crop, crop])
    image = tf.image.decode_and_crop_jpeg(image_bytes, window, channels=3)
    image = tf.image.resize(image, [image_size, image_size], method="bilinear")
    return _normalize(image, dtype)


def _center_crop_window(height: tf.Tensor, width: tf.Tensor):
    """(offset_y, offset_x, side) of the central square evaluation crop.

    The side is 7/8 of the shorter side, rounded half to even (as tf.round did on
    the float64 quotient this replaced: equal for every side up to 100,000, tested).
    Integer arithmetic only, so that the exported serving graph converts to TFLite,
    which has no float64 division or rounding.
    """
    height = tf.cast(height, tf.int32)
    width = tf.cast(width, tf.int32)
    scaled = tf.minimum(height, width) * _EVAL_CROP_NUMERATOR
    quotient = scaled // _EVAL_CROP_DENOMINATOR
    twice_remainder = 2 * (scaled % _EVAL_CROP_DENOMINATOR)
    round_up = (twice_remainder > _EVAL_CROP_DENOMINATOR) | (
        (twice_remainder == _EVAL_CROP_DENOMINATOR) & (quotient % 2 == 1)
    )
    crop = tf.maximum(quotient + tf.cast(round_up, tf.int32), 1)
    return (height - crop + 1) // 2, (width - crop + 1) // 2, crop


def center_crop(images: tf.Tensor, image_size: int, dtype: tf.DType = tf.float32) -> tf.Tensor:
    """Evaluation preprocessing of decoded images: `decode_and_center_crop`'s crop, resize, normalize.

    For serving: the same window, resize and normalisation as the evaluation
    pipeline, applied to images that are already decoded.

    Args:
      images: RGB pixels 0-255 (uint8 or float), one image (H, W, 3) or a batch
        of images of one size (B, H, W, 3); any H and W.
      image_size: side of the square output.
      dtype: output dtype.

    Returns:
      Normalized (image_size, image_size, 3) images of ``dtype``, batched as given.
    """
    shape = tf.shape(images)
    offset_y, offset_x, crop = _center_crop_window(shape[-3], shape[-2])
    images = images[..., offset_y : offset_y + crop, offset_x : offset_x + crop, :]
    # Resized as float32: the same values tf.image.resize gives for uint8 input,
    # and TFLite has no uint8 bilinear resize.
    images = tf.image.resize(tf.cast(images, tf.float32), [image_size, image_size], "bilinear")
    return _normalize(images, dtype)


# Only the image (kept as JPEG bytes, decoded by the functions above) and the label
# are parsed. tfds.testing.mock_data honours decoders too: with SkipDecoding it
# serves real JPEG bytes, so mocked and prepared data go through the same code.
def _decoders():
    return tfds.decode.PartialDecoding(
        {"image": True, "label": True}, decoders={"image": tfds.decode.SkipDecoding()}
    )


def imagenet_dataset(
    data_dir: str | None,
    split: str,
    *,
    batch_size: int,
    training: bool,
    seed: int,
    image_size: int = 224,
    start_step: int = 0,
    steps_per_epoch: int | None = None,
    dtype: tf.DType = tf.float32,
    drop_remainder: bool = True,
    shuffle_buffer_size: int = 10_000,
    name: str = IMAGENET_NAME,
    input_context: tf.distribute.InputContext | None = None,
    input_shards: int = 0,
) -> tf.data.Dataset:
    """ImageNet (tfds ``imagenet2012``) batches of normalized images and labels.

    Training (``training=True``): an infinite stream. Epoch ``e`` reads the files
    in an order drawn from ``(seed, e)``, shuffles examples in a buffer seeded from
    ``(seed, e)``, applies an Inception random-resized crop (area 8%-100%, aspect
    ratio 3/4-4/3) and a random horizontal flip seeded by ``(seed, global example
    index)``. Batches may span two epochs. The order does not depend on
    ``tf.random.set_seed``.

    Evaluation (``training=False``): one pass in stored order, resize of the
    shorter side to ``image_size * 256 / 224`` and a central ``image_size`` crop.

    Args:
      data_dir: tfds data directory holding the prepared dataset.
      split: tfds split, e.g. ``'train'``, ``'validation'``, ``'train[:10%]'``.
      batch_size: examples per batch.
      training: training (augmented, shuffled, infinite) or evaluation pipeline.
      seed: data seed (order and augmentation). Ignored when evaluating.
      image_size: side of the square images.
      start_step: training only: the first batch yielded is batch ``start_step`` of
        the run from step 0. Records before it are read but not decoded.
      steps_per_epoch: training only: if set, epoch ``e`` is the first
        ``steps_per_epoch`` batches of its shuffled order (the rest of that pass is
        dropped), so epochs start on batch boundaries; otherwise an epoch is a full
        pass.
      dtype: image dtype (tf.bfloat16 for TPUs).
      drop_remainder: drop the last partial batch (static shapes, needed on TPU).
        For exact evaluation on all examples pass False.
      shuffle_buffer_size: examples (still JPEG-encoded, ~110 kB each) held in the
        shuffle buffer.
      name: tfds name, e.g. ``'imagenet2012:5.0.0'`` for an older preparation.
      input_context: one input pipeline's view under
        ``strategy.distribute_datasets_from_function``; ``batch_size`` stays global.
        Training: the pipeline keeps positions ``[i * B/P, (i+1) * B/P)`` of every
        global batch (by the example's global index, before decoding, so it
        decodes and augments only its share, though it reads every record unless
        ``input_shards`` is set) and yields them as per-replica batches of
        ``B/N``; the union over pipelines at step s is the single-pipeline batch
        of step s (see lth_tf.data.base).
        Evaluation: the pipeline's share of every evaluation step, in per-replica
        batches (`lth_tf.data.base.eval_share`).
      input_shards: training: 0 for the order above; V > 0 defines the order
        over V virtual shards (`virtual_shards`: runs of consecutive files), so
        that each pipeline reads only its files. Shard v's records of epoch e are
        read in a file order and shuffled (a buffer of ``shuffle_buffer_size // V``)
        from ``(seed, e, v)``; epoch e of shard v is the first
        ``steps_per_epoch * B / V`` of them; global batch s holds ``B / V``
        consecutive records of each shard's stream, shard 0 first. Pipeline i of P
        reads shards ``[i * V/P, (i+1) * V/P)`` only: exactly the positions of the
        global batches its replicas train on, so the union over pipelines at
        step s is the one-pipeline batch of step s for every P that divides V.
        Needs V to divide B and P to divide V, a whole split (no slicing) and at
        least one file per shard. Resuming at step k skips each shard's first
        records of its epoch by count, without decoding them. Evaluation with
        ``input_context`` (any V > 0): pipeline i of P reads only files
        ``[i * F/P, (i+1) * F/P)`` of the split, in as many per-replica batches
        as ``eval_share`` gives (see `_eval_by_files`).

    Returns:
      A `tf.data.Dataset` of ``(images, labels)``: images ``(B, S, S, 3)`` of
      ``dtype``, labels ``(B,)`` int32.

    Raises:
      FileNotFoundError: if the dataset is not prepared (see `require_prepared`).
      ValueError: on invalid arguments or an unknown split.
    """
    _check_args(batch_size, image_size, start_step, steps_per_epoch, seed, shuffle_buffer_size)
    if input_shards < 0:
        raise ValueError(f"imagenet_dataset: input_shards must be >= 0, got {input_shards}.")
    builder = require_prepared(name, data_dir)
    require_split(builder, split)
    dtype = tf.as_dtype(dtype)
    if training and input_shards:
        ds = _sharded_training_batches(
            builder,
            virtual_shards(builder, split, input_shards),
            batch_size=batch_size,
            seed=seed,
            image_size=image_size,
            dtype=dtype,
            start_step=start_step,
            steps_per_epoch=steps_per_epoch,
            shuffle_buffer_size=shuffle_buffer_size,
            drop_remainder=drop_remainder,
            input_context=input_context,
        )
    elif training:
        ds = _training_batches(
            builder,
            split,
            batch_size=batch_size,
            seed=seed,
            image_size=image_size,
            dtype=dtype,
            start_step=start_step,
            steps_per_epoch=steps_per_epoch,
            shuffle_buffer_size=shuffle_buffer_size,
            drop_remainder=drop_remainder,
            input_context=input_context,
        )
    else:
        if start_step or steps_per_epoch is not None:
            raise ValueError(
                f"start_step={start_step} and steps_per_epoch={steps_per_epoch} only apply "
                "to training pipelines; evaluation always reads the whole split once. "
                "Leave them at 0 and None."
            )
        ds = None
        if input_shards and input_context is not None:
            ds = _eval_by_files(
                builder,
                split,
                batch_size=batch_size,
                image_size=image_size,
                dtype=dtype,
                input_context=input_context,
            )
        if ds is None:
            ds = _eval_batches(
                builder,
                split,
                batch_size=batch_size,
                image_size=image_size,
                dtype=dtype,
                drop_remainder=drop_remainder,
                input_context=input_context,
            )
    # Unlike the in-memory pipelines, autotune stays on: decoding JPEGs needs all the
    # host's cores. Parallel map and interleave keep their input order, so the
    # batches of a given step are the same in every run.
    options = tf.data.Options()
    options.deterministic = True
    if input_context is not None:
        options = base.per_pipeline_options(options)
    return ds.with_options(options)


def _training_batches(
    builder,
    split,
    *,
    batch_size,
    seed,
    image_size,
    dtype,
    start_step,
    steps_per_epoch,
    shuffle_buffer_size,
    drop_remainder,
    input_context,
):
    """The augmented training stream of `imagenet_dataset`, batched (this pipeline's share)."""
    ds = _training_records(
        builder,
        split,
        batch_size=batch_size,
        seed=seed,
        start_step=start_step,
        steps_per_epoch=steps_per_epoch,
        shuffle_buffer_size=shuffle_buffer_size,
    )
    example_key = tf.constant([seed, _EXAMPLE_STREAM], dtype=tf.int64)

    def preprocess(index, image_bytes, label):
        example_seed = tf.random.experimental.stateless_fold_in(example_key, index)
        image = decode_and_random_crop(image_bytes, example_seed, image_size, dtype)
        return image, tf.cast(label, tf.int32)

    if input_context is not None:
        part = base.share(batch_size, input_context)
        # The global index numbers the run's examples in order, and epochs hold
        # whole batches, so index % B is the position in its global batch.
        ds = ds.filter(
            lambda index, image_bytes, label: (
                (index % batch_size >= part.first) & (index % batch_size < part.first + part.size)
            )
        )
        batch_size = part.per_replica
    return _decoded_batches(ds, preprocess, batch_size, drop_remainder)


def _eval_batches(builder, split, *, batch_size, image_size, dtype, drop_remainder, input_context):
    """One pass over `split` in stored order, centre-cropped, batched (this pipeline's share)."""
    ds = builder.as_dataset(
        split=split,
        shuffle_files=False,
        decoders=_decoders(),
        read_config=tfds.ReadConfig(try_autocache=False),
    )
    num_examples = int(ds.cardinality())
    if num_examples < 0:
        num_examples = int(builder.info.splits[split].num_examples)
    ds = ds.map(lambda ex: (ex["image"], ex["label"]))

    def preprocess(image_bytes, label):
        image = decode_and_center_crop(image_bytes, image_size, dtype)
        return image, tf.cast(label, tf.int32)

    if input_context is not None:
        # Every example once, in per-replica batches; only this pipeline's share
        # is decoded (drop_remainder does not apply: the last step is partial).
        return base.eval_share(ds, num_examples, batch_size, input_context, preprocess)
    return _decoded_batches(ds, preprocess, batch_size, drop_remainder)


def _eval_by_files(builder, split, *, batch_size, image_size, dtype, input_context):
    """One pipeline's share of an evaluation pass, read from its own files only.

    Pipeline i of P reads files ``[i * F // P, (i + 1) * F // P)`` of the split
    (in stored order) and cuts its n_i examples into the same number of
    per-replica batches as `lth_tf.data.base.eval_share` gives every pipeline
    (`eval_steps` steps of N / P replicas), as even as can be: the shares are
    disjoint and together are the split, once. None when the split is sliced, has
    fewer files than pipelines, or a pipeline would have fewer examples than
    batches: `eval_share` (every record read by every pipeline) then does it.
    """
    n, p = input_context.num_replicas_in_sync, input_context.num_input_pipelines
    i = input_context.input_pipeline_id
    if split not in list(builder.info.splits.keys()):
        return None
    info = builder.info.splits[split]
    paths = [os.fspath(path) for path in info.filepaths]
    lengths = [int(length) for length in info.shard_lengths]
    num_files = len(paths)
    if num_files < p or len(lengths) != num_files:
        return None
    slots = base.eval_steps(sum(lengths), batch_size, n) * (n // p)
    counts = [sum(lengths[j * num_files // p : (j + 1) * num_files // p]) for j in range(p)]
    if min(counts) < slots:
        return None
    mine, count = paths[i * num_files // p : (i + 1) * num_files // p], counts[i]
    decoders = _decoders()
    features = decoders.extract_features(builder.info.features)

    def preprocess(index, serialized):
        example = features.deserialize_example(serialized, decoders=decoders.decoders)
        image = decode_and_center_crop(example["image"], image_size, dtype)
        # Example j goes to batch k: [k * count // slots, (k + 1) * count // slots).
        batch = ((index + 1) * slots - 1) // count
        return batch, image, tf.cast(example["label"], tf.int32)

    ds = tf.data.Dataset.from_tensor_slices(mine).interleave(
        record_file_dataset,
        cycle_length=min(len(mine), _FILES_READ_AT_ONCE),
        num_parallel_calls=min(len(mine), _FILES_READ_AT_ONCE),
        deterministic=True,
    )
    ds = ds.enumerate().map(preprocess, num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.group_by_window(
        key_func=lambda k, image, label: k,
        reduce_func=lambda k, window: window.batch(count),
        window_size_func=lambda k: (k + 1) * count // slots - k * count // slots,
    )
    return ds.map(lambda k, images, labels: (images, labels)).prefetch(tf.data.AUTOTUNE)


def _decoded_batches(ds, preprocess, batch_size, drop_remainder):
    ds = ds.map(preprocess, num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.batch(batch_size, drop_remainder=drop_remainder)
    return ds.prefetch(tf.data.AUTOTUNE)


def _check_args(batch_size, image_size, start_step, steps_per_epoch, seed, buffer_size):
    problems = []
    if batch_size < 1:
        problems.append(f"batch_size must be >= 1, got {batch_size}")
    if image_size < 1:
        problems.append(f"image_size must be >= 1, got {image_size}")
    if start_step < 0:
        problems.append(f"start_step must be >= 0, got {start_step}")
    if steps_per_epoch is not None and steps_per_epoch < 1:
        problems.append(f"steps_per_epoch must be None or >= 1, got {steps_per_epoch}")
    if not 0 <= seed < 2**63:
        problems.append(f"seed must be in [0, 2**63), got {seed}")
    if buffer_size < 1:
        problems.append(f"shuffle_buffer_size must be >= 1, got {buffer_size}")
    if problems:
        raise ValueError("imagenet_dataset: " + "; ".join(problems) + ".")


def _training_records(
    builder,
    split: str,
    *,
    batch_size: int,
    seed: int,
    start_step: int,
    steps_per_epoch: int | None,
    shuffle_buffer_size: int,
) -> tf.data.Dataset:
    """Infinite ``(global_index, jpeg_bytes, label)`` stream from batch ``start_step``.

    The global index numbers the examples of the whole run (its position in the
    stream), so each example of each epoch gets its own augmentation seed.
    """
    decoders = _decoders()
    # The real count of the split. It comes from the dataset rather than
    # the builder info because tfds.testing.mock_data serves its own number of
    # examples whatever the metadata says.
    num_examples = int(
        builder.as_dataset(split=split, decoders=decoders, shuffle_files=False).cardinality()
    )
    if num_examples <= 0:
        num_examples = int(builder.info.splits[split].num_examples)
    if num_examples <= 0:
        raise ValueError(f"Split {split!r} of {builder.name} at {builder.data_dir} is empty.")
    if steps_per_epoch is None:
        epoch_length = num_examples
    else:
        epoch_length = steps_per_epoch * batch_size
        if epoch_length > num_examples:
            raise ValueError(
                f"steps_per_epoch={steps_per_epoch} batches of {batch_size} need "
                f"{epoch_length} examples per epoch, but split {split!r} has only "
                f"{num_examples}. Use at most "
                f"{num_examples // batch_size} steps per epoch, or leave "
                "steps_per_epoch=None to let batches span epochs."
            )
    first_epoch, skip_in_epoch = divmod(start_step * batch_size, epoch_length)
    order_key = tf.constant([seed, _ORDER_STREAM], dtype=tf.int64)
    buffer_size = min(shuffle_buffer_size, num_examples)

    def epoch_records(epoch):
        # Dataset.shuffle (here and inside tfds' file shuffling) mixes the global TF
        # seed into the seeds it is given. Clearing it in this function's graph makes
        # the order a function of (seed, epoch) only, whatever seed the program set
        # with tf.random.set_seed, and leaves the caller's graph untouched.
        tf.compat.v1.get_default_graph().seed = None
        epoch_seeds = tf.random.experimental.stateless_fold_in(order_key, epoch)
        ds = builder.as_dataset(
            split=split,
            shuffle_files=True,
            decoders=decoders,
            read_config=tfds.ReadConfig(
                shuffle_seed=epoch_seeds[0],
                shuffle_reshuffle_each_iteration=False,
                try_autocache=False,
            ),
        )
        ds = ds.shuffle(buffer_size, seed=epoch_seeds[1], reshuffle_each_iteration=False)
        ds = ds.take(epoch_length)
        start = epoch * epoch_length
        return ds.enumerate().map(lambda i, ex: (start + i, ex["image"], ex["label"]))

    ds = tf.data.Dataset.counter(start=first_epoch).flat_map(epoch_records)
    # Records are skipped before the map that decodes them, so resuming deep into
    # an epoch costs reading, not decoding.
    return ds.skip(skip_in_epoch)


def record_file_dataset(path: tf.Tensor) -> tf.data.Dataset:
    """The serialized records of one tfrecord file: where sharded training opens files.

    The one place the sharded pipeline reads a file; tests and
    benchmarks/input_sharding.py wrap it to count the records each host reads.
    """
    return tf.data.TFRecordDataset(path, buffer_size=_READ_BUFFER_BYTES)


def virtual_shards(builder, split: str, num_shards: int) -> list[list[tuple[str, int]]]:
    """The files of each of `num_shards` virtual shards of a prepared split.

    Shard v holds files ``[v * F // V, (v + 1) * F // V)`` of the split's F files in
    their stored order, so shards differ by at most one file, and the V/H
    consecutive shards of one of H hosts are ``F / H`` files, rounded up or down:
    a host reads at most 1/H of the records plus one file (files of equal size).

    Args:
      builder: the prepared tfds builder.
      split: a whole split, e.g. ``'train'`` (slices select records inside files).
      num_shards: V >= 1, at most the split's number of files.

    Returns:
      ``[[(path, records), ...] for each shard]``.

    Raises:
      ValueError: for a sliced split, files that are not tfrecords, or more shards
        than files.
    """
    whole_splits = sorted(builder.info.splits.keys())
    if split not in whole_splits:
        raise ValueError(
            f"input_shards={num_shards} reads whole files, so it needs a whole split "
            f"({whole_splits}); got {split!r}."
        )
    file_format = builder.info.file_format
    if file_format is not None and getattr(file_format, "value", file_format) != "tfrecord":
        raise ValueError(
            f"input_shards={num_shards} reads tfrecord files, but {builder.name} at "
            f"{builder.data_dir} is stored as {file_format}. Prepare it as tfrecord, or "
            "use input_shards=0."
        )
    info = builder.info.splits[split]
    paths = [os.fspath(p) for p in info.filepaths]
    lengths = [int(n) for n in info.shard_lengths]
    num_files = len(paths)
    if not 1 <= num_shards <= num_files or len(lengths) != num_files:
        raise ValueError(
            f"input_shards={num_shards}: split {split!r} of {builder.name} at "
            f"{builder.data_dir} has {num_files} files and every virtual shard needs at "
            f"least one; use 1 to {num_files} (a divisor of the batch size and a "
            "multiple of the number of hosts)."
        )
    return [
        [
            (paths[f], lengths[f])
            for f in range(v * num_files // num_shards, (v + 1) * num_files // num_shards)
        ]
        for v in range(num_shards)
    ]


def sharded_steps_per_epoch(shards: list[list[tuple[str, int]]], batch_size: int) -> int:
    """Full global batches per epoch over virtual shards: the smallest shard sets it.

    Every step takes ``batch_size / V`` records of each shard, so an epoch is as
    many steps as the smallest shard fills; each shard drops its remainder (other
    records every epoch, as each epoch reshuffles the shard).

    Raises:
      ValueError: if V does not divide the batch size or no step fits.
    """
    num_shards = len(shards)
    if batch_size % num_shards:
        raise ValueError(
            f"--batch_size={batch_size} is not divisible by --input_shards={num_shards}: "
            "every global batch takes an equal number of records from each virtual shard. "
            f"Use a divisor of the batch size, e.g. --input_shards="
            f"{max(d for d in range(1, num_shards + 1) if batch_size % d == 0)}."
        )
    smallest = min(sum(n for _, n in files) for files in shards)
    steps = smallest // (batch_size // num_shards)
    if steps == 0:
        raise ValueError(
            f"Batch size {batch_size} needs {batch_size // num_shards} records of each of "
            f"the {num_shards} virtual shards per step, but the smallest has {smallest}; "
            "use a smaller --batch_size or fewer --input_shards."
        )
    return steps


def _sharded_training_batches(
    builder,
    shards,
    *,
    batch_size,
    seed,
    image_size,
    dtype,
    start_step,
    steps_per_epoch,
    shuffle_buffer_size,
    drop_remainder,
    input_context,
):
    """The training stream of `imagenet_dataset` over virtual shards (this pipeline's files)."""
    num_shards = len(shards)
    most = sharded_steps_per_epoch(shards, batch_size)
    if steps_per_epoch is None:
        steps_per_epoch = most
    elif steps_per_epoch > most:
        raise ValueError(
            f"steps_per_epoch={steps_per_epoch}: the smallest of the {num_shards} virtual "
            f"shards fills only {most} steps of {batch_size // num_shards} records; use at "
            f"most {most}."
        )
    if input_context is None:
        pipelines, pipeline, per_replica = 1, 0, batch_size
    else:
        pipelines, pipeline = input_context.num_input_pipelines, input_context.input_pipeline_id
        per_replica = base.share(batch_size, input_context).per_replica
        if num_shards % pipelines:
            raise ValueError(
                f"--input_shards={num_shards} virtual shards cannot be split evenly over "
                f"{pipelines} hosts (input pipelines); use a multiple of {pipelines} that "
                "divides the batch size. The number of shards is part of the run: the same "
                "value gives the same batches for every number of hosts that divides it."
            )
    local = num_shards // pipelines
    records = _sharded_training_records(
        shards[pipeline * local : (pipeline + 1) * local],
        first_shard=pipeline * local,
        num_shards=num_shards,
        batch_size=batch_size,
        seed=seed,
        start_step=start_step,
        steps_per_epoch=steps_per_epoch,
        buffer_size=max(1, shuffle_buffer_size // num_shards),
    )
    decoders = _decoders()
    features = decoders.extract_features(builder.info.features)
    example_key = tf.constant([seed, _EXAMPLE_STREAM], dtype=tf.int64)

    def preprocess(index, serialized):
        example = features.deserialize_example(serialized, decoders=decoders.decoders)
        example_seed = tf.random.experimental.stateless_fold_in(example_key, index)
        image = decode_and_random_crop(example["image"], example_seed, image_size, dtype)
        return image, tf.cast(example["label"], tf.int32)

    return _decoded_batches(records, preprocess, per_replica, drop_remainder)


def _sharded_training_records(
    shards, *, first_shard, num_shards, batch_size, seed, start_step, steps_per_epoch, buffer_size
) -> tf.data.Dataset:
    """Infinite ``(global_index, serialized_record)`` stream of consecutive shards.

    ``shards`` are shards ``first_shard ..`` of ``num_shards``; the stream holds,
    for every step, ``batch_size / num_shards`` records of each in turn: the
    positions ``[first_shard * B/V, (first_shard + len(shards)) * B/V)`` of the
    global batch. Only these shards' files are opened.
    """
    rows = batch_size // num_shards
    epoch_length = steps_per_epoch * batch_size
    first_epoch, skip_steps = divmod(start_step, steps_per_epoch)
    order_key = tf.constant([seed, _SHARD_ORDER_STREAM], dtype=tf.int64)

    def shard_stream(shard, files):
        paths = tf.constant([path for path, _ in files])
        cycle = min(len(files), _FILES_READ_AT_ONCE)

        def epoch_records(epoch):
            # As in _training_records: the order is a function of (seed, epoch, shard)
            # only, whatever seed the program set with tf.random.set_seed.
            tf.compat.v1.get_default_graph().seed = None
            fold_in = tf.random.experimental.stateless_fold_in
            key = fold_in(fold_in(order_key, epoch), tf.constant(shard, tf.int64))
            file_key = fold_in(key, tf.constant(0, tf.int64))
            shuffle_key = tf.cast(fold_in(key, tf.constant(1, tf.int64)), tf.int64)
            order = tf.argsort(tf.random.stateless_uniform([len(files)], seed=file_key))
            ds = tf.data.Dataset.from_tensor_slices(tf.gather(paths, order)).interleave(
                record_file_dataset,
                cycle_length=cycle,
                block_length=1,
                num_parallel_calls=cycle,
                deterministic=True,
            )
            ds = ds.shuffle(buffer_size, seed=shuffle_key[0], reshuffle_each_iteration=False)
            ds = ds.take(steps_per_epoch * rows)
            start = epoch * epoch_length + shard * rows
            # Record j of the shard's epoch is at position shard * rows + j % rows of
            # step j // rows: its global index numbers it as in the one-host stream.
            return ds.enumerate().map(
                lambda j, record: (start + j // rows * batch_size + j % rows, record)
            )

        ds = tf.data.Dataset.counter(start=first_epoch).flat_map(epoch_records)
        # Resuming: the records of the earlier steps of the epoch are read, not decoded.
        return ds.skip(skip_steps * rows)

    streams = [shard_stream(first_shard + k, files) for k, files in enumerate(shards)]
    if len(streams) == 1:
        return streams[0]
    # Step by step: `rows` records of each shard in turn.
    choice = tf.data.Dataset.range(len(streams) * rows).map(lambda k: k // rows).repeat()
    return tf.data.Dataset.choose_from_datasets(streams, choice)


class ImageNetData:
    """ImageNet as a `Dataset`: `imagenet_dataset` pipelines with fixed-length epochs.

    An epoch is `steps_per_epoch(batch_size)` full batches, so epochs start on batch
    boundaries as with the in-memory datasets. The validation split of ImageNet
    serves as both 'validation' and 'test', as in the papers (the test labels are
    not public).
    """

    name = IMAGENET_NAME
    num_classes = 1000

    def __init__(
        self,
        data_dir: str | None,
        augment: bool = True,
        image_size: int = 224,
        input_shards: int = 0,
    ):
        """Checks that ImageNet is prepared in `data_dir` and reads its split sizes.

        Args:
          data_dir: tfds data directory (see `lth_tf.data.tfds.require_prepared`).
          augment: unused: ImageNet training batches are always augmented (the
            random-resized crop is part of the recipe); kept so that `load` treats
            every dataset alike.
          image_size: side of the square images.
          input_shards: 0, or the number V of virtual shards that define the
            training order, so that each of H hosts (H dividing V) reads only
            V/H of them (see `imagenet_dataset`).
        """
        self.data_dir = data_dir
        self.augment = augment
        self.image_size = image_size
        self.input_shape = (image_size, image_size, 3)
        # What serving takes: RGB images of any size (cropped and resized in the graph).
        self.serving_shape = (None, None, 3)
        counts = imagenet_num_examples(data_dir)
        self.num_train = counts["train"]
        self._num_eval = counts["validation"]
        self.input_shards = input_shards
        self._shards = None
        if input_shards:
            self._shards = virtual_shards(
                require_prepared(IMAGENET_NAME, data_dir), "train", input_shards
            )

    def steps_per_epoch(self, batch_size: int) -> int:
        """Full batches per epoch; raises a ValueError when not even one fits.

        With virtual shards, the smallest shard sets it (`sharded_steps_per_epoch`).
        """
        if self._shards is not None:
            return sharded_steps_per_epoch(self._shards, batch_size)
        return base.steps_per_epoch(self.name, self.num_train, batch_size)

    def train(
        self,
        batch_size: int,
        data_seed: int,
        start_step: int = 0,
        input_context: tf.distribute.InputContext | None = None,
    ) -> tf.data.Dataset:
        """Infinite augmented training batches from global step `start_step`.

        `batch_size` is global; with `input_context`, this pipeline's share of each
        global batch as per-replica batches (see `imagenet_dataset`); with
        `input_shards`, read from this pipeline's virtual shards only.
        """
        return imagenet_dataset(
            self.data_dir,
            "train",
            batch_size=batch_size,
            training=True,
            seed=data_seed,
            image_size=self.image_size,
            start_step=start_step,
            steps_per_epoch=self.steps_per_epoch(batch_size),
            input_context=input_context,
            input_shards=self.input_shards,
        )

    def eval(
        self,
        split: str,
        batch_size: int,
        input_context: tf.distribute.InputContext | None = None,
    ) -> tf.data.Dataset:
        """One ordered pass, center-cropped; 'test' reads the validation split.

        With `input_context`, this pipeline's share of the examples (see
        `imagenet_dataset`); with `input_shards`, read from its own files.
        """
        base.check_split(split)
        return imagenet_dataset(
            self.data_dir,
            "train" if split == "train" else "validation",
            batch_size=batch_size,
            training=False,
            seed=0,
            image_size=self.image_size,
            drop_remainder=False,
            input_context=input_context,
            input_shards=self.input_shards,
        )

    def num_examples(self, split: str) -> int:
        """Examples of the split `eval(split, ...)` reads."""
        base.check_split(split)
        return self.num_train if split == "train" else self._num_eval

    def serving_preprocess(self, images: tf.Tensor) -> tf.Tensor:
        """Model inputs from a batch of decoded RGB images of one size (any size).

        The evaluation pipeline's crop, resize and normalisation (`center_crop`).
        """
        return center_crop(images, self.image_size)

    def serving_preprocess_encoded(self, image_bytes: tf.Tensor) -> tf.Tensor:
        """The model input of one encoded image (JPEG, PNG, GIF or BMP; scalar string).

        A JPEG goes through the evaluation pipeline's own `decode_and_center_crop`;
        other formats are decoded whole and take the same crop.
        """
        return tf.cond(
            tf.io.is_jpeg(image_bytes),
            lambda: decode_and_center_crop(image_bytes, self.image_size),
            lambda: center_crop(
                tf.io.decode_image(image_bytes, channels=3, expand_animations=False),
                self.image_size,
            ),
        )

    def raw_eval(self, split: str) -> tf.data.Dataset:
        """The examples of `eval(split, ...)`, in its order, as decoded (uint8 image, label).

        Images keep their own size; unbatched.
        """
        base.check_split(split)
        builder = require_prepared(IMAGENET_NAME, self.data_dir)
        ds = builder.as_dataset(
            split="train" if split == "train" else "validation",
            shuffle_files=False,
            decoders=_decoders(),
            read_config=tfds.ReadConfig(try_autocache=False),
        )
        return ds.map(
            lambda ex: (
                tf.io.decode_jpeg(ex["image"], channels=3),
                tf.cast(ex["label"], tf.int32),
            )
        )
