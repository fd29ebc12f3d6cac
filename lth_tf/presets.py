"""Per-architecture training recipes: the authors' defaults (PAPER.md).

A preset fills every field of a run's config that the user did not set with a
flag. Values are plain data so that `config.json` records them verbatim.

Sources: LeNet-300-100 and Conv-2/4/6 follow Frankle & Carbin (ICLR 2019),
pruning rule included (layer-wise; LeNet fc 20%, output 10% per round);
ResNet-20/56, VGG-16/19 and ResNet-50 follow the authors' framework (open_lth)
as used in Frankle et al. 2019/2020. CIFAR-10 validation: Conv-2/4/6 hold out
5,000 training images as the 2019 paper did; the ResNet-20/56 and VGG-16/19
presets keep the authors' framework's convention, validating on the test set
with all 50,000 images in training (see validation_holdout below).
"""

import re
import types

# Fields every recipe defines, with what they mean:
#   dataset         default dataset name (see lth_tf.data)
#   batch_size      global batch size (split over replicas)
#   optimizer       'adam' or 'sgd'
#   lr              base learning rate for `batch_size`
#   momentum        SGD momentum (ignored by Adam)
#   weight_decay    coupled L2 weight decay (PyTorch SGD semantics)
#   warmup          linear warm-up length, a duration ('0', '5ep')
#   lr_drops        durations at which the learning rate is multiplied by lr_gamma
#   lr_gamma        the drop factor
#   training_steps  the schedule's length T, a duration
#   rewind_step     rewind point k the papers found to work for IMP
#   eval_every      evaluation period, a duration
#   output_rate     prune-rate multiplier for the output layer: 0 leaves it dense
#                   (open_lth for VGG, and for LeNet: flags/lenet300_mnist_open_lth.cfg),
#                   0.5 is the 2019 paper's half rate (LeNet, Conv-2/4/6), 1 prunes
#                   it like any other layer (ResNets)
#   augment         random flip and pad-and-crop (CIFAR) / random-resized-crop (ImageNet)
#   test_every_period  also evaluate the test set each period (test accuracy at
#                   the early-stopping iteration, as the 2019 paper reports it)
# Optional fields (RunConfig defaults otherwise):
#   conv_rate       prune-rate multiplier for conv kernels (default 1: like the dense
#                   hidden layers, which always prune at rate 1)
#   prune_scope     'global' (default: one threshold over the rate-1 layers, the
#                   others layer-wise at their rate) or 'layerwise'
#   validation_holdout  training images held out for validation (early stopping).
#                   Default 0: the dataset's convention. For CIFAR-10 that is the
#                   authors' framework's: all 50,000 images train and the test set
#                   doubles as validation, which the VGG and ResNet presets keep (their
#                   '160ep' and LR drops then fall on the papers' iterations). The
#                   Conv-2/4/6 presets hold 5,000 training images out, as the 2019
#                   paper did (45,000 train: an epoch is 45,000 / batch steps).
#                   MNIST always holds out 5,000 (55,000 train).
_CIFAR_SGD = dict(
    dataset="cifar10",
    batch_size=128,
    optimizer="sgd",
    lr=0.1,
    momentum=0.9,
    weight_decay=1e-4,
    warmup="0",
    lr_drops=("80ep", "120ep"),
    lr_gamma=0.1,
    training_steps="160ep",
    eval_every="1ep",
    augment=True,
)

_CONV_ADAM = dict(
    dataset="cifar10",
    batch_size=60,
    optimizer="adam",
    momentum=0.0,
    weight_decay=0.0,
    warmup="0",
    lr_drops=(),
    lr_gamma=0.1,
    rewind_step="0",
    eval_every="500it",
    # The 2019 paper's Conv-2/4/6 protocol: layer-wise pruning per round of conv
    # kernels at 10% (Conv-6: 15%, below), dense hidden layers at 20% and the output
    # layer at 10%; Gaussian Glorot init (lth_tf.models.kernel_init); 5,000 training
    # images held out for validation.
    prune_fraction=0.2,
    prune_scope="layerwise",
    conv_rate=0.5,
    output_rate=0.5,
    validation_holdout=5000,
    augment=False,
    test_every_period=True,
)

