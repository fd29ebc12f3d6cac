"""tfmot glue: wrap prunable layers, hold fixed masks, read and write them.

The masks live in tfmot `PruneLowMagnitude` wrappers (`mask` variables), but
lth_tf computes them (global magnitude, random, ...) and assigns them; tfmot's
own schedule never changes them.

`MaskedLayer` is a `PruneLowMagnitude` that replaces the stock forward pass.
The stock wrapper assigns `kernel := kernel * mask` at the start of every
step, updates a step counter and evaluates its schedule: the assign lets the
optimizer update pruned weights between steps (momentum and Adam state build up
for them, checkpoints are not sparse) and the bookkeeping costs time on every
step. `MaskedLayer` instead keeps the invariant "the kernel is zero wherever the
mask is zero" (established by `set_masks` and `set_weights` here) and multiplies
the kernel's *gradient* by the mask: every pruned weight gets exactly zero
gradient, so it stays exactly zero through every optimizer step (SGD, momentum,
Adam, coupled L2 and decoupled weight decay) and its optimizer slots stay zero,
with no callback and no per-step assign. With SGD (`MaskedSGD.take_masks`) the
optimizer's update does that product instead, folded into the update's own
product with the learning rate, so the masked step costs what the dense one
does. Stripping works as for any tfmot model
(`tfmot.sparsity.keras.strip_pruning`). Writing kernels behind lth_tf's back
(Keras' `model.set_weights`) must be followed by `apply_masks`.
"""

import contextlib

import numpy as np
from tensorflow_model_optimization.python.core.sparsity.keras import (
    prune_registry,
    pruning_wrapper,
)

from lth_tf import masks as masks_lib
from lth_tf.keras import keras, tf, tfmot

# tfmot's public API exports the wrapping function, not the wrapper class that
# strip_pruning and our subclass need.
_PruneLowMagnitude = pruning_wrapper.PruneLowMagnitude
# The layers lth_tf masks: Dense and the convolutions, each through the one weight
# tfmot's PruneRegistry names for its class (`prunable_weight`).
PRUNABLE_TYPES = (keras.layers.Dense, keras.layers.Conv1D.__mro__[1])  # Conv: every convolution
_CONV = keras.layers.Conv1D.__mro__[1]
_NORMALIZATIONS = (keras.layers.BatchNormalization, keras.layers.LayerNormalization)
# The name of a built-in model's logits layer (lth_tf.models.OUTPUT_LAYER).
OUTPUT_LAYER = "output"


def prunable_weight(layer) -> str | None:
    """The attribute of the one weight lth_tf masks in `layer`, or None: not masked.

    Dense, Conv1D/2D/3D and Conv2D/3DTranspose mask their 'kernel', SeparableConv1D/2D
    their 'pointwise_kernel': the weight tfmot's PruneRegistry names for the layer's
    class. Layers the registry gives no weight (DepthwiseConv2D) or several
    (MultiHeadAttention), other registry layers (Embedding, LocallyConnected) and
    layers it does not know stay dense (`unmasked_layers` lists them). lth_tf's weight
    keys call the masked weight 'kernel' whatever its attribute ('sep/kernel' is a
    SeparableConv2D's pointwise kernel), so masks and checkpoints use one key per layer.
    """
    names = prune_registry.PruneRegistry._LAYERS_WEIGHTS_MAP.get(type(layer), ())
    if len(names) != 1 or not isinstance(layer, PRUNABLE_TYPES):
        return None
    return names[0]


def output_layer(model) -> str | None:
    """The name of `model`'s output layer, the one `output_rate` applies to.

    A layer named 'output' (every built-in model's logits layer), else the last
    maskable layer in the model's layer order (a user's model's last Dense or
    convolution); None when the model has no maskable layer.
    """
    inner = [_inner(layer) for layer in model.layers]
    if any(layer.name == OUTPUT_LAYER for layer in inner):
        return OUTPUT_LAYER
    names = [layer.name for layer in inner if prunable_weight(layer) is not None]
    return names[-1] if names else None


def unmasked_layers(model) -> dict:
    """{layer name: class name} of `model`'s layers with weights that get no mask.

    Layers `prunable_weight` cannot mask (e.g. DepthwiseConv2D, Embedding, a user's
    own layer) train dense in every round; normalisation layers and the output layer
    left dense by output_rate=0 are not listed.
    """
    out = {}
    for layer in model.layers:
        if isinstance(layer, (_PruneLowMagnitude, *_NORMALIZATIONS)):
            continue
        if layer.weights and prunable_weight(layer) is None:
            out[layer.name] = type(layer).__name__
    return out


