"""What every dataset provides (the `Dataset` protocol) and the helpers they share.

The contract of `Dataset.train`: the order of training batches is a function of
(data_seed, epoch) alone, and a pipeline started at step k yields exactly the
batches a pipeline started at 0 yields from step k on. Rewinding to step k
therefore replays the dense run's data, and a different data_seed gives different
SGD noise (the stability analyses need both). An epoch is
`steps_per_epoch(batch_size)` full batches; the remainder is dropped (TPUs need
static shapes).

Per input pipeline (`train(..., input_context=ctx)`, one pipeline per worker under
`strategy.distribute_datasets_from_function`): the *global* batch of step s is
the same set of examples, with the same augmentation, as the single-device
batch of step s. Pipeline i of P takes positions [i * B/P, (i+1) * B/P) of
each global batch of B examples and yields them as N/P consecutive per-replica
batches of B/N (N replicas in sync), so the union over all replicas at step s
is exactly the one-device batch of step s, whatever P and N are. Training
results then differ from a one-device run only by the order of the float
reductions (the gradient all-reduce, the per-replica batch statistics of
BatchNorm). `eval(..., input_context=ctx)` gives each pipeline a disjoint
share of the split's examples; together they are the split, once.
"""

import dataclasses
import hashlib
from typing import Protocol, runtime_checkable

from lth_tf.keras import tf

SPLITS = ("train", "validation", "test")


@runtime_checkable
class Dataset(Protocol):
    """A classification dataset as tf.data pipelines of (images, labels) batches.

    Attributes:
      name: the --dataset value it was loaded from.
      input_shape: (H, W, C) of one image as the model sees it.
      num_classes: labels are 0 .. num_classes - 1.
      serving_shape: the shape of one raw image that the exported SavedModel's
        serving signatures take (None for a free dimension).

    `lth_tf.data.ArrayData` implements all of it for any in-memory arrays; a
    user's dataset (--dataset=package.module:function) is most simply one of those.
    """

    name: str
    input_shape: tuple[int, ...]
    num_classes: int
    serving_shape: tuple[int | None, ...]

    def steps_per_epoch(self, batch_size: int) -> int:
        """Full batches of `batch_size` in one epoch of the training split."""
        ...

    def train(
        self,
        batch_size: int,
        data_seed: int,
        start_step: int = 0,
        input_context: tf.distribute.InputContext | None = None,
    ) -> tf.data.Dataset:
        """Infinite training batches from global step `start_step` (see the module doc).

        `batch_size` is global. With `input_context`, the pipeline's share of each
        global batch, as per-replica batches (see the module doc).
        """
        ...

    def eval(
        self,
        split: str,
        batch_size: int,
        input_context: tf.distribute.InputContext | None = None,
    ) -> tf.data.Dataset:
        """One ordered pass over 'train' (no augmentation), 'validation' or 'test'.

        With `input_context`, the pipeline's disjoint share of the split.
        """
        ...

    def num_examples(self, split: str) -> int:
        """The number of examples `eval(split, ...)` yields."""
        ...

    # What export (lth_tf.sparse_export) builds into the SavedModel and measures.

    def serving_preprocess(self, images: tf.Tensor) -> tf.Tensor:
        """Model inputs from a batch of raw images (`serving_shape`, pixels 0-255)."""
        ...

    def serving_preprocess_encoded(self, image_bytes: tf.Tensor) -> tf.Tensor:
        """The model input of one encoded image (a scalar string: PNG, JPEG...)."""
        ...

    def raw_eval(self, split: str) -> tf.data.Dataset:
        """The examples of `eval(split, ...)`, in its order, as raw (image, label); unbatched.

        `serving_preprocess` of a batch of these images gives what `eval` yields.
        """
        ...


def steps_per_epoch(name: str, num_train: int, batch_size: int) -> int:
    """Full batches of `batch_size` in `num_train` examples; refuses zero.

    Args:
      name: the dataset's name, for the error message.
      num_train: examples in the training split.
      batch_size: global batch size.

    Raises:
      ValueError: if not even one batch fits.
    """
    steps = num_train // batch_size
    if steps == 0:
        raise ValueError(
            f"Batch size {batch_size} is larger than the {num_train} training examples "
            f"of {name}; use a smaller --batch_size."
        )
    return steps


@dataclasses.dataclass(frozen=True)
class Share:
    """What one input pipeline reads of each global training batch.

    Attributes:
      global_batch: B, examples per step over all replicas.
      per_replica: B / N, the batch each replica trains on.
      replicas: N / P, the replicas this pipeline feeds (consecutive batches).
      first: the position in the global batch where this pipeline's share starts.
      size: per_replica * replicas, the examples this pipeline reads per step.
    """

    global_batch: int
    per_replica: int
    replicas: int
    first: int

    @property
    def size(self) -> int:
        return self.per_replica * self.replicas


