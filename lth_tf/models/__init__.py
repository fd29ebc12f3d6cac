"""The model zoo: functional Keras builders for the networks of the lottery ticket papers.

    from lth_tf.models import build_model
    model = build_model("resnet20", (32, 32, 3), 10, seed=1, weight_decay=1e-4)

Every model is a functional `keras.Model` named after its architecture whose
output is float32 logits from a Dense layer named `OUTPUT_LAYER`. The prunable
layers are exactly its Conv2D and Dense layers. Layer names are stable: the same
architecture gets the same names in every build, whatever the input shape or seed,
so masks and checkpoints can be keyed by them. Weights are a pure function of
(arch, input channels, num_classes, seed).

Layer names:
    lenet_300_100  flatten, fc1, fc2, output
    conv2/4/6      conv1..convN, pool1..poolK, flatten, fc1, fc2, output
    vgg16/19       conv1..convN, bn1..bnN, relu1..reluN, pool1..pool4, avg_pool, output
    resnet20/56    conv, bn, relu, stage{1..3}_block{b}_{conv1,bn1,relu1,conv2,bn2,
                   shortcut_conv,shortcut_bn,add,out}, avg_pool, output
    resnet50       conv1, conv1_bn, conv1_relu, pool1, stage{2..5}_block{b}_{conv1,bn1,
                   relu1,conv2,bn2,relu2,conv3,bn3,shortcut_conv,shortcut_bn,add,out},
                   avg_pool, output
plus "input", "add_channel" (a Reshape for 2-D image inputs) and "*_pad"
ZeroPadding2D layers before strided convs and pools.
"""

import math
import numbers

from lth_tf.keras import keras
from lth_tf.models._layers import LayerFactory
from lth_tf.models.conv import PLANS as _CONV_PLANS
from lth_tf.models.conv import conv_net
from lth_tf.models.mlp import lenet_300_100
from lth_tf.models.resnet_cifar import resnet_cifar
from lth_tf.models.resnet_imagenet import resnet50
from lth_tf.models.vgg import PLANS as _VGG_PLANS
from lth_tf.models.vgg import vgg

ARCHITECTURES: tuple[str, ...] = (
    "lenet_300_100",
    "conv2",
    "conv4",
    "conv6",
    "vgg16",
    "vgg19",
    "resnet20",
    "resnet56",
    "resnet50",
)

# The name of every model's final Dense (logits) layer.
OUTPUT_LAYER = "output"

# Kernel initialiser per architecture. The 2019 lottery ticket paper (Frankle &
# Carbin) used Gaussian Glorot for all its networks (LeNet-300-100, Conv-2/4/6);
# the authors' framework (open_lth), whose recipes the VGG and ResNet presets
# follow, uses He normal.
GLOROT_NORMAL_ARCHS = frozenset({"lenet_300_100", "conv2", "conv4", "conv6"})


def kernel_init(arch: str) -> str:
    """The kernel initialiser of `arch`: "glorot_normal" or "he_normal" (see LayerFactory)."""
    return "glorot_normal" if arch in GLOROT_NORMAL_ARCHS else "he_normal"


__all__ = ["ARCHITECTURES", "OUTPUT_LAYER", "build_model", "kernel_init"]