class FixedMask(tfmot.sparsity.keras.PruningSchedule):
    """A tfmot pruning schedule that never prunes: the masks are assigned by lth_tf."""

    def __call__(self, step):
        return tf.constant(False), tf.constant(0.0, dtype=tf.float32)

    def get_config(self):
        return {"class_name": "FixedMask", "config": {}}


class MaskedLayer(_PruneLowMagnitude):
    """A tfmot pruning wrapper whose mask is fixed and applied functionally."""

    def __init__(self, layer, **kwargs):
        kwargs.pop("pruning_schedule", None)
        super().__init__(layer, pruning_schedule=FixedMask(), **kwargs)
        # Set by MaskedSGD.take_masks: its update multiplies the gradient by the mask,
        # so the train step needs no product of its own here.
        self.masked_by_optimizer = False

    def build(self, input_shape):
        super().build(input_shape)
        self._weight_attr = prunable_weight(self.layer)
        if (
            self._weight_attr is None
            or len(self.pruning_vars) != 1
            or self.pruning_vars[0][0] is not getattr(self.layer, self._weight_attr)
        ):
            raise TypeError(
                f"MaskedLayer supports layers with one prunable kernel, got {self.layer}."
            )

    def call(self, inputs, training=None, **kwargs):
        weight, mask, _ = self.pruning_vars[0]
        dtype = self.layer.compute_dtype
        if self.masked_by_optimizer:
            with _swapped_kernel(self.layer, tf.cast(weight, dtype), self._weight_attr):
                return self.layer.call(inputs, **kwargs)
        mask = tf.cast(mask, dtype)

        # The kernel is already zero wherever the mask is (set_masks and set_weights
        # establish it; masked gradients keep it), so the forward pass uses it as it
        # is and only the gradient is masked: one elementwise product per step
        # instead of two, which matters for small layers (LeNet-300-100).
        @tf.custom_gradient
        def masked_gradient(kernel):
            def grad(dy):
                return dy * mask

            return tf.identity(kernel), grad

        with _swapped_kernel(
            self.layer, masked_gradient(tf.cast(weight, dtype)), self._weight_attr
        ):
            return self.layer.call(inputs, **kwargs)

    def get_config(self):
        config = super().get_config()
        config.pop("pruning_schedule", None)
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config.pop("pruning_schedule", None)
        return cls(keras.layers.deserialize(config.pop("layer")), **config)


class MaskedSGD(keras.optimizers.SGD):
    """Keras SGD whose update multiplies each masked kernel's gradient by its mask.

    The same arithmetic as MaskedLayer's masked gradient followed by SGD, bit for
    bit: the update's first product, `-gradient * lr`, becomes
    `(gradient * mask) * -lr`, so a masked kernel costs its update no more passes
    over memory than a dense one (the gradient's separate product with the mask
    was about 5% of a LeNet-300-100 step on a CPU). `take_masks(model)` hands the
    masks of a model's MaskedLayer wrappers to the optimizer and turns their own
    gradient product off; other variables get Keras' update.
    """

    def take_masks(self, model) -> None:
        """Masks the updates of `model`'s MaskedLayer kernels; call before training."""
        table = {}
        for wrapper in wrappers(model).values():
            if isinstance(wrapper, MaskedLayer):
                weight, mask, _ = wrapper.pruning_vars[0]
                table[self._var_key(weight)] = mask
                wrapper.masked_by_optimizer = True
        # A plain dict behind a function: not tracked, so checkpoints are unchanged.
        self._mask_of = table.get

    def update_step(self, gradient, variable):
        mask_of = getattr(self, "_mask_of", None)
        mask = mask_of(self._var_key(variable)) if mask_of else None
        if mask is None:
            return super().update_step(gradient, variable)
        # The wrapper no longer masks this gradient: never take Keras' sparse path.
        gradient = tf.convert_to_tensor(gradient)
        lr = tf.cast(self.learning_rate, variable.dtype)
        momentum = tf.cast(self.momentum, variable.dtype)
        m = self.momentums[self._index_dict[self._var_key(variable)]]
        step = gradient * tf.cast(mask, variable.dtype) * -lr  # Keras: -gradient * lr
        m.assign(step + m * momentum)
        if self.nesterov:
            variable.assign_add(step + m * momentum)
        else:
            variable.assign_add(m)


