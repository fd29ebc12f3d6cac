"""VGG-16 and VGG-19 for CIFAR-10, as in the authors' framework (open_lth cifar_vgg).

Each conv is 3x3 same-padding followed by BatchNorm and ReLU; the convs keep their
bias as in open_lth (PyTorch's Conv2d default). After the last conv open_lth
average-pools the 2x2 map of a 32x32 input; global average pooling is the same
there and also works for other input sizes.
"""

from lth_tf.keras import keras
from lth_tf.models._layers import LayerFactory

# Integers are conv widths, "M" a 2x2 max-pool.
PLANS = {
    "vgg16": (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512),
    "vgg19": (64, 64, "M", 128, 128, "M", *(256,) * 4, "M", *(512,) * 4, "M", *(512,) * 4),
}


def vgg(arch: str, x, num_classes: int, layers: LayerFactory):
    """convI, bnI, reluI for each conv, poolJ for each pool, avg_pool, output.

    Args:
        arch: "vgg16" or "vgg19".
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
            x = layers.conv(spec, 3, f"conv{conv_index}")(x)
            x = layers.batch_norm(f"bn{conv_index}")(x)
            x = keras.layers.ReLU(name=f"relu{conv_index}")(x)
    x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
    return layers.output(num_classes)(x)
