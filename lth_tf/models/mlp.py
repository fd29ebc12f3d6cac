"""LeNet-300-100, the fully connected MNIST network of the lottery ticket papers."""

from lth_tf.keras import keras
from lth_tf.models._layers import LayerFactory


def lenet_300_100(x, num_classes: int, layers: LayerFactory):
    """Flatten -> fc1 (300, ReLU) -> fc2 (100, ReLU) -> output (logits).

    Args:
        x: The input tensor, of any shape; it is flattened.
        num_classes: Width of the output layer.
        layers: The factory that makes seeded layers (Glorot normal for LeNet).

    Returns:
        The logits tensor.
    """
    x = keras.layers.Flatten(name="flatten")(x)
    x = layers.dense(300, "fc1", activation="relu")(x)
    x = layers.dense(100, "fc2", activation="relu")(x)
    return layers.output(num_classes)(x)
