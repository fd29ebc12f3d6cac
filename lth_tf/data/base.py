"""What every dataset provides (the `Dataset` protocol) and the helpers they share.

The contract of `Dataset.train`: the order of training batches is a function of
(data_seed, epoch) alone, and a pipeline started at step k yields exactly the
batches a pipeline started at 0 yields from step k on. Rewinding to step k
therefore replays the dense run's data, and a different data_seed gives different
SGD noise (the stability analyses need both). An epoch is
`steps_per_epoch(batch_size)` full batches; the remainder is dropped (TPUs need
static shapes).
"""

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
    """

    name: str
    input_shape: tuple[int, ...]
    num_classes: int

    def steps_per_epoch(self, batch_size: int) -> int:
        """Full batches of `batch_size` in one epoch of the training split."""
        ...

    def train(self, batch_size: int, data_seed: int, start_step: int = 0) -> tf.data.Dataset:
        """Infinite training batches from global step `start_step` (see the module doc)."""
        ...

    def eval(self, split: str, batch_size: int) -> tf.data.Dataset:
        """One ordered pass over 'train' (no augmentation), 'validation' or 'test'."""
        ...

    def num_examples(self, split: str) -> int:
        """The number of examples `eval(split, ...)` yields."""
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
