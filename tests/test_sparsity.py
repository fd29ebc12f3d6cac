"""Contracts of lth_tf.sparsity: fixed masks in tfmot wrappers, exactly-zero pruned weights."""

import numpy as np
import pytest

from lth_tf import sparsity
from lth_tf.keras import keras, tf, tfmot

PRUNED = ("conv", "fc", "output")
BATCH = 16
STEPS = 8


def _base_model(l2=0.0, seed=0):
    """A small functional model with one Conv2D and two Dense layers."""
    reg = (lambda: keras.regularizers.L2(l2)) if l2 else (lambda: None)
    init = iter(range(seed * 10, seed * 10 + 10))

    def k():
        return keras.initializers.GlorotNormal(seed=next(init))

    inputs = keras.Input((6, 6, 2), name="input")
    x = keras.layers.Conv2D(
        4, 3, name="conv", activation="relu", kernel_initializer=k(), kernel_regularizer=reg()
    )(inputs)
    x = keras.layers.Flatten(name="flatten")(x)
    x = keras.layers.Dense(
        8, name="fc", activation="relu", kernel_initializer=k(), kernel_regularizer=reg()
    )(x)
    # Non-zero biases, so that nothing relies on them starting at zero.
    outputs = keras.layers.Dense(
        3,
        name="output",
        kernel_initializer=k(),
        bias_initializer=keras.initializers.Constant(0.1),
        kernel_regularizer=reg(),
    )(x)
    return keras.Model(inputs, outputs)


def _data(n=STEPS * BATCH, seed=0):
    rng = np.random.default_rng(seed)
    return (
        rng.standard_normal((n, 6, 6, 2)).astype(np.float32),
        rng.integers(0, 3, n).astype(np.int64),
    )


def _random_masks(model, density=0.5, seed=0):
    rng = np.random.default_rng(seed)
    return {
        name: (rng.random(tuple(w.layer.kernel.shape)) < density).astype(np.float32)
        for name, w in sparsity.wrappers(model).items()
    }


def _raw_kernels(model):
    """The kernel variables themselves, not masked by anything."""
    return {name: w.layer.kernel.numpy() for name, w in sparsity.wrappers(model).items()}


def _compile(model, optimizer):
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )


class _CheckPrunedZero(keras.callbacks.Callback):
    """Asserts after every training batch that pruned kernel entries are exactly 0."""

    def __init__(self, masks):
        super().__init__()
        self.masks = masks
        self.checked = 0

    def on_train_batch_end(self, batch, logs=None):
        for name, kernel in _raw_kernels(self.model).items():
            pruned = kernel[self.masks[name] == 0]
            assert np.all(pruned == 0), f"{name}: pruned weights {pruned[pruned != 0][:5]}"
        self.checked += 1


class _PrunedNonZero(keras.callbacks.Callback):
    """Notes whether a pruned kernel entry was ever non-zero after a training batch."""

    def __init__(self, masks):
        super().__init__()
        self.masks = masks
        self.seen = False

    def on_train_batch_end(self, batch, logs=None):
        kernels = _raw_kernels(self.model)
        self.seen |= any(np.any(k[self.masks[n] == 0] != 0) for n, k in kernels.items())


def test_wrap_puts_conv_and_dense_layers_in_masked_layers_with_the_same_outputs():
    base = _base_model()
    model = sparsity.wrap(base)
    ws = sparsity.wrappers(model)
    assert sorted(ws) == sorted(PRUNED)
    assert all(type(w) is sparsity.MaskedLayer for w in ws.values())
    assert isinstance(ws["conv"].layer, keras.layers.Conv2D)
    assert isinstance(ws["fc"].layer, keras.layers.Dense)
    x, _ = _data(32)
    np.testing.assert_allclose(model(x), base(x), rtol=1e-6, atol=1e-6)


