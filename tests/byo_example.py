"""A user's own model and dataset, as `--arch=byo_example:build --dataset=byo_example:data`.

Used by tests/test_byo.py (in-process and through the command line, with tests/ on
PYTHONPATH). The model mixes layers lth_tf masks (Conv2D, SeparableConv2D's
pointwise kernel, Conv1D, Dense) with one it leaves dense (DepthwiseConv2D: tfmot's
PruneRegistry gives it no prunable weight).
"""

from lth_tf import data as data_lib
from lth_tf.keras import keras

SHAPE = (8, 8, 1)
NUM_CLASSES = 4


def build(input_shape, num_classes, seed):
    """A functional model of the given input shape and classes, seeded by `seed`."""

    def init(i):
        return keras.initializers.GlorotNormal(seed=seed * 100 + i)

    inputs = keras.Input(input_shape)
    x = keras.layers.Conv2D(4, 3, activation="relu", kernel_initializer=init(0), name="conv")(
        inputs
    )  # 6x6x4
    x = keras.layers.SeparableConv2D(
        4,
        3,
        activation="relu",
        depthwise_initializer=init(1),
        pointwise_initializer=init(2),
        name="sep",
    )(x)  # 4x4x4
    x = keras.layers.DepthwiseConv2D(2, depthwise_initializer=init(3), name="depthwise")(x)
    x = keras.layers.Reshape((9, 4))(x)  # 3x3x4 -> 9 steps of 4
    x = keras.layers.Conv1D(6, 3, activation="relu", kernel_initializer=init(4), name="conv1d")(x)
    x = keras.layers.Flatten()(x)
    logits = keras.layers.Dense(num_classes, kernel_initializer=init(5), name="logits")(x)
    return keras.Model(inputs, logits, name="byo")


def data(data_dir=None, augment=False, validation_holdout=0):
    """Random 8x8 images of 4 classes as an lth_tf `ArrayData`."""
    arrays = data_lib.synthetic_arrays(
        SHAPE,
        NUM_CLASSES,
        num_train=640,
        num_test=128,
        seed=3,
        validation_holdout=validation_holdout,
    )
    return data_lib.ArrayData("byo_example:data", arrays, augment)