def share(batch_size: int, input_context: tf.distribute.InputContext) -> Share:
    """The positions of each global batch that the pipeline of `input_context` reads.

    Raises:
      ValueError: if the global batch does not split evenly over the replicas.
    """
    n = input_context.num_replicas_in_sync
    p = input_context.num_input_pipelines
    if batch_size % n:
        raise ValueError(
            f"--batch_size={batch_size} is not divisible by the {n} replicas: the batch size "
            f"is global and every replica trains on an equal share. Use a multiple of {n}, "
            f"e.g. --batch_size={max(n, batch_size // n * n)}."
        )
    if n % p:
        raise ValueError(
            f"{n} replicas cannot be fed evenly by {p} input pipelines; every worker needs "
            "the same number of replicas."
        )
    per_replica = batch_size // n
    replicas = n // p
    return Share(
        batch_size, per_replica, replicas, input_context.input_pipeline_id * per_replica * replicas
    )


def eval_steps(num_examples: int, batch_size: int, num_replicas: int) -> int:
    """Steps of a per-pipeline evaluation pass (`eval_share`); the same on every worker.

    The global evaluation batch is `batch_size` rounded up to a multiple of the
    replicas; the last step holds the remainder.
    """
    global_batch = -(-batch_size // num_replicas) * num_replicas
    return max(1, -(-num_examples // global_batch))


def eval_share(
    examples: tf.data.Dataset,
    num_examples: int,
    batch_size: int,
    input_context: tf.distribute.InputContext,
    preprocess,
) -> tf.data.Dataset:
    """One input pipeline's per-replica batches of an evaluation pass.

    The pass is cut into global batches of G = ceil(batch_size / N) * N examples
    (N replicas in sync); the last one holds the remainder m. Pipeline i of P
    keeps positions [i * m // P, (i + 1) * m // P) of each (m = G but for the
    last), so every pipeline runs `eval_steps` steps and the remainder is spread
    evenly: a replica gets an empty batch only when the last global batch has
    fewer than N examples. The pipelines' shares are disjoint and together are
    the split, once. Each pipeline's share of a step is split evenly among its
    N / P replicas.

    Args:
      examples: the split's examples, unbatched, in order (e.g. encoded images
        and labels: they are filtered before `preprocess`).
      num_examples: how many `examples` holds.
      batch_size: the global evaluation batch.
      input_context: the pipeline's context.
      preprocess: maps one kept example to (image, label).
    """
    n, p = input_context.num_replicas_in_sync, input_context.num_input_pipelines
    i, replicas = input_context.input_pipeline_id, n // p
    global_batch = -(-batch_size // n) * n
    last = num_examples - (eval_steps(num_examples, batch_size, n) - 1) * global_batch

    def keep(index, _):
        # The examples of the last step: `last` (fewer when the split does not fill it).
        is_last = index // global_batch == num_examples // global_batch
        step_size = tf.where(is_last, tf.constant(last, tf.int64), global_batch)
        position = index % global_batch
        return (position >= i * step_size // p) & (position < (i + 1) * step_size // p)

    ds = examples.enumerate().filter(keep)
    ds = ds.map(lambda index, example: preprocess(*example), num_parallel_calls=tf.data.AUTOTUNE)
    # Full steps give exactly G / P examples; the last share is the remainder.
    ds = ds.batch(global_batch // p)
    if replicas > 1:

        def split(images, labels):
            bounds = tf.range(replicas + 1, dtype=tf.int64) * tf.shape(labels, tf.int64)[0]
            bounds = bounds // replicas
            return tf.data.Dataset.range(replicas).map(
                lambda j: (images[bounds[j] : bounds[j + 1]], labels[bounds[j] : bounds[j + 1]])
            )

        ds = ds.flat_map(split)
    return ds.prefetch(tf.data.AUTOTUNE)


def per_pipeline_options(options: tf.data.Options) -> tf.data.Options:
    """`options` with auto-sharding off: a per-pipeline dataset is already its shard."""
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    return options


def check_split(split: str) -> None:
    """Raises a ValueError naming the known splits when `split` is not one of them."""
    if split not in SPLITS:
        raise ValueError(f"Unknown split {split!r}; expected train, validation or test.")


def no_autotune() -> tf.data.Options:
    """Options that turn tf.data autotuning off.

    With it on, many short fit() calls on small CPUs sometimes stalled 5-40 s after
    training ended (autotune's background thread); fixed parallelism avoids it.
    """
    options = tf.data.Options()
    options.autotune.enabled = False
    return options


def in_memory_options() -> tf.data.Options:
    """Options of the in-memory pipelines: no autotune, deterministic, shard by data."""
    options = no_autotune()
    options.deterministic = True
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return options


def seed_word(data_seed: int) -> int:
    """A 56-bit word derived from a user's data seed.

    Spreads small user seeds over int64 so that (seed, epoch) pairs of different
    runs never coincide.
    """
    digest = hashlib.sha256(f"lth_tf data order {data_seed}".encode()).digest()
    return int.from_bytes(digest[:7], "little")
