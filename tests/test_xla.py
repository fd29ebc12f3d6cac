"""The train and eval steps compile entirely with XLA, with static shapes, as TPUStrategy needs.

A TPU runs only what XLA compiles. Here, on a CPU, the masked models are built,
masked and compiled through lth_tf's own path (`sparsity.wrap`, `set_masks`,
`train.compile_model` with `jit_compile=True`, the mixed-precision policy of
`rounds._precision`), and XLA is asked for the HLO of Keras' train step and eval
step as must-compile functions: that fails if any op of the step has no XLA
kernel (a test below shows it does). ResNet-20 is checked with SGD with momentum
(`MaskedSGD`, which masks the update) and Adam (the wrapper masks the gradient),
in float32 and mixed bfloat16; ResNet-50 (64x64 images, batch 2, about 10-20 s of
CPU time per case), for the layers ResNet-20 lacks (bottlenecks, 1x1 and strided
projections, max pooling), with both ways of masking: the ImageNet recipe's SGD
with momentum in mixed bfloat16, and Adam in float32. One XLA-compiled
step then runs and must keep the pruned weights exactly zero with a finite loss.

Training batches must have a static batch dimension (full batches only): checked
for the in-memory pipelines and ImageNet's, on one pipeline and per replica.
"""

import numpy as np
import pytest

from lth_tf import config as config_lib
from lth_tf import masks, models, rounds, sparsity, train
from lth_tf.data import ArrayData, synthetic_arrays
from lth_tf.keras import keras, tf

DENSITY = 0.2
# (arch, optimizer, precision): image side, batch, classes.
SIZES = {"resnet20": (32, 8, 10), "resnet50": (64, 2, 10)}
CASES = [
    ("resnet20", "sgd", None),
    ("resnet20", "sgd", "bfloat16"),
    ("resnet20", "adam", None),
    ("resnet20", "adam", "bfloat16"),
    ("resnet50", "sgd", "bfloat16"),
    ("resnet50", "adam", None),
]
# One XLA-compiled step costs about 10 s of compilation on a CPU for ResNet-20 and
# 20 s for ResNet-50: one case per way of masking and per precision.
RUN_CASES = [("resnet20", "sgd", "bfloat16"), ("resnet20", "adam", None)]


def case_id(case):
    arch, optimizer, precision = case
    return f"{arch}-{optimizer}-{precision or 'float32'}"


class Built:
    """A masked model compiled by lth_tf with jit_compile=True, and one fixed-shape batch."""

    def __init__(self, arch, optimizer, precision):
        side, batch, classes = SIZES[arch]
        self.config = config_lib.make_config(
            arch,
            batch_size=batch,
            optimizer=optimizer,
            mixed_precision=precision,
            jit_compile=True,
            steps_per_execution=1,
            rewind_step="0",
        )
        schedule = train.resolve(self.config, steps_per_epoch=100)
        with rounds._precision(precision):
            model = models.build_model(
                arch, (side, side, 3), classes, seed=0, weight_decay=self.config.weight_decay
            )
            model = sparsity.wrap(model, output_rate=self.config.output_rate)
            weights = sparsity.get_weights(model)
            kernels = {n: weights[f"{n}/kernel"] for n in sorted(sparsity.wrappers(model))}
            sparsity.set_masks(
                model, masks.prune(kernels, masks.ones_like(kernels), 1 - DENSITY, "global")
            )
            train.compile_model(model, self.config, schedule)
        self.model = model
        rng = np.random.default_rng(0)
        self.x = tf.constant(rng.normal(size=(batch, side, side, 3)).astype(np.float32))
        self.y = tf.constant(rng.integers(0, classes, size=batch).astype(np.int32))
        self.train_step = tf.function(model.train_step, jit_compile=True)
        self.test_step = tf.function(model.test_step, jit_compile=True)


@pytest.fixture(scope="module", autouse=True)
def _without_op_determinism():
    """XLA's own kernels, as a TPU run gets them.

    `imp --deterministic` (which other tests run in this process) turns TensorFlow's
    op determinism on for the process, and under it XLA refuses to compile a
    max-pool gradient (ResNet-50's pool1: "MaxPool gradient ops do not yet have a
    deterministic XLA implementation"). The checks here are of the step as a
    non-deterministic run compiles it; the state is restored afterwards.
    """
    from tensorflow.python.framework import config as tf_config

    was = tf_config.is_op_determinism_enabled()
    tf_config.disable_op_determinism()
    yield
    if was:
        tf_config.enable_op_determinism()


@pytest.fixture(scope="module")
def built():
    cache = {}

    def get(case):
        if case not in cache:
            cache[case] = Built(*case)
        return cache[case]

    yield get
    keras.backend.clear_session()