def test_wrap_leaves_the_output_layer_plain_when_its_rate_is_0():
    model = sparsity.wrap(_base_model(), output_rate=0)
    assert sorted(sparsity.wrappers(model)) == ["conv", "fc"]


def test_masked_model_computes_with_the_masked_kernels():
    base = _base_model()
    model = sparsity.wrap(base)
    m = _random_masks(model)
    sparsity.set_masks(model, m)
    for name in PRUNED:
        layer = base.get_layer(name)
        layer.kernel.assign(layer.kernel.numpy() * m[name])
    x, _ = _data(32)
    np.testing.assert_allclose(model(x), base(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("optimizer", "n_slots"),
    [
        (lambda: keras.optimizers.SGD(0.1, momentum=0.9), 1),
        (lambda: keras.optimizers.Adam(1e-2), 2),
    ],
    ids=["sgd_momentum", "adam"],
)
def test_pruned_kernel_entries_stay_exactly_zero_at_every_step_with_weight_decay(
    optimizer, n_slots
):
    model = sparsity.wrap(_base_model(l2=1e-2))
    assert len(model.losses) == 3  # the L2 terms survive wrapping
    m = _random_masks(model)
    sparsity.set_masks(model, m)
    before = _raw_kernels(model)
    _compile(model, optimizer())
    check = _CheckPrunedZero(m)
    x, y = _data()
    model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0, callbacks=[check])
    assert check.checked == STEPS
    after = _raw_kernels(model)
    for name in PRUNED:
        assert np.all(after[name][m[name] == 0] == 0), name
        # Survivors did train.
        assert not np.allclose(after[name][m[name] == 1], before[name][m[name] == 1]), name
    # The optimizer state (momentum, Adam moments) of pruned weights never builds up either.
    for name, wrapper in sparsity.wrappers(model).items():
        kernel = wrapper.layer.kernel
        slots = [v for v in model.optimizer.variables() if v.name.endswith("/" + kernel.name)]
        assert len(slots) == n_slots, [v.name for v in model.optimizer.variables()]
        for slot in slots:
            values = slot.numpy()
            assert np.all(values[m[name] == 0] == 0), slot.name
            assert np.any(values[m[name] == 1] != 0), slot.name


@pytest.mark.parametrize(
    "settings",
    [dict(momentum=0.0), dict(momentum=0.9), dict(momentum=0.9, nesterov=True)],
    ids=["plain", "momentum", "nesterov"],
)
def test_masked_sgd_trains_bit_for_bit_as_masked_gradients_do(settings):
    # MaskedSGD moves the mask's product from the gradient into its update; the
    # arithmetic, and so every bit of the weights and slots, stays the same.
    x, y = _data()
    trained = {}
    for optimizer_class in (keras.optimizers.SGD, sparsity.MaskedSGD):
        model = sparsity.wrap(_base_model(l2=1e-2))
        m = _random_masks(model)
        sparsity.set_masks(model, m)
        optimizer = optimizer_class(0.05, **settings)
        _compile(model, optimizer)
        if optimizer_class is sparsity.MaskedSGD:
            optimizer.take_masks(model)
            assert all(w.masked_by_optimizer for w in sparsity.wrappers(model).values())
        else:
            assert not any(w.masked_by_optimizer for w in sparsity.wrappers(model).values())
        check = _CheckPrunedZero(m)
        model.fit(x, y, batch_size=BATCH, epochs=2, shuffle=False, verbose=0, callbacks=[check])
        assert check.checked == 2 * STEPS
        trained[optimizer_class] = [v.numpy() for v in model.variables + optimizer.variables()]
    for a, b in zip(*trained.values(), strict=True):
        np.testing.assert_array_equal(a, b)


