"""Contracts of the model zoo (lth_tf.models): shapes, names, seeding, init, decay, tfmot."""

import numpy as np
import pytest

from lth_tf import sparsity
from lth_tf.keras import keras, tf
from lth_tf.models import ARCHITECTURES, OUTPUT_LAYER, build_model

NUM_CLASSES = 5

# Small inputs keep the whole file fast on a CPU; each is the smallest convenient
# size that survives the architecture's pools.
SMALL_SHAPES = {
    "lenet_300_100": (28, 28, 1),
    "conv2": (8, 8, 3),
    "conv4": (8, 8, 3),
    "conv6": (8, 8, 3),
    "vgg16": (16, 16, 3),
    "vgg19": (16, 16, 3),
    "resnet20": (8, 8, 3),
    "resnet56": (8, 8, 3),
    "resnet50": (32, 32, 3),
}

# Trainable parameters at each architecture's natural input with 10 classes
# (1000 for ResNet-50). VGG and the ResNets match open_lth's PyTorch models and
# ResNet-50 torchvision's 25,557,032; none of these depends on the image size.
TRAINABLE_PARAMS = {
    "lenet_300_100": 266_610,
    "conv2": 4_301_642,
    "conv4": 2_425_930,
    "conv6": 2_262_602,
    "vgg16": 14_728_266,
    "vgg19": 20_040_522,
    "resnet20": 272_474,
    "resnet56": 855_770,
    "resnet50": 25_557_032,
}
NATURAL_SHAPES = {"lenet_300_100": (28, 28, 1), "resnet50": (224, 224, 3)}


def _trainable_count(model):
    return sum(int(np.prod(w.shape)) for w in model.trainable_weights)


def _scramble_global_rng():
    """Changes every global RNG a careless initialiser could depend on."""
    keras.utils.set_random_seed(12345)
    tf.random.uniform([7])
    np.random.rand(3)


@pytest.fixture(scope="module")
def small_models():
    """Every architecture built once at its small input, seed 0."""
    return {
        arch: build_model(arch, SMALL_SHAPES[arch], NUM_CLASSES, seed=0) for arch in ARCHITECTURES
    }


@pytest.fixture(scope="module")
def resnet50_imagenet():
    """ResNet-50 at 224x224x3 with 1000 classes: built, never run."""
    return build_model("resnet50", (224, 224, 3), 1000, seed=0)