def test_a_step_xla_cannot_compile_is_refused():
    # What the checks below rely on: asking for the HLO of a must-compile function
    # fails when one of its ops has no XLA kernel.
    step = tf.function(lambda x: tf.strings.as_string(x), jit_compile=True)
    with pytest.raises(Exception, match="(?i)xla|compil|supported"):
        step.experimental_get_compiler_ir(tf.constant([1.0]))(stage="hlo")


def test_compile_model_runs_the_train_step_as_one_xla_cluster(built):
    # jit_compile of the config reaches Keras: the train function it makes calls
    # the step as a must-compile function (the unit XLA compiles), and so does
    # the eval function.
    b = built(CASES[0])
    assert b.model._jit_compile is True
    dataset = tf.data.Dataset.from_tensors((b.x, b.y)).repeat()

    def must_compile_calls(function):
        graph = function.get_concrete_function(iter(dataset)).graph
        found = 0
        for definition in [graph.as_graph_def().node] + [
            f.node_def for f in graph.as_graph_def().library.function
        ]:
            for node in definition:
                attr = node.attr.get("_XlaMustCompile")
                found += bool(attr is not None and attr.b)
        return found

    assert must_compile_calls(b.model.make_train_function(force=True)) >= 1
    assert must_compile_calls(b.model.make_test_function(force=True)) >= 1


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_train_step_compiles_entirely_with_xla(built, case):
    b = built(case)
    hlo = b.train_step.experimental_get_compiler_ir((b.x, b.y))(stage="hlo")
    assert "convolution" in hlo
    if case[2] == "bfloat16":
        convolutions = [
            w.layer
            for w in sparsity.wrappers(b.model).values()
            if isinstance(w.layer, keras.layers.Conv2D)
        ]
        assert convolutions and {c.compute_dtype for c in convolutions} == {"bfloat16"}
        assert "bf16" in hlo
    # The optimizer's update is part of the compiled step: Adam's second moments,
    # MaskedSGD's momentum.
    assert type(train._inner(b.model.optimizer)).__name__ == (
        "MaskedSGD" if case[1] == "sgd" else "Adam"
    )


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_eval_step_compiles_entirely_with_xla(built, case):
    b = built(case)
    hlo = b.test_step.experimental_get_compiler_ir((b.x, b.y))(stage="hlo")
    assert "convolution" in hlo


@pytest.mark.parametrize("case", RUN_CASES, ids=case_id)
def test_an_xla_step_keeps_pruned_weights_zero(built, case):
    b = built(case)
    before = sparsity.get_weights(b.model)
    result = b.train_step((b.x, b.y))
    assert np.isfinite(float(result["loss"]))
    assert int(b.model.optimizer.iterations.numpy()) == 1
    after = sparsity.get_weights(b.model)
    for name, mask in sparsity.get_masks(b.model).items():
        kernel = after[f"{name}/kernel"]
        assert np.mean(mask) < 1, name
        assert np.all(kernel[mask == 0] == 0), f"{name}: pruned weights changed under XLA"
        assert not np.array_equal(kernel, before[f"{name}/kernel"]), f"{name} did not train"
    evaluated = b.test_step((b.x, b.y))
    assert np.isfinite(float(evaluated["loss"]))


def _context(replicas, pipelines=1):
    return tf.distribute.InputContext(
        num_input_pipelines=pipelines, input_pipeline_id=0, num_replicas_in_sync=replicas
    )


def _batch_dims(dataset):
    images, labels = dataset.element_spec
    return images.shape[0], labels.shape[0]


def test_in_memory_training_batches_have_a_static_batch_dimension():
    data = ArrayData("synthetic", synthetic_arrays((8, 8, 3), 4), augment=True)
    assert _batch_dims(data.train(32, data_seed=0, start_step=3)) == (32, 32)
    # Per replica, as distribute_datasets_from_function builds it under TPUStrategy.
    assert _batch_dims(data.train(32, 0, 3, input_context=_context(8))) == (4, 4)
    assert _batch_dims(data.train(32, 0, 3, input_context=_context(8, 2))) == (4, 4)


@pytest.mark.parametrize("shards", [0, 2])
def test_imagenet_training_batches_have_a_static_batch_dimension(imagenet_dir, shards):
    from lth_tf.data.imagenet import ImageNetData

    data = ImageNetData(imagenet_dir, image_size=16, input_shards=shards)
    assert _batch_dims(data.train(8, data_seed=0, start_step=1)) == (8, 8)
    assert _batch_dims(data.train(8, 0, 1, input_context=_context(4))) == (2, 2)
    assert _batch_dims(data.train(8, 0, 1, input_context=_context(4, 2))) == (2, 2)