def test_the_sgd_of_compile_model_takes_the_masks(tiny_config):
    from lth_tf import train

    model = sparsity.wrap(_base_model())
    sgd = tiny_config(optimizer="sgd", momentum=0.9)
    schedule = train.resolve(sgd, steps_per_epoch=10)
    train.compile_model(model, sgd, schedule)
    assert isinstance(model.optimizer, sparsity.MaskedSGD)
    assert all(w.masked_by_optimizer for w in sparsity.wrappers(model).values())
    adam_model = sparsity.wrap(_base_model())
    train.compile_model(adam_model, tiny_config(optimizer="adam"), schedule)
    # Adam keeps the masked gradient of the wrappers.
    assert not any(w.masked_by_optimizer for w in sparsity.wrappers(adam_model).values())


def test_a_model_recompiled_from_sgd_to_adam_keeps_its_pruned_weights_zero(tiny_config):
    from lth_tf import train

    x, y = _data()
    model = sparsity.wrap(_base_model())
    m = _random_masks(model)
    sparsity.set_masks(model, m)
    schedule = train.resolve(tiny_config(optimizer="sgd"), steps_per_epoch=STEPS)
    train.compile_model(model, tiny_config(optimizer="sgd"), schedule)
    train.compile_model(model, tiny_config(optimizer="adam"), schedule)
    assert not any(w.masked_by_optimizer for w in sparsity.wrappers(model).values())
    check = _CheckPrunedZero(m)
    model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0, callbacks=[check])
    assert check.checked == STEPS


def test_survivors_match_tfmot_stock_prune_low_magnitude_with_plain_sgd():
    base = _base_model()
    ours = sparsity.wrap(base)
    stock = sparsity.wrap(base, wrapper=sparsity._PruneLowMagnitude)
    assert all(type(w) is sparsity._PruneLowMagnitude for w in sparsity.wrappers(stock).values())
    m = _random_masks(ours)
    sparsity.set_masks(ours, m)
    sparsity.set_masks(stock, m)
    _compile(ours, keras.optimizers.SGD(0.05))
    _compile(stock, keras.optimizers.SGD(0.05))
    x, y = _data()
    kwargs = dict(batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
    ours.fit(x, y, callbacks=[_CheckPrunedZero(m)], **kwargs)
    leaks = _PrunedNonZero(m)
    stock.fit(x, y, callbacks=[tfmot.sparsity.keras.UpdatePruningStep(), leaks], **kwargs)
    # The stock wrapper lets the optimizer move pruned weights between steps (it
    # re-masks them before the next forward pass); ours never does.
    assert leaks.seen
    a, b = sparsity.get_weights(ours), sparsity.get_weights(stock)
    assert sorted(a) == sorted(b)
    for key in a:
        np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-6, err_msg=key)
    # Training moved the weights away from the start.
    start = sparsity.get_weights(sparsity.wrap(base))
    assert not np.allclose(a["fc/kernel"], start["fc/kernel"] * m["fc"])


def test_get_weights_returns_masked_values_and_get_masks_the_masks():
    model = sparsity.wrap(_base_model())
    m = _random_masks(model)
    sparsity.set_masks(model, m)
    # Write non-zero values into pruned positions behind the wrapper's back.
    for w in sparsity.wrappers(model).values():
        w.layer.kernel.assign(tf.ones_like(w.layer.kernel) * 3.0)
    weights = sparsity.get_weights(model)
    assert set(weights) == {f"{n}/{v}" for n in PRUNED for v in ("kernel", "bias")}
    for name in PRUNED:
        np.testing.assert_array_equal(weights[f"{name}/kernel"], 3.0 * m[name])
    np.testing.assert_array_equal(weights["output/bias"], np.full(3, 0.1, np.float32))
    got = sparsity.get_masks(model)
    assert all(np.array_equal(got[n], m[n]) for n in PRUNED)


def test_set_masks_zeroes_the_pruned_kernel_entries():
    model = sparsity.wrap(_base_model())
    m = _random_masks(model)
    sparsity.set_masks(model, m)
    for name, kernel in _raw_kernels(model).items():
        assert np.all(kernel[m[name] == 0] == 0), name
        assert np.all(kernel[m[name] == 1] != 0), name