def _min_image_size(arch: str) -> int:
    """The smallest height/width that survives the architecture's 2x2 max-pools."""
    plan = _CONV_PLANS.get(arch) or _VGG_PLANS.get(arch) or ()
    return 2 ** plan.count("M")


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_args(arch, input_shape, num_classes, seed, weight_decay) -> tuple[int, ...]:
    """Validates build_model's arguments; returns input_shape as a tuple of ints."""
    if not isinstance(arch, str) or arch not in ARCHITECTURES:
        raise ValueError(f"Unknown architecture {arch!r}; known: {', '.join(ARCHITECTURES)}.")
    if (
        not isinstance(input_shape, tuple | list)
        or not input_shape
        or not all(_is_int(d) and d > 0 for d in input_shape)
    ):
        raise ValueError(
            f"input_shape must be a non-empty tuple of positive ints without the batch "
            f"axis, e.g. (32, 32, 3); got {input_shape!r}."
        )
    input_shape = tuple(int(d) for d in input_shape)
    if arch != "lenet_300_100":
        if len(input_shape) not in (2, 3):
            raise ValueError(
                f"{arch} takes images: input_shape must be (height, width) or "
                f"(height, width, channels); got {input_shape!r}."
            )
        min_size = _min_image_size(arch)
        if min(input_shape[:2]) < min_size:
            raise ValueError(
                f"{arch} needs images of at least {min_size}x{min_size} for its max-pools; "
                f"got input_shape {input_shape!r}."
            )
    if not _is_int(num_classes) or num_classes < 2:
        raise ValueError(f"num_classes must be an int >= 2; got {num_classes!r}.")
    if not _is_int(seed) or seed < 0:
        raise ValueError(f"seed must be a non-negative int; got {seed!r}.")
    if (
        not isinstance(weight_decay, numbers.Real)
        or isinstance(weight_decay, bool)
        or not math.isfinite(weight_decay)
        or weight_decay < 0
    ):
        raise ValueError(f"weight_decay must be a finite float >= 0; got {weight_decay!r}.")
    return input_shape


def build_model(
    arch: str,
    input_shape: tuple[int, ...],
    num_classes: int,
    *,
    seed: int = 0,
    weight_decay: float = 0.0,
) -> keras.Model:
    """Builds a freshly initialised functional Keras model.

    Initialisation follows the authors' framework (open_lth) for VGG and ResNets:
    He normal (fan_in, untruncated) kernels, zero biases, BatchNorm gamma ~ U[0, 1]
    and beta = 0; LeNet-300-100 and Conv-2/4/6 use Gaussian Glorot kernels (and
    zero biases) as in the 2019 paper (`kernel_init(arch)`). Each layer's
    initialiser is seeded from `seed` and the layer's build order, so the weights
    do not depend on the global RNG state.

    Args:
        arch: One of `ARCHITECTURES`.
        input_shape: One example's shape, without the batch axis. lenet_300_100
            flattens any shape; the conv nets take (H, W, C) or (H, W), which gets
            a channel axis.
        num_classes: Number of logits, at least 2.
        seed: Non-negative int; the same seed gives bit-identical weights.
        weight_decay: Coupled (PyTorch SGD style) weight decay: adds
            L2(weight_decay / 2) regularizers to every conv/dense kernel and bias
            and BatchNorm gamma and beta, whose gradient is weight_decay * w.
            0 adds none.

    Returns:
        A `keras.Model` named `arch` mapping inputs to float32 logits of shape
        (batch, num_classes); the last layer is the Dense named `OUTPUT_LAYER`.

    Raises:
        ValueError: For an unknown arch (the message lists the known ones), an
            input_shape the architecture cannot take, num_classes < 2, a negative
            seed or a negative weight_decay.
    """
    input_shape = _check_args(arch, input_shape, num_classes, seed, weight_decay)
    num_classes, seed, weight_decay = int(num_classes), int(seed), float(weight_decay)
    layers = LayerFactory(seed, weight_decay, kernel_init(arch))

    inputs = keras.Input(shape=input_shape, name="input")
    x = inputs
    if arch != "lenet_300_100" and len(input_shape) == 2:
        x = keras.layers.Reshape((*input_shape, 1), name="add_channel")(x)

    if arch == "lenet_300_100":
        logits = lenet_300_100(x, num_classes, layers)
    elif arch in _CONV_PLANS:
        logits = conv_net(arch, x, num_classes, layers)
    elif arch in _VGG_PLANS:
        logits = vgg(arch, x, num_classes, layers)
    elif arch in ("resnet20", "resnet56"):
        logits = resnet_cifar(arch, x, num_classes, layers)
    else:
        logits = resnet50(x, num_classes, layers)
    return keras.Model(inputs, logits, name=arch)