RECIPES = types.MappingProxyType(
    {
        "lenet_300_100": dict(
            dataset="mnist",
            batch_size=60,
            optimizer="adam",
            lr=1.2e-3,
            momentum=0.0,
            weight_decay=0.0,
            warmup="0",
            lr_drops=(),
            lr_gamma=0.1,
            training_steps="50000it",
            rewind_step="0",
            eval_every="100it",
            # The 2019 paper's rule: layer-wise, hidden layers 20% and the output
            # layer 10% per round (its Figure 3 densities 51.3, 21.1, ... % of weights).
            prune_fraction=0.2,
            prune_scope="layerwise",
            output_rate=0.5,
            augment=False,
            test_every_period=True,
        ),
        "conv2": dict(_CONV_ADAM, lr=2e-4, training_steps="20000it"),
        "conv4": dict(_CONV_ADAM, lr=3e-4, training_steps="25000it"),
        "conv6": dict(_CONV_ADAM, lr=3e-4, training_steps="30000it", conv_rate=0.75),
        "vgg16": dict(_CIFAR_SGD, rewind_step="1000it", output_rate=0.0),
        "vgg19": dict(_CIFAR_SGD, rewind_step="1000it", output_rate=0.0),
        "resnet20": dict(_CIFAR_SGD, rewind_step="500it", output_rate=1.0),
        "resnet56": dict(_CIFAR_SGD, rewind_step="500it", output_rate=1.0),
        "resnet50": dict(
            dataset="imagenet2012",
            batch_size=1024,
            optimizer="sgd",
            lr=0.4,
            momentum=0.9,
            weight_decay=1e-4,
            warmup="5ep",
            lr_drops=("30ep", "60ep", "80ep"),
            lr_gamma=0.1,
            training_steps="90ep",
            rewind_step="5ep",
            eval_every="1ep",
            output_rate=1.0,
            augment=True,
        ),
    }
)


# A user's architecture, --arch=package.module:function (lth_tf.models.build_model).
CUSTOM_ARCH_RE = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*$")

# The recipe of a user's architecture: no paper has one, so every field the user
# leaves unset takes this generic value (the MNIST demo's schedule: Adam, 5 epochs
# per round, one global threshold over every masked layer, the output layer
# included at the same rate). Set at least --dataset; imp's first line says which
# values came from here.
CUSTOM_RECIPE = types.MappingProxyType(
    dict(
        dataset="mnist",
        batch_size=60,
        optimizer="adam",
        lr=1.2e-3,
        momentum=0.0,
        weight_decay=0.0,
        warmup="0",
        lr_drops=(),
        lr_gamma=0.1,
        training_steps="5ep",
        rewind_step="0",
        eval_every="1ep",
        output_rate=1.0,
        augment=False,
    )
)


def is_custom(arch: str) -> bool:
    """Whether `arch` names a user's builder ('package.module:function')."""
    return isinstance(arch, str) and bool(CUSTOM_ARCH_RE.match(arch))


def recipe(arch: str) -> dict:
    """Returns a copy of the training recipe of `arch` (`CUSTOM_RECIPE` for a user's).

    Raises:
      ValueError: for an unknown architecture, listing the known ones.
    """
    if is_custom(arch):
        return dict(CUSTOM_RECIPE)
    if arch not in RECIPES:
        raise ValueError(
            f"Unknown --arch={arch!r}. Known architectures: {', '.join(RECIPES)}; or your "
            "own builder as --arch=package.module:function."
        )
    return dict(RECIPES[arch])