def test_strip_gives_a_plain_model_with_identical_outputs():
    model = sparsity.wrap(_base_model())
    m = _random_masks(model)
    sparsity.set_masks(model, m)
    _compile(model, keras.optimizers.Adam(1e-2))
    x, y = _data()
    model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
    stripped = sparsity.strip(model)
    assert not any(isinstance(layer, sparsity._PruneLowMagnitude) for layer in stripped.layers)
    assert {"conv", "fc", "output"} <= {layer.name for layer in stripped.layers}
    np.testing.assert_allclose(stripped(x), model(x), rtol=1e-6, atol=1e-6)
    for name in PRUNED:
        kernel = stripped.get_layer(name).kernel.numpy()
        assert np.all(kernel[m[name] == 0] == 0), name


def test_set_masks_with_wrong_layer_names_is_a_clear_value_error():
    model = sparsity.wrap(_base_model())
    m = _random_masks(model)
    with pytest.raises(ValueError, match=r"Masks are for layers .*prunable layers are"):
        sparsity.set_masks(model, {**m, "nope": np.ones((2, 2), np.float32)})
    missing = dict(m)
    del missing["fc"]
    with pytest.raises(ValueError, match="fc"):
        sparsity.set_masks(model, missing)


def test_set_masks_with_a_wrong_shape_is_a_clear_value_error_that_changes_nothing():
    model = sparsity.wrap(_base_model())
    m = _random_masks(model)
    before = sparsity.get_weights(model)
    bad = {**m, "fc": np.ones((3, 3), np.float32)}
    with pytest.raises(ValueError, match=r"Mask for fc has shape \(3, 3\).*needs"):
        sparsity.set_masks(model, bad)
    after = sparsity.get_weights(model)
    assert all(np.array_equal(before[k], after[k]) for k in before)


def test_set_weights_rejects_wrong_keys_and_shapes():
    model = sparsity.wrap(_base_model())
    weights = sparsity.get_weights(model)
    with pytest.raises(ValueError, match="missing"):
        sparsity.set_weights(model, {k: v for k, v in weights.items() if k != "fc/bias"})
    # A wrong shape anywhere assigns nothing, not the values before it.
    changed = {k: v + 1 for k, v in weights.items()}
    with pytest.raises(ValueError, match="fc/bias"):
        sparsity.set_weights(model, {**changed, "fc/bias": np.zeros(7, np.float32)})
    after = sparsity.get_weights(model)
    assert all(np.array_equal(weights[k], after[k]) for k in weights)


def test_masked_sgd_masks_an_indexed_slices_gradient_of_a_masked_kernel():
    # A masked kernel's gradient may come as IndexedSlices (e.g. from tf.gather of its
    # rows); MaskedSGD must take its masked dense update, not Keras' unmasked sparse one.
    rows = tf.constant([0, 5, 9], tf.int64)
    updated = {}
    for kind in ("sparse", "dense"):
        model = sparsity.wrap(_base_model())
        m = _random_masks(model)
        sparsity.set_masks(model, m)
        optimizer = sparsity.MaskedSGD(0.05, momentum=0.9)
        optimizer.take_masks(model)
        kernel = sparsity.wrappers(model)["fc"].layer.kernel
        values = tf.ones((3, kernel.shape[1]), kernel.dtype)
        gradient = tf.IndexedSlices(values, rows, tf.constant(kernel.shape, tf.int64))
        if kind == "dense":
            gradient = tf.convert_to_tensor(gradient)
        for _ in range(2):  # the second step also reads the momentum of the first
            optimizer.apply_gradients([(gradient, kernel)])
        after = kernel.numpy()
        assert np.all(after[m["fc"] == 0] == 0), kind  # pruned weights stay exactly zero
        updated[kind] = after
    np.testing.assert_array_equal(updated["sparse"], updated["dense"])
