"""ResNet-50 for ImageNet: the torchvision ResNet-50 v1.5 used by open_lth.

7x7/2 conv + BN + ReLU and a 3x3/2 max-pool, four stages of 3, 4, 6 and 3
bottleneck blocks (1x1, 3x3, 1x1 convs of widths 64/128/256/512, expanded x4),
the stride on the 3x3 conv (v1.5), projection shortcuts where the shape changes,
global average pooling and the output layer. Convs have no bias. Stages are
numbered 2 to 5 after the paper's conv2_x..conv5_x.
"""

from lth_tf.keras import keras
from lth_tf.models._layers import LayerFactory
from lth_tf.models.resnet_cifar import add_shortcut, conv3x3

STAGES = (3, 4, 6, 3)
WIDTHS = (64, 128, 256, 512)
EXPANSION = 4


def bottleneck_block(x, width: int, stride: int, prefix: str, layers: LayerFactory):
    """1x1 -> 3x3 (strided) -> 1x1 conv + BN with a residual connection, then ReLU.

    Layers are named {prefix}_conv1, _bn1, _relu1, [_pad2], _conv2, _bn2, _relu2,
    _conv3, _bn3, [_shortcut_conv, _shortcut_bn], _add, _out.
    """
    filters = width * EXPANSION
    shortcut = x
    x = layers.conv(width, 1, f"{prefix}_conv1", use_bias=False)(x)
    x = layers.batch_norm(f"{prefix}_bn1")(x)
    x = keras.layers.ReLU(name=f"{prefix}_relu1")(x)
    x = conv3x3(x, width, stride, prefix, 2, layers)
    x = layers.batch_norm(f"{prefix}_bn2")(x)
    x = keras.layers.ReLU(name=f"{prefix}_relu2")(x)
    x = layers.conv(filters, 1, f"{prefix}_conv3", use_bias=False)(x)
    x = layers.batch_norm(f"{prefix}_bn3")(x)
    return add_shortcut(x, shortcut, filters, stride, prefix, layers)


def resnet50(x, num_classes: int, layers: LayerFactory):
    """conv1_pad, conv1, conv1_bn, conv1_relu, pool1_pad, pool1, stage{2..5}_*, output.

    Args:
        x: The image tensor, (batch, H, W, C).
        num_classes: Width of the output layer.
        layers: The factory that makes seeded layers.

    Returns:
        The logits tensor.
    """
    # Explicit symmetric padding reproduces PyTorch's padding=3 and padding=1.
    x = keras.layers.ZeroPadding2D(3, name="conv1_pad")(x)
    x = layers.conv(64, 7, "conv1", strides=2, padding="valid", use_bias=False)(x)
    x = layers.batch_norm("conv1_bn")(x)
    x = keras.layers.ReLU(name="conv1_relu")(x)
    # PyTorch pads max-pool inputs with -inf; after a ReLU, zero padding is the same.
    x = keras.layers.ZeroPadding2D(1, name="pool1_pad")(x)
    x = keras.layers.MaxPooling2D(3, strides=2, name="pool1")(x)
    for stage, (num_blocks, width) in enumerate(zip(STAGES, WIDTHS, strict=True), start=2):
        for block in range(1, num_blocks + 1):
            stride = 2 if stage > 2 and block == 1 else 1
            x = bottleneck_block(x, width, stride, f"stage{stage}_block{block}", layers)
    x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
    return layers.output(num_classes)(x)