@contextlib.contextmanager
def _swapped_kernel(layer, tensor, attr="kernel"):
    # The inner layer's call reads `self.kernel` (`self.pointwise_kernel`...); point it
    # at the masked tensor for the duration of the call. object.__setattr__ keeps
    # Keras' attribute tracking (which would try to track a tensor) out of it.
    original = layer.__dict__[attr]
    object.__setattr__(layer, attr, tensor)
    try:
        yield
    finally:
        object.__setattr__(layer, attr, original)


def is_prunable(layer, output_rate: float = 1.0, output_name: str = OUTPUT_LAYER) -> bool:
    """Maskable layers (`prunable_weight`) are prunable; the output layer only if its rate is > 0."""
    if prunable_weight(layer) is None:
        return False
    return not (layer.name == output_name and output_rate == 0)


def wrap(model, output_rate: float = 1.0, wrapper=MaskedLayer):
    """Returns a copy of functional `model` with its prunable layers wrapped.

    The copy gets the model's current weights. `wrapper` may be tfmot's stock
    `PruneLowMagnitude` (for comparisons); the default is `MaskedLayer`. The
    output layer (`output_layer`) is left dense when `output_rate` is 0.
    """
    output_name = output_layer(model)

    def clone(layer):
        config = layer.get_config()
        new = layer.__class__.from_config(config)
        if is_prunable(layer, output_rate, output_name):
            # The wrapper takes the inner layer's dtype policy: a float32 output layer
            # under a mixed-precision policy must not be wrapped in a bfloat16 wrapper.
            kwargs = dict(dtype=new.dtype_policy)
            if wrapper is _PruneLowMagnitude:
                return wrapper(new, pruning_schedule=FixedMask(), **kwargs)
            return wrapper(new, **kwargs)
        return new

    wrapped = keras.models.clone_model(model, clone_function=clone)
    set_weights(wrapped, get_weights(model))
    return wrapped


def release_masks(model) -> None:
    """Gives the masks MaskedSGD.take_masks took back to `model`'s wrappers.

    Call before compiling a model that trained under MaskedSGD with another
    optimizer (lth_tf.train.compile_model does): the wrappers mask their kernels'
    gradients themselves again.
    """
    for wrapper in wrappers(model).values():
        if isinstance(wrapper, MaskedLayer):
            wrapper.masked_by_optimizer = False


def wrappers(model) -> dict:
    """{inner layer name: wrapper} for every pruning wrapper of `model`."""
    return {
        layer.layer.name: layer for layer in model.layers if isinstance(layer, _PruneLowMagnitude)
    }


def layer_kinds(model, output_name: str | None = None) -> dict:
    """{inner layer name: kind} of every wrapped (prunable) layer of `model`.

    The kind comes from the layer's class, not its name: a convolution's kernel is
    `masks.CONV`, a Dense one `masks.DENSE`, and the output layer `output_name`
    (default: `output_layer(model)`) is `masks.OUTPUT`.

    Raises:
      TypeError: for a wrapped layer that is neither a convolution nor Dense.
    """
    if output_name is None:
        output_name = output_layer(model)
    kinds = {}
    for name, wrapper in wrappers(model).items():
        layer = wrapper.layer
        if name == output_name:
            kinds[name] = masks_lib.OUTPUT
        elif isinstance(layer, _CONV):
            kinds[name] = masks_lib.CONV
        elif isinstance(layer, keras.layers.Dense):
            kinds[name] = masks_lib.DENSE
        else:
            raise TypeError(
                f"Layer {name!r} is a {type(layer).__name__}; lth_tf prunes only convolution "
                "and Dense kernels."
            )
    return kinds


def layer_rates(model, config) -> dict:
    """{layer name: prune-rate multiplier} of `model`'s wrapped layers under `config`.

    Conv2D kernels prune at `config.conv_rate`, dense hidden layers at 1 and the
    output layer at `config.output_rate` (see lth_tf.masks for what a rate means in
    each prune scope).
    """
    return masks_lib.layer_rates(
        layer_kinds(model), conv_rate=config.conv_rate, output_rate=config.output_rate
    )


