"""Contracts of per-layer-type prune rates: conv, dense and output layers, and the
2019 paper's Conv-2/4/6 protocol (layer-wise; conv 10% or 15%, dense 20%, output 10%)."""

import numpy as np
import pytest

from lth_tf import config as config_lib
from lth_tf import masks, models, sparsity
from lth_tf.keras import keras

CONV2_KINDS = {
    "conv1": masks.CONV,
    "conv2": masks.CONV,
    "fc1": masks.DENSE,
    "fc2": masks.DENSE,
    "output": masks.OUTPUT,
}


def _wrapped(arch, shape=(8, 8, 3), config=None):
    model = models.build_model(arch, shape, 10, seed=0)
    return sparsity.wrap(model, output_rate=config.output_rate if config else 1.0)


def _kernels(model):
    return {n: w.layer.kernel.numpy() for n, w in sparsity.wrappers(model).items()}


def _prune_rounds(kernels, config, rates, rounds, fraction=None):
    """Masks after `rounds` rounds, each pruning the kernels (fixed, as if retrained)."""
    current = masks.ones_like(kernels)
    for _ in range(rounds):
        new = masks.prune(
            kernels, current, fraction or config.prune_fraction, config.prune_scope, rates
        )
        masks.check_subset(new, current)
        current = new
    return current


def _layer_density(m):
    return float(m.sum() / m.size)


def test_layer_kinds_come_from_the_layer_class():
    model = _wrapped("conv2")
    assert sparsity.layer_kinds(model) == CONV2_KINDS


def test_layer_kinds_do_not_read_layer_names():
    # A Dense named like a conv and a Conv2D named like a dense layer.
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, name="fc_looking")(inputs)
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dense(5, name="conv_looking")(x)
    x = keras.layers.Dense(3, name="output")(x)
    model = sparsity.wrap(keras.Model(inputs, x))
    assert sparsity.layer_kinds(model) == {
        "fc_looking": masks.CONV,
        "conv_looking": masks.DENSE,
        "output": masks.OUTPUT,
    }


def test_layer_rates_map_kinds_to_rates():
    rates = masks.layer_rates(CONV2_KINDS, conv_rate=0.5, output_rate=0.25)
    assert rates == {"conv1": 0.5, "conv2": 0.5, "fc1": 1.0, "fc2": 1.0, "output": 0.25}
    assert set(masks.layer_rates(CONV2_KINDS).values()) == {1.0}
    with pytest.raises(ValueError, match="Unknown layer kinds.*'pool'"):
        masks.layer_rates({"p": "pool"})
    with pytest.raises(ValueError, match="conv_rate must be a multiplier >= 0"):
        masks.layer_rates(CONV2_KINDS, conv_rate=-1)


@pytest.mark.parametrize("arch", ["conv2", "conv4", "conv6"])
def test_conv_presets_give_the_2019_rates(arch):
    config = config_lib.make_config(arch)
    rates = sparsity.layer_rates(_wrapped(arch, config=config), config)
    conv = {"conv2": 0.5, "conv4": 0.5, "conv6": 0.75}[arch]
    for name, rate in rates.items():
        expected = 0.5 if name == "output" else 1.0 if name.startswith("fc") else conv
        assert rate == expected, name
    # Per round: conv 10% (Conv-6: 15%), dense 20%, output 10%.
    assert {round(r * config.prune_fraction, 6) for r in rates.values()} == {
        round(conv * 0.2, 6),
        0.2,
        0.1,
    }


@pytest.mark.parametrize("rounds", [1, 3, 6])
def test_conv2_layer_densities_after_r_rounds_follow_the_paper(rounds):
    config = config_lib.make_config("conv2")
    model = _wrapped("conv2", config=config)
    rates = sparsity.layer_rates(model, config)
    final = _prune_rounds(_kernels(model), config, rates, rounds)
    expected = {masks.CONV: 0.9**rounds, masks.DENSE: 0.8**rounds, masks.OUTPUT: 0.9**rounds}
    for name, kind in CONV2_KINDS.items():
        size = final[name].size
        # Each round rounds its count to a whole weight: at most 0.5 weights off per round.
        assert _layer_density(final[name]) == pytest.approx(
            expected[kind], abs=0.5 * rounds / size + 1e-12
        ), name


def test_conv6_prunes_its_conv_layers_at_15_percent():
    config = config_lib.make_config("conv6")
    model = _wrapped("conv6", shape=(8, 8, 3), config=config)
    final = _prune_rounds(_kernels(model), config, sparsity.layer_rates(model, config), 4)
    for name in ("conv1", "conv4", "conv6"):
        size = final[name].size
        assert _layer_density(final[name]) == pytest.approx(0.85**4, abs=2 / size), name
    assert _layer_density(final["fc1"]) == pytest.approx(0.8**4, abs=2 / final["fc1"].size)


def test_global_scope_shares_one_threshold_over_rate_1_layers_only():
    # conv_rate 0.5 with global scope: the dense hidden layers (rate 1) share one
    # threshold; conv layers and the output prune layer-wise at their rate.
    config = config_lib.make_config("conv2", prune_scope="global")
    model = _wrapped("conv2", config=config)
    kernels = _kernels(model)
    # Scale fc2 down so that one shared threshold takes much more from it than fc1.
    kernels["fc2"] = kernels["fc2"] * 0.01
    rates = sparsity.layer_rates(model, config)
    new = masks.prune(kernels, masks.ones_like(kernels), 0.2, "global", rates)
    for name in ("conv1", "conv2", "output"):
        assert _layer_density(new[name]) == pytest.approx(0.9, abs=1 / new[name].size), name
    pool = ("fc1", "fc2")
    survivors = np.concatenate([np.abs(kernels[n][new[n] == 1]) for n in pool])
    pruned = np.concatenate([np.abs(kernels[n][new[n] == 0]) for n in pool])
    assert survivors.min() >= pruned.max()
    total = sum(kernels[n].size for n in pool)
    assert pruned.size == round(0.2 * total)
    # Not 20% each: the shared threshold takes most of its cut from the small fc2.
    assert _layer_density(new["fc2"]) < 0.5 < 0.9 < _layer_density(new["fc1"])


