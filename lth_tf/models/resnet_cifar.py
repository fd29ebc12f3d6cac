"""ResNet-20 and ResNet-56 for CIFAR-10 (He et al. 2016; open_lth cifar_resnet).

A 3x3 16-filter conv with BatchNorm and ReLU, three stages of n = (depth - 2) / 6
basic blocks of widths 16, 32 and 64 (stride 2 at the start of stages 2 and 3),
global average pooling and the output layer. Convs have no bias (BatchNorm follows
each). A block whose shape changes gets a 1x1 stride-2 conv + BatchNorm projection
shortcut; the others are identities.
"""

from lth_tf.keras import keras
from lth_tf.models._layers import LayerFactory

DEPTHS = {"resnet20": 20, "resnet56": 56}
WIDTHS = (16, 32, 64)


def strided_pad(name: str) -> keras.layers.ZeroPadding2D:
    """Symmetric 1-pixel padding for a 3x3 stride-2 conv, as PyTorch's padding=1.

    Keras' "same" padding with stride 2 on an even-sized input pads only the bottom
    and right, which centres the 3x3 windows on odd pixels while the 1x1 stride-2
    shortcut samples even ones; padding both sides keeps the two paths aligned and
    the layer identical to the PyTorch reference.
    """
    return keras.layers.ZeroPadding2D(1, name=name)


def basic_block(x, filters: int, stride: int, prefix: str, layers: LayerFactory):
    """Two 3x3 conv + BN layers around a residual connection, then ReLU.

    Layers are named {prefix}_conv1, _bn1, _relu1, _conv2, _bn2, [_shortcut_conv,
    _shortcut_bn], _add, _out (and _pad1 before a strided conv1).
    """
    shortcut = x
    x = conv3x3(x, filters, stride, prefix, 1, layers)
    x = layers.batch_norm(f"{prefix}_bn1")(x)
    x = keras.layers.ReLU(name=f"{prefix}_relu1")(x)
    x = layers.conv(filters, 3, f"{prefix}_conv2", use_bias=False)(x)
    x = layers.batch_norm(f"{prefix}_bn2")(x)
    return add_shortcut(x, shortcut, filters, stride, prefix, layers)


def conv3x3(x, filters: int, stride: int, prefix: str, index: int, layers: LayerFactory):
    """{prefix}_conv{index}: a 3x3 conv; strided ones pad symmetrically first (as PyTorch)."""
    if stride == 1:
        return layers.conv(filters, 3, f"{prefix}_conv{index}", use_bias=False)(x)
    x = strided_pad(f"{prefix}_pad{index}")(x)
    return layers.conv(
        filters, 3, f"{prefix}_conv{index}", strides=stride, padding="valid", use_bias=False
    )(x)


def add_shortcut(x, shortcut, filters: int, stride: int, prefix: str, layers: LayerFactory):
    """Adds the (projected, where the shape changes) shortcut and applies the final ReLU."""
    if stride > 1 or shortcut.shape[-1] != filters:
        shortcut = layers.conv(
            filters, 1, f"{prefix}_shortcut_conv", strides=stride, padding="valid", use_bias=False
        )(shortcut)
        shortcut = layers.batch_norm(f"{prefix}_shortcut_bn")(shortcut)
    x = keras.layers.Add(name=f"{prefix}_add")([x, shortcut])
    return keras.layers.ReLU(name=f"{prefix}_out")(x)


def resnet_cifar(arch: str, x, num_classes: int, layers: LayerFactory):
    """conv, bn, relu, stage{1..3}_block{1..n}_*, avg_pool, output.

    Args:
        arch: "resnet20" or "resnet56".
        x: The image tensor, (batch, H, W, C).
        num_classes: Width of the output layer.
        layers: The factory that makes seeded layers.

    Returns:
        The logits tensor.
    """
    blocks_per_stage = (DEPTHS[arch] - 2) // 6
    x = layers.conv(WIDTHS[0], 3, "conv", use_bias=False)(x)
    x = layers.batch_norm("bn")(x)
    x = keras.layers.ReLU(name="relu")(x)
    for stage, filters in enumerate(WIDTHS, start=1):
        for block in range(1, blocks_per_stage + 1):
            stride = 2 if stage > 1 and block == 1 else 1
            x = basic_block(x, filters, stride, f"stage{stage}_block{block}", layers)
    x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
    return layers.output(num_classes)(x)
