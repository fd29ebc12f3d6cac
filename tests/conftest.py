"""Shared fixtures: a tiny LeNet config on random 8x8 images, fast enough for CPU tests."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # noqa: E402

TINY = dict(
    dataset="synthetic:8x8x1:4",
    batch_size=32,
    training_steps="40it",
    eval_every="20it",
    rewind_step="20it",
    rounds=3,
    verbose=0,
)


@pytest.fixture(scope="session")
def tiny_config():
    """A factory: tiny_config(**overrides) -> RunConfig of LeNet-300-100 on 8x8x1 inputs.

    LeNet's recipe leaves the output layer dense (output_rate=0); pass
    output_rate=1.0 to prune it with the others.
    """
    from lth_tf.config import make_config

    def make(**overrides):
        return make_config("lenet_300_100", **{**TINY, **overrides})

    return make
