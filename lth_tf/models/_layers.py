"""Layer factory shared by the model builders: seeded initialisers and weight decay.

Every builder makes its Conv2D, Dense and BatchNormalization layers through one
`LayerFactory`, which hands each layer initialisers seeded from the model seed and
the layer's position in build order. Keras' seeded initialisers use stateless random
ops, so a given (seed, architecture) gives bit-identical weights in any process,
whatever the global RNG state, and `keras.models.clone_model` (which re-runs the
initialisers from the layer configs) reproduces the same weights too.
"""

from lth_tf.keras import keras

# Layer i of a model built with seed s draws its initialiser seed s * SEED_STRIDE + i.
# A prime larger than the number of seeded layers of any model here (ResNet-50 has
# 107), so that no two (seed, layer) pairs share a stream.
SEED_STRIDE = 1009

# PyTorch's BatchNorm2d defaults, as used by the authors' framework (open_lth).
# PyTorch's momentum 0.1 weights the new batch; Keras' momentum weights the old
# running value, so the equivalent Keras momentum is 0.9.
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5


class LayerFactory:
    """Builds prunable layers and BatchNorm with seeded initialisers and optional L2.

    Args:
        seed: The model seed.
        weight_decay: PyTorch-style coupled weight decay; 0 attaches no regularizers.
        kernel_init: "he_normal" (open_lth's kaiming_normal: untruncated normal,
            std sqrt(2 / fan_in)) or "glorot_normal" (Keras' GlorotNormal, the
            "Gaussian Glorot" of the 2019 lottery ticket paper).
    """

    def __init__(self, seed: int, weight_decay: float, kernel_init: str = "he_normal"):
        if kernel_init not in ("he_normal", "glorot_normal"):
            raise ValueError(
                f"kernel_init must be 'he_normal' or 'glorot_normal', got {kernel_init!r}."
            )
        self._seed = seed
        self._weight_decay = weight_decay
        self._kernel_init = kernel_init
        self._index = 0

    def _next_seed(self) -> int:
        if self._index >= SEED_STRIDE:
            raise RuntimeError(
                f"A model may have at most {SEED_STRIDE} seeded layers so that seeds of "
                "different models do not collide; raise SEED_STRIDE."
            )
        seed = self._seed * SEED_STRIDE + self._index
        self._index += 1
        return seed

    def _kernel_initializer(self) -> keras.initializers.Initializer:
        seed = self._next_seed()
        if self._kernel_init == "glorot_normal":
            return keras.initializers.GlorotNormal(seed=seed)
        # torch.nn.init.kaiming_normal_ draws from an untruncated normal; Keras'
        # HeNormal truncates at two standard deviations, so spell it out.
        return keras.initializers.VarianceScaling(
            scale=2.0, mode="fan_in", distribution="untruncated_normal", seed=seed
        )

    def _regularizer(self) -> keras.regularizers.Regularizer | None:
        # L2(l) adds l * sum(w^2) to the loss, whose gradient is 2 * l * w; halving
        # makes it weight_decay * w, PyTorch SGD's coupled weight decay.
        if self._weight_decay > 0:
            return keras.regularizers.L2(self._weight_decay / 2)
        return None

    def conv(
        self,
        filters: int,
        kernel_size: int,
        name: str,
        *,
        strides: int = 1,
        padding: str = "same",
        use_bias: bool = True,
        activation: str | None = None,
    ) -> keras.layers.Conv2D:
        """A Conv2D with a seeded He/Glorot kernel, zero bias and optional L2."""
        return keras.layers.Conv2D(
            filters,
            kernel_size,
            strides=strides,
            padding=padding,
            use_bias=use_bias,
            activation=activation,
            kernel_initializer=self._kernel_initializer(),
            bias_initializer="zeros",
            kernel_regularizer=self._regularizer(),
            bias_regularizer=self._regularizer() if use_bias else None,
            name=name,
        )

    def dense(
        self,
        units: int,
        name: str,
        *,
        activation: str | None = None,
        dtype: str | None = None,
    ) -> keras.layers.Dense:
        """A Dense layer with a seeded He/Glorot kernel, zero bias and optional L2."""
        return keras.layers.Dense(
            units,
            activation=activation,
            kernel_initializer=self._kernel_initializer(),
            bias_initializer="zeros",
            kernel_regularizer=self._regularizer(),
            bias_regularizer=self._regularizer(),
            dtype=dtype,
            name=name,
        )

    def output(self, num_classes: int) -> keras.layers.Dense:
        """The logits layer, named "output", always computing in float32.

        Passing dtype="float32" keeps the logits (and so the loss) in float32 even
        when a mixed-precision policy is active.
        """
        return self.dense(num_classes, "output", dtype="float32")

    def batch_norm(self, name: str) -> keras.layers.BatchNormalization:
        """BatchNorm with gamma ~ U[0, 1] (seeded), beta = 0, PyTorch momentum/epsilon.

        open_lth's "uniform" batchnorm_init draws gamma uniformly in [0, 1).
        """
        return keras.layers.BatchNormalization(
            momentum=BN_MOMENTUM,
            epsilon=BN_EPSILON,
            gamma_initializer=keras.initializers.RandomUniform(0.0, 1.0, seed=self._next_seed()),
            beta_initializer="zeros",
            gamma_regularizer=self._regularizer(),
            beta_regularizer=self._regularizer(),
            name=name,
        )