def _inner(layer):
    return layer.layer if isinstance(layer, _PruneLowMagnitude) else layer


def _weight_key(layer, weight) -> str:
    # 'conv1/kernel:0' or 'prune_low_magnitude_conv1/conv1/kernel:0' -> 'conv1/kernel';
    # the masked weight is 'kernel' whatever its attribute (see `prunable_weight`).
    name = weight.name.split("/")[-1].split(":")[0]
    if name != "kernel" and name == prunable_weight(layer):
        name = "kernel"
    return f"{layer.name}/{name}"


def model_weights(model) -> dict:
    """{'layer/weight': variable} over the inner layers' weights (no mask variables)."""
    out = {}
    for layer in model.layers:
        inner = _inner(layer)
        for weight in inner.weights:
            key = _weight_key(inner, weight)
            if key in out:
                raise ValueError(f"Two weights of {model.name} are both called {key!r}.")
            out[key] = weight
    return out


def get_masks(model) -> dict:
    """{layer name: float32 mask} read from the wrappers' mask variables."""
    return {
        name: w.pruning_vars[0][1].numpy().astype(np.float32) for name, w in wrappers(model).items()
    }


def get_weights(model) -> dict:
    """{'layer/weight': np.ndarray} with every mask applied (pruned weights read as 0).

    The stock tfmot wrapper leaves pruned weights non-zero between steps, so
    anything that reads weights must mask them first; this does.
    """
    masks = get_masks(model) if wrappers(model) else {}
    out = {}
    for key, var in model_weights(model).items():
        value = var.numpy()
        layer, name = key.split("/")
        if name == "kernel" and layer in masks:
            # +0.0 where pruned (value * mask would leave -0.0 under negative weights):
            # files store a pruned kernel by its non-zero bits (lth_tf.files).
            value = np.where(masks[layer] != 0, value, np.zeros((), value.dtype))
        out[key] = value
    return out


def set_weights(model, values: dict, strict: bool = True) -> None:
    """Assigns `values` ({'layer/weight': array}) to the model's weights.

    With `strict`, the keys must match the model's exactly.
    """
    variables = model_weights(model)
    if strict and set(values) != set(variables):
        missing, extra = set(variables) - set(values), set(values) - set(variables)
        raise ValueError(
            f"Weights do not fit model {model.name}: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(extra)[:5]}."
        )
    for key, value in values.items():  # check every value before assigning any
        if key not in variables:
            raise ValueError(f"Model {model.name} has no weight {key!r}.")
        var = variables[key]
        if tuple(var.shape) != tuple(np.shape(value)):
            raise ValueError(f"{key}: model shape {tuple(var.shape)} != given {np.shape(value)}.")
    for key, value in values.items():
        variables[key].assign(value)
    apply_masks(model)  # MaskedLayer relies on kernels being zero where masks are


def set_masks(model, masks: dict) -> None:
    """Assigns masks to the wrappers and zeroes the pruned kernel entries.

    Runs in cross-replica context (outside `strategy.run`), so under a
    distribution strategy every replica receives the same values.
    """
    ws = wrappers(model)
    if set(masks) != set(ws):
        raise ValueError(
            f"Masks are for layers {sorted(masks)}, but the model's prunable layers are {sorted(ws)}."
        )
    values = {}
    for name, wrapper in ws.items():  # check every mask before assigning any
        mask_var = wrapper.pruning_vars[0][1]
        values[name] = np.asarray(masks[name], dtype=np.float32)
        if values[name].shape != tuple(mask_var.shape):
            raise ValueError(
                f"Mask for {name} has shape {values[name].shape}; the layer needs "
                f"{tuple(mask_var.shape)}."
            )
    for name, wrapper in ws.items():
        weight, mask_var, _ = wrapper.pruning_vars[0]
        mask = values[name]
        mask_var.assign(mask)
        weight.assign(weight * tf.constant(mask, weight.dtype))


def apply_masks(model) -> None:
    """Zeroes pruned kernel entries (needed with the stock wrapper before reading weights)."""
    for wrapper in wrappers(model).values():
        weight, mask_var, _ = wrapper.pruning_vars[0]
        weight.assign(weight * tf.cast(mask_var, weight.dtype))


def strip(model):
    """A plain Keras model with masks applied and wrappers removed."""
    apply_masks(model)
    return tfmot.sparsity.keras.strip_pruning(model)
