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

The architectures are records (`Architecture`) in one table, `REGISTRY`; their
training recipes are lth_tf.presets.RECIPES under the same names. Adding an
architecture adds its module, its record here and its recipe. A user's model
needs no entry: --arch=package.module:function names its builder (`build_model`).
"""

import dataclasses
import functools
import math
import numbers
import types
from collections.abc import Callable

from lth_tf import plugins, presets
from lth_tf.keras import keras
from lth_tf.models._layers import LayerFactory
from lth_tf.models.conv import PLANS as _CONV_PLANS
from lth_tf.models.conv import conv_net
from lth_tf.models.mlp import lenet_300_100
from lth_tf.models.resnet_cifar import resnet_cifar
from lth_tf.models.resnet_imagenet import resnet50
from lth_tf.models.vgg import PLANS as _VGG_PLANS
from lth_tf.models.vgg import vgg


@dataclasses.dataclass(frozen=True)
class Architecture:
    """One built-in architecture: everything lth_tf needs to know about it.

    Attributes:
        name: the --arch value (also the model's name).
        build: (x, num_classes, layers: LayerFactory) -> logits, x the input tensor
            (with a channel axis added to 2-D images when `images`).
        kernel_init: "glorot_normal" or "he_normal" (see LayerFactory).
        images: takes (H, W) or (H, W, C) images; False flattens any shape.
        min_image_size: the smallest height/width its max-pools survive.
    """

    name: str
    build: Callable
    kernel_init: str = "he_normal"
    images: bool = True
    min_image_size: int = 1


def _pool_size(plan) -> int:
    return 2 ** plan.count("M")


# Kernel initialisers: the 2019 lottery ticket paper (Frankle & Carbin) used
# Gaussian Glorot for all its networks (LeNet-300-100, Conv-2/4/6); the authors'
# framework (open_lth), whose recipes the VGG and ResNet presets follow, uses He
# normal. Each architecture's training recipe is lth_tf.presets.RECIPES[name].
REGISTRY: "types.MappingProxyType[str, Architecture]" = types.MappingProxyType(
    {
        a.name: a
        for a in (
            Architecture("lenet_300_100", lenet_300_100, kernel_init="glorot_normal", images=False),
            *(
                Architecture(
                    name,
                    functools.partial(conv_net, name),
                    kernel_init="glorot_normal",
                    min_image_size=_pool_size(plan),
                )
                for name, plan in _CONV_PLANS.items()
            ),
            *(
                Architecture(name, functools.partial(vgg, name), min_image_size=_pool_size(plan))
                for name, plan in _VGG_PLANS.items()
            ),
            Architecture("resnet20", functools.partial(resnet_cifar, "resnet20")),
            Architecture("resnet56", functools.partial(resnet_cifar, "resnet56")),
            Architecture("resnet50", resnet50),
        )
    }
)

ARCHITECTURES: tuple[str, ...] = tuple(REGISTRY)

# The name of every built-in model's final Dense (logits) layer.
OUTPUT_LAYER = "output"

# A user's architecture: --arch=package.module:function (see `custom_builder`).
is_custom = presets.is_custom


def kernel_init(arch: str) -> str:
    """The kernel initialiser of built-in `arch`: "glorot_normal" or "he_normal"."""
    return REGISTRY[arch].kernel_init


__all__ = [
    "ARCHITECTURES",
    "OUTPUT_LAYER",
    "REGISTRY",
    "Architecture",
    "build_model",
    "custom_builder",
    "is_custom",
    "kernel_init",
]


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_args(arch, input_shape, num_classes, seed, weight_decay) -> tuple[int, ...]:
    """Validates build_model's arguments; returns input_shape as a tuple of ints."""
    if not isinstance(arch, str) or not (arch in REGISTRY or is_custom(arch)):
        raise ValueError(
            f"Unknown architecture {arch!r}; known: {', '.join(ARCHITECTURES)}, or "
            "package.module:function for your own builder."
        )
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
    spec = REGISTRY.get(arch)
    if spec is not None and spec.images:
        if len(input_shape) not in (2, 3):
            raise ValueError(
                f"{arch} takes images: input_shape must be (height, width) or "
                f"(height, width, channels); got {input_shape!r}."
            )
        min_size = spec.min_image_size
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
        arch: One of `ARCHITECTURES`, or 'package.module:function': a user's builder
            `function(input_shape, num_classes, seed) -> keras.Model` returning a
            built functional or Sequential tf_keras model of float32 logits (its
            own names, initialisers and regularizers; weight_decay must be 0).
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
    if is_custom(arch):
        return _build_custom(arch, input_shape, num_classes, seed, weight_decay)
    spec = REGISTRY[arch]
    layers = LayerFactory(seed, weight_decay, spec.kernel_init)

    inputs = keras.Input(shape=input_shape, name="input")
    x = inputs
    if spec.images and len(input_shape) == 2:
        x = keras.layers.Reshape((*input_shape, 1), name="add_channel")(x)
    return keras.Model(inputs, spec.build(x, num_classes, layers), name=arch)


def custom_builder(arch: str) -> Callable:
    """Imports the function named by --arch=package.module:function.

    Raises:
        ValueError: when the module cannot be imported or has no such callable
            (the message says what was looked for).
    """
    return plugins.import_function(arch, "arch")


def _build_custom(arch, input_shape, num_classes, seed, weight_decay) -> keras.Model:
    """Calls a user's builder and checks that lth_tf can train and prune what it returns."""
    if weight_decay:
        raise ValueError(
            f"--arch={arch}: weight_decay={weight_decay:g}, but lth_tf adds weight decay only "
            "to its own architectures. Put regularizers in your builder and use "
            "--weight_decay=0."
        )
    model = custom_builder(arch)(input_shape, num_classes, seed)
    if not isinstance(model, keras.Model) or not (
        isinstance(model, keras.Sequential) or getattr(model, "_is_graph_network", False)
    ):
        raise ValueError(
            f"--arch={arch} returned {type(model).__name__}; expected a functional or "
            "Sequential tf_keras model (lth_tf.keras.keras), built (with an input shape), "
            "so that its layers can be cloned and wrapped."
        )
    if not model.built or not model.inputs:
        raise ValueError(
            f"--arch={arch} returned a model that is not built; give it an Input (or "
            f"input_shape) of {input_shape}."
        )
    shape = tuple(model.outputs[0].shape)
    if len(model.outputs) != 1 or shape[1:] != (num_classes,):
        raise ValueError(
            f"--arch={arch} returned a model whose output is {shape}; expected one output "
            f"of logits shaped (batch, {num_classes})."
        )
    return model
