"""Conv-2, Conv-4 and Conv-6: the VGG-like CIFAR-10 networks of Frankle & Carbin (2019).

3x3 same-padding convolutions with ReLU and 2x2 max-pools, then two 256-unit ReLU
dense layers and the output layer. No BatchNorm. Kernels are Gaussian Glorot, as
in the paper (build_model picks the initialiser per architecture).
"""

from lth_tf.keras import keras
from lth_tf.models._layers import LayerFactory

# Integers are conv widths, "M" a 2x2 max-pool.
PLANS = {
    "conv2": (64, 64, "M"),
    "conv4": (64, 64, "M", 128, 128, "M"),
    "conv6": (64, 64, "M", 128, 128, "M", 256, 256, "M"),
}


def conv_net(arch: str, x, num_classes: int, layers: LayerFactory):
    """conv1..convN (ReLU) with pool1..poolK, flatten, fc1, fc2 (256, ReLU), output.

    Args:
        arch: "conv2", "conv4" or "conv6".
        x: The image tensor, (batch, H, W, C).
        num_classes: Width of the output layer.
        layers: The factory that makes seeded layers.

    Returns:
        The logits tensor.
    """
    conv_index = pool_index = 0
    for spec in PLANS[arch]:
        if spec == "M":
            pool_index += 1
            x = keras.layers.MaxPooling2D(2, name=f"pool{pool_index}")(x)
        else:
            conv_index += 1
            x = layers.conv(spec, 3, f"conv{conv_index}", activation="relu")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    x = layers.dense(256, "fc1", activation="relu")(x)
    x = layers.dense(256, "fc2", activation="relu")(x)
    return layers.output(num_classes)(x)