# `python -m lth_tf.imp` with no flags at all runs this short demo on the bundled
# MNIST; any --arch (or a flagfile, which sets it) gets the paper's recipe instead.
MAIN_JOB = dict(
    arch="lenet_300_100",
    training_steps="5ep",
    eval_every="1ep",
    rounds=15,  # 0.8^15 = 3.5% density: where random reinitialisation falls behind
    controls=("random_reinit",),
    steps_per_execution=100,
    # The demo's rule (the authors' framework's): one global threshold, output layer
    # dense. The lenet_300_100 recipe itself follows the 2019 paper (layer-wise).
    prune_scope="global",
    output_rate=0.0,
)

# Image shapes known from a dataset's name alone (no file is read at flag time).
_MNIST_SHAPE = (28, 28, 1)
_NAMED_SHAPES = {
    "mnist": _MNIST_SHAPE,
    "tfds:mnist": _MNIST_SHAPE,
    "cifar10": (32, 32, 3),
    "imagenet2012": (224, 224, 3),
}


def _image_shape(dataset: str) -> tuple[int, ...] | None:
    """The image shape a dataset name implies, or None when only its files tell."""
    if dataset in _NAMED_SHAPES:
        return _NAMED_SHAPES[dataset]
    if dataset.startswith("synthetic:"):
        dims = tuple(int(d) for d in dataset.split(":")[1].lower().split("x"))
        return dims if len(dims) == 3 else (*dims, 1)
    return None  # npz:PATH (read later), plain 'synthetic' (the demo's: MNIST-shaped)


def check_arch_dataset(arch: str, dataset: str) -> None:
    """Refuses a built-in architecture on a built-in dataset its recipe is not made for.

    E.g. resnet50 (ImageNet's 224x224x3 images, lr 0.4 at batch 1024) on MNIST, or
    LeNet-300-100 on CIFAR-10: the recipe would run, on a network and schedule that
    do not fit the data. Pairs of the same image shape (mnist, tfds:mnist) pass, and
    so do a user's architecture ('package.module:function') and every dataset that
    is the user's choice of shape (synthetic, npz:PATH, tfds:NAME, a function).
    imp's --allow_any_dataset skips this check.

    Raises:
      ValueError: naming the pair, the architectures made for the dataset and
        --allow_any_dataset.
    """
    if is_custom(arch) or arch not in RECIPES or dataset not in _NAMED_SHAPES:
        return
    made_for = RECIPES[arch]["dataset"]
    if _NAMED_SHAPES[dataset] == _NAMED_SHAPES.get(made_for):
        return
    suited = [
        a for a, r in RECIPES.items() if _NAMED_SHAPES.get(r["dataset"]) == _NAMED_SHAPES[dataset]
    ]
    shape = "x".join(map(str, _NAMED_SHAPES[dataset]))
    raise ValueError(
        f"--arch={arch} --dataset={dataset}: {arch} and its recipe are made for {made_for}, "
        f"not for {dataset}'s {shape} images. Choose --dataset={made_for}, or an "
        f"architecture made for {dataset} (--arch={', '.join(suited)}); to train this pair "
        "anyway, add --allow_any_dataset."
    )


def check_demo_dataset(dataset: str | None) -> None:
    """Refuses the MNIST demo (no --arch) on a dataset that is not MNIST-shaped."""
    if dataset is None:
        return
    shape = _image_shape(dataset)
    if shape is None or shape == _MNIST_SHAPE:
        return
    suited = [a for a, r in RECIPES.items() if r["dataset"] == dataset]
    if len(suited) > 1:
        suggestion = f"--arch={', '.join(suited[:-1])} or {suited[-1]} (recipes made for {dataset})"
    elif suited:
        suggestion = f"--arch={suited[0]} (its recipe is made for {dataset})"
    else:
        suggestion = (
            "--arch=conv2/conv4/conv6/vgg16/resnet20/... for colour images, or "
            "--arch=lenet_300_100 for the paper's LeNet recipe"
        )
    raise ValueError(
        f"--dataset={dataset} without --arch: that would run the MNIST demo "
        f"(LeNet-300-100, 5 epochs per round) on {'x'.join(map(str, shape))} images, "
        f"not the {'x'.join(map(str, _MNIST_SHAPE))} MNIST images it is made for. "
        f"Choose the network: {suggestion}."
    )