def test_architectures_listed():
    assert ARCHITECTURES == (
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


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_forward_pass_gives_float32_logits(small_models, arch):
    model = small_models[arch]
    assert isinstance(model, keras.Model) and model.name == arch
    x = np.random.default_rng(0).normal(size=(2, *SMALL_SHAPES[arch])).astype("float32")
    y = model(x, training=False)
    assert y.shape == (2, NUM_CLASSES)
    assert y.dtype == tf.float32
    assert np.all(np.isfinite(y.numpy()))
    output = model.layers[-1]
    assert output.name == OUTPUT_LAYER and type(output) is keras.layers.Dense
    assert output.activation is keras.activations.linear  # logits, no softmax


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_prunable_layers_are_exactly_conv2d_and_dense(small_models, arch):
    for layer in small_models[arch].layers:
        if layer.weights:
            assert type(layer) in (
                keras.layers.Conv2D,
                keras.layers.Dense,
                keras.layers.BatchNormalization,
            ), layer.name


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_same_seed_same_names_and_bit_identical_weights(small_models, resnet50_imagenet, arch):
    first = small_models[arch]
    names = [layer.name for layer in first.layers]
    assert len(names) == len(set(names))
    _scramble_global_rng()
    if arch == "resnet50":
        # Weights do not depend on the image size, so the 224x224 build must equal
        # the 32x32 one, names and values.
        second = resnet50_imagenet
        first_weights = [w.numpy() for w in first.weights if "output" not in w.name]
        second_weights = [w.numpy() for w in second.weights if "output" not in w.name]
    else:
        second = build_model(arch, SMALL_SHAPES[arch], NUM_CLASSES, seed=0)
        first_weights = [w.numpy() for w in first.weights]
        second_weights = [w.numpy() for w in second.weights]
    assert [layer.name for layer in second.layers] == names
    assert len(first_weights) == len(second_weights)
    for a, b in zip(first_weights, second_weights, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("arch", ["lenet_300_100", "conv2", "resnet20"])
def test_different_seed_different_weights(small_models, arch):
    base = small_models[arch]
    other = build_model(arch, SMALL_SHAPES[arch], NUM_CLASSES, seed=1)
    assert [layer.name for layer in other.layers] == [layer.name for layer in base.layers]
    for a, b in zip(base.weights, other.weights, strict=True):
        random = "kernel" in a.name or "gamma" in a.name
        assert (not np.array_equal(a.numpy(), b.numpy())) == random, a.name


def test_layers_within_a_model_draw_different_weights(small_models):
    # Same-shaped layers must not share a seed.
    model = small_models["resnet20"]
    first = model.get_layer("stage1_block1_conv1").kernel.numpy()
    second = model.get_layer("stage1_block1_conv2").kernel.numpy()
    assert not np.array_equal(first, second)


def test_he_normal_init_is_untruncated_fan_in(small_models):
    # open_lth uses torch's kaiming_normal_: untruncated normal, std sqrt(2 / fan_in).
    model = small_models["vgg16"]
    kernel = model.get_layer("conv13").kernel.numpy()
    std = np.sqrt(2.0 / (3 * 3 * 512))
    assert kernel.std() == pytest.approx(std, rel=0.02)
    assert np.abs(kernel).max() > 3 * std  # a truncated normal stops at 2 std
    assert np.all(model.get_layer("conv13").bias.numpy() == 0)
    dense = model.get_layer(OUTPUT_LAYER)
    assert np.all(dense.bias.numpy() == 0)


def test_lenet_uses_gaussian_glorot(small_models):
    kernel = small_models["lenet_300_100"].get_layer("fc1").kernel.numpy()
    assert kernel.std() == pytest.approx(np.sqrt(2.0 / (784 + 300)), rel=0.02)
    assert np.all(small_models["lenet_300_100"].get_layer("fc1").bias.numpy() == 0)


@pytest.mark.parametrize("arch", ["conv2", "conv4", "conv6"])
def test_conv_nets_use_gaussian_glorot_like_the_2019_paper(small_models, arch):
    # conv2 is 3x3x64 -> 64: Glorot std sqrt(2 / (576 + 576)) = 0.042, He's would be
    # sqrt(2 / 576) = 0.059, so the check tells the two apart.
    model = small_models[arch]
    kernel = model.get_layer("conv2").kernel.numpy()
    fan_in = fan_out = 3 * 3 * 64
    assert kernel.std() == pytest.approx(np.sqrt(2.0 / (fan_in + fan_out)), rel=0.03)
    fc2 = model.get_layer("fc2").kernel.numpy()
    assert fc2.std() == pytest.approx(np.sqrt(2.0 / (256 + 256)), rel=0.03)
    assert np.all(model.get_layer("conv2").bias.numpy() == 0)


@pytest.mark.parametrize("arch", ["resnet20", "vgg16"])
def test_resnet_and_vgg_keep_he_normal(small_models, arch):
    convs = [
        layer
        for layer in small_models[arch].layers
        if isinstance(layer, keras.layers.Conv2D) and layer.kernel.shape[-1] >= 64
    ]
    kernel = convs[-1].kernel.numpy()
    fan_in = int(np.prod(kernel.shape[:-1]))
    assert kernel.std() == pytest.approx(np.sqrt(2.0 / fan_in), rel=0.03)


def test_kernel_init_per_architecture():
    from lth_tf.models import kernel_init

    glorot = {"lenet_300_100", "conv2", "conv4", "conv6"}
    for arch in ARCHITECTURES:
        assert kernel_init(arch) == ("glorot_normal" if arch in glorot else "he_normal"), arch


@pytest.mark.parametrize("arch", ["vgg16", "resnet20", "resnet50"])
def test_batchnorm_init_and_hyperparameters(small_models, arch):
    bns = [
        layer
        for layer in small_models[arch].layers
        if isinstance(layer, keras.layers.BatchNormalization)
    ]
    assert bns
    for bn in bns:
        gamma = bn.gamma.numpy()
        assert np.all((gamma >= 0) & (gamma <= 1)), bn.name
        assert gamma.std() > 0.1, bn.name  # uniform, not constant
        assert np.all(bn.beta.numpy() == 0), bn.name
        assert np.all(bn.moving_mean.numpy() == 0) and np.all(bn.moving_variance.numpy() == 1)
        assert bn.momentum == 0.9 and bn.epsilon == 1e-5


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_parameter_counts(small_models, resnet50_imagenet, arch):
    if arch == "resnet50":
        count = _trainable_count(resnet50_imagenet)
    elif arch in ("vgg16", "vgg19", "resnet20", "resnet56"):
        # Global pooling makes the count independent of the image size; only the
        # output layer changes, from NUM_CLASSES to 10 units.
        model = small_models[arch]
        output = model.get_layer(OUTPUT_LAYER)
        count = _trainable_count(model) - output.count_params() + (output.input_shape[-1] + 1) * 10
    else:
        count = _trainable_count(build_model(arch, NATURAL_SHAPES.get(arch, (32, 32, 3)), 10))
    assert count == TRAINABLE_PARAMS[arch]


def test_resnet50_matches_torchvision_count(resnet50_imagenet):
    # 25,557,032 is torchvision's count (bias-free convs; BN gamma and beta). Keras'
    # count_params() also counts the BN moving mean and variance: 53,120 more.
    model = resnet50_imagenet
    assert _trainable_count(model) == 25_557_032
    assert model.count_params() == 25_557_032 + 53_120
    assert model.output_shape == (None, 1000)
    convs = [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]
    assert len(convs) == 53 and not any(layer.use_bias for layer in convs)
    # v1.5: the stride sits on the 3x3 conv, not the first 1x1.
    assert model.get_layer("stage3_block1_conv1").strides == (1, 1)
    assert model.get_layer("stage3_block1_conv2").strides == (2, 2)
    assert model.get_layer("stage5_block3_out").output_shape == (None, 7, 7, 2048)


def test_resnet20_structure(small_models):
    model = small_models["resnet20"]
    convs = [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]
    # 1 stem + 18 block convs + 2 projection shortcuts (stages 2 and 3).
    assert len(convs) == 21
    shortcuts = sorted(layer.name for layer in convs if "shortcut" in layer.name)
    assert shortcuts == ["stage2_block1_shortcut_conv", "stage3_block1_shortcut_conv"]
    assert model.get_layer("stage3_block3_out").output_shape == (None, 2, 2, 64)


def test_resnet56_has_nine_blocks_per_stage(small_models):
    names = {layer.name for layer in small_models["resnet56"].layers}
    assert "stage3_block9_out" in names and "stage3_block10_out" not in names


@pytest.mark.parametrize("arch", ["lenet_300_100", "conv2", "resnet20"])
def test_weight_decay_adds_coupled_l2_losses(arch):
    wd = 1e-4
    plain = build_model(arch, SMALL_SHAPES[arch], NUM_CLASSES, weight_decay=0.0)
    assert plain.losses == []
    model = build_model(arch, SMALL_SHAPES[arch], NUM_CLASSES, weight_decay=wd)
    # One L2 term per trainable variable (kernels, biases, gamma, beta) of value
    # wd / 2 * ||w||^2, so that its gradient is wd * w.
    assert len(model.losses) == len(model.trainable_weights)
    expected = sum(
        wd / 2 * np.sum(w.numpy().astype("float64") ** 2) for w in model.trainable_weights
    )
    assert float(tf.add_n(model.losses)) == pytest.approx(expected, rel=1e-4)


def test_two_dimensional_images_get_a_channel_axis():
    model = build_model("conv2", (8, 8), NUM_CLASSES)
    assert model.get_layer("add_channel").output_shape == (None, 8, 8, 1)
    assert model(np.zeros((3, 8, 8), "float32")).shape == (3, NUM_CLASSES)
    lenet = build_model("lenet_300_100", (784,), NUM_CLASSES)
    assert lenet(np.zeros((3, 784), "float32")).shape == (3, NUM_CLASSES)


def test_mixed_precision_output_stays_float32():
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = build_model("conv2", (8, 8, 3), NUM_CLASSES)
        assert model.get_layer("conv1").compute_dtype == "float16"
        assert model.output.dtype == tf.float32
        # The float32 output layer keeps float32 inside lth_tf's pruning wrapper only if
        # the wrapper gets the layer's policy; with the global mixed policy its masked
        # kernel would mix float16 and float32 and fail.
        pruned = sparsity.wrap(model)
        wrappers = sparsity.wrappers(pruned)
        assert type(wrappers[OUTPUT_LAYER]) is sparsity.MaskedLayer
        assert wrappers[OUTPUT_LAYER].compute_dtype == "float32"
        assert wrappers["conv1"].compute_dtype == "float16"
        assert pruned(np.ones((1, 8, 8, 3), "float32")).dtype == tf.float32
    finally:
        keras.mixed_precision.set_global_policy("float32")


def test_unknown_architecture_lists_known_names():
    with pytest.raises(ValueError, match="resnet18") as info:
        build_model("resnet18", (32, 32, 3), 10)
    for arch in ARCHITECTURES:
        assert arch in str(info.value)


@pytest.mark.parametrize(
    ("arch", "kwargs", "received"),
    [
        ("conv2", {"input_shape": (32,)}, r"\(32,\)"),
        ("resnet20", {"input_shape": (2, 8, 8, 3)}, r"\(2, 8, 8, 3\)"),
        ("vgg16", {"input_shape": (8, 8, 3)}, r"\(8, 8, 3\)"),
        ("lenet_300_100", {"input_shape": ()}, r"\(\)"),
        ("lenet_300_100", {"input_shape": (28, 0)}, r"\(28, 0\)"),
        ("lenet_300_100", {"num_classes": 1}, "got 1"),
        ("lenet_300_100", {"seed": -1}, "got -1"),
        ("lenet_300_100", {"weight_decay": -0.1}, "got -0.1"),
    ],
)
def test_bad_arguments_say_what_was_received(arch, kwargs, received):
    args = {"input_shape": (28, 28, 1), "num_classes": 10, **kwargs}
    with pytest.raises(ValueError, match=received):
        build_model(
            arch,
            args.pop("input_shape"),
            args.pop("num_classes"),
            **args,
        )


@pytest.mark.parametrize("arch", ["lenet_300_100", "conv2", "resnet20"])
def test_lth_tf_wrap_and_strip_round_trip(small_models, arch):
    model = small_models[arch]
    pruned = sparsity.wrap(model)  # lth_tf's wrapper (MaskedLayer), as every run uses
    wrapped = [
        layer.layer.name for layer in pruned.layers if isinstance(layer, sparsity.MaskedLayer)
    ]
    prunable = [
        layer.name
        for layer in model.layers
        if isinstance(layer, keras.layers.Conv2D | keras.layers.Dense)
    ]
    assert wrapped == prunable
    x = np.ones((2, *SMALL_SHAPES[arch]), "float32")
    # All-ones masks: the wrapped model is the model.
    np.testing.assert_allclose(pruned(x).numpy(), model(x).numpy(), rtol=1e-5, atol=1e-5)

    stripped = sparsity.strip(pruned)
    assert [layer.name for layer in stripped.layers] == [layer.name for layer in model.layers]
    assert [type(layer) for layer in stripped.layers] == [type(layer) for layer in model.layers]
    for a, b in zip(model.weights, stripped.weights, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    np.testing.assert_allclose(stripped(x).numpy(), model(x).numpy(), rtol=1e-5, atol=1e-5)


def test_architectures_are_one_table_of_records_with_a_recipe_each(small_models):
    from lth_tf import presets
    from lth_tf.models import REGISTRY

    # One record per --arch, in ARCHITECTURES' order, each with its recipe.
    assert tuple(REGISTRY) == ARCHITECTURES
    assert set(REGISTRY) == set(presets.RECIPES)
    for name, spec in REGISTRY.items():
        assert spec.name == name and small_models[name].name == name
        # The record's input needs hold: a model takes its minimum size, not one less.
        if spec.images and spec.min_image_size > 1:
            size = spec.min_image_size
            build_model(name, (size, size, 3), NUM_CLASSES)
            with pytest.raises(ValueError, match=f"at least {size}x{size}"):
                build_model(name, (size - 1, size - 1, 3), NUM_CLASSES)
    assert {n: s.min_image_size for n, s in REGISTRY.items() if s.min_image_size > 1} == {
        "conv2": 2,
        "conv4": 4,
        "conv6": 8,
        "vgg16": 16,
        "vgg19": 16,
    }
    assert [n for n, s in REGISTRY.items() if not s.images] == ["lenet_300_100"]