def _conv2_experiment(**overrides):
    from lth_tf import rounds as rounds_lib

    config = config_lib.make_config(
        "conv2",
        dataset="synthetic:8x8x3:4",
        batch_size=32,
        training_steps="40it",
        eval_every="20it",
        validation_holdout=48,
        verbose=0,
        **overrides,
    )
    return rounds_lib.Experiment(config, "/nonexistent/never/written", write=False)


@pytest.mark.parametrize("scope", ["global", "layerwise"])
def test_a_target_density_is_reached_overall_with_imps_layer_densities(scope):
    # --target_density with rates other than 1: round r of R is IMP at --prune_fraction
    # after r * n / R rounds, n its rounds to the target overall density.
    e = _conv2_experiment(target_density=0.3, rounds=3, prune_scope=scope)
    kernels = _kernels(e.model)
    sizes = e.kernel_sizes()
    n = masks.matched_rounds(sizes, 0.3, 0.2, scope, e.rates)
    assert [e.matched_rounds(r) for r in (1, 2, 3)] == pytest.approx([n / 3, 2 * n / 3, n])
    current = masks.ones_like(kernels)
    for r in (1, 2, 3):
        new = masks.prune_to_rounds(kernels, current, e.matched_rounds(r), 0.2, scope, e.rates)
        masks.check_subset(new, current)
        current = new
    assert masks.density(current) == pytest.approx(0.3, abs=2 / sum(sizes.values()))
    # Each layer where IMP at 20% per round has it: conv and output (1 - 0.1)^n, fc 0.8^n.
    for name in ("conv1", "conv2", "output"):
        assert _layer_density(current[name]) == pytest.approx(0.9**n, abs=3 / sizes[name]), name
    fc = ("fc1", "fc2")
    alive = sum(current[f].sum() for f in fc) / sum(sizes[f] for f in fc)
    assert alive == pytest.approx(0.8**n, abs=1e-3)


def test_a_target_density_with_every_rate_1_keeps_one_fraction_per_round():
    # Every rate 1: the per-round fraction of before (masks bit for bit as before).
    e = _conv2_experiment(target_density=0.3, rounds=2, conv_rate=1.0, output_rate=1.0)
    assert e.matched_rounds(1) is None


CONV2_CIFAR_SIZES = {
    "conv1": 3 * 3 * 3 * 64,
    "conv2": 3 * 3 * 64 * 64,
    "fc1": 16 * 16 * 64 * 256,
    "fc2": 256 * 256,
    "output": 256 * 10,
}


def test_conv2_one_shot_at_imp_round_10_density_has_round_10s_layer_densities():
    """One-shot matched to IMP on Conv-2's CIFAR-10 layers (the 2019 protocol: conv 10%,
    fc 20%, output 10% per round): at IMP round 10's overall density (10.97%), every
    layer within one weight of IMP round 10 (conv 34.9%, fc 10.7%, output 34.9%), not
    the 55.4% / 10.7% / 55.4% of one round at 1 - 10.74% times each rate."""
    config = config_lib.make_config("conv2")
    model = _wrapped("conv2", shape=(32, 32, 3), config=config)
    rates = sparsity.layer_rates(model, config)
    kernels = _kernels(model)
    assert {n: k.size for n, k in kernels.items()} == CONV2_CIFAR_SIZES
    imp = _prune_rounds(kernels, config, rates, 10)
    d10 = masks.density(imp)
    assert d10 == pytest.approx(0.1097, abs=5e-5)
    oneshot = masks.prune_to_density(
        kernels, masks.ones_like(kernels), d10, 0.2, "layerwise", rates
    )
    for name in kernels:
        assert abs(int(oneshot[name].sum()) - int(imp[name].sum())) <= 1, name
    assert _layer_density(oneshot["conv2"]) == pytest.approx(0.349, abs=5e-4)
    assert _layer_density(oneshot["fc1"]) == pytest.approx(0.107, abs=5e-4)
    assert _layer_density(oneshot["output"]) == pytest.approx(0.349, abs=5e-4)
    # Before: one round at 1 - 0.8^10 with the rates (rate 1 at 10.74%, the others not).
    naive = masks.prune(kernels, masks.ones_like(kernels), 1 - 0.8**10, "layerwise", rates)
    assert _layer_density(naive["conv2"]) == pytest.approx(0.554, abs=5e-4)


@pytest.mark.parametrize("arch", ["lenet_300_100", "resnet20", "vgg16"])
def test_existing_recipes_keep_their_rates(arch):
    # Before conv_rate: the output layer at output_rate, every other layer at 1. Same
    # rates, same masks for the same weights.
    config = config_lib.make_config(arch)
    shape = (28, 28, 1) if arch == "lenet_300_100" else (16, 16, 3)
    model = _wrapped(arch, shape=shape, config=config)
    rates = sparsity.layer_rates(model, config)
    old = {n: config.output_rate if n == models.OUTPUT_LAYER else 1.0 for n in rates}
    assert rates == old


def test_the_experiment_uses_the_layer_rates():
    experiment = _conv2_experiment()
    assert experiment.rates == {
        "conv1": 0.5,
        "conv2": 0.5,
        "fc1": 1.0,
        "fc2": 1.0,
        "output": 0.5,
    }
    # The holdout reaches the data: 2048 synthetic training images less 48.
    assert experiment.data.num_train == 2000
