"""Contracts of lth_tf.tflite.compact: the sparse TFLite file stores a ticket's
scattered weights one by one, not in 1x4 blocks, and computes the same function."""

import importlib

import numpy as np
import pytest

from lth_tf import tflite
from lth_tf.keras import keras, tf

# TFLite's flatbuffer schema, imported after lth_tf.keras has chosen Keras 2.
schema = importlib.import_module("tensorflow.lite.python.schema_py_generated")

COLUMNS = 512  # > 255: column indices need uint16


def _sparse_mlp(density=0.02, seed=0):
    rng = np.random.default_rng(seed)
    inputs = keras.Input((COLUMNS,))
    hidden = keras.layers.Dense(64, activation="relu", name="fc1")(inputs)
    outputs = keras.layers.Dense(10, name="output")(hidden)
    model = keras.Model(inputs, outputs)
    for layer in model.layers[1:]:
        kernel = layer.kernel.numpy()
        layer.kernel.assign(kernel * (rng.random(kernel.shape) < density))
    return model


def _converted(model):
    function = tf.function(lambda x: model(x, training=False)).get_concrete_function(
        tf.TensorSpec([None, COLUMNS], tf.float32)
    )
    converter = tf.lite.TFLiteConverter.from_concrete_functions([function], model)
    converter.optimizations = [tf.lite.Optimize.EXPERIMENTAL_SPARSITY]
    return converter.convert()


def _sparse_tensors(flatbuffer):
    model = schema.ModelT.InitFromObj(schema.Model.GetRootAsModel(flatbuffer, 0))
    return {
        (t.name.decode(), tuple(int(d) for d in t.shape)): t.sparsity
        for t in model.subgraphs[0].tensors
        if t.sparsity is not None and t.type == schema.TensorType.FLOAT32
    }


def _outputs(flatbuffer, x):
    interpreter, _ = tflite.interpreter(flatbuffer)
    return tflite._run(interpreter, x)


@pytest.fixture(scope="module")
def converted():
    model = _sparse_mlp()
    return model, _converted(model)


def test_the_converter_stores_a_scattered_kernel_in_blocks(converted):
    # The premise of compact: if TFLite stops emitting 1x4 blocks, this says so. (It
    # chooses blocks when few blocks hold a non-zero weight: here at 2% density.)
    _, raw = converted
    block_maps = [s.blockMap for s in _sparse_tensors(raw).values()]
    assert any(m is not None and len(m) == 1 for m in block_maps), block_maps


def test_compact_stores_each_weight_once_and_is_smaller(converted):
    model, raw = converted
    small = tflite.compact(raw)
    assert len(small) < 0.75 * len(raw), (len(small), len(raw))
    index_types = {}
    for (name, shape), sparsity in _sparse_tensors(small).items():
        assert len(sparsity.dimMetadata) == 2, name  # rows, then CSR columns: no blocks
        index_types[shape[1]] = sparsity.dimMetadata[1].arrayIndicesType
    # The narrowest index type that holds the column indices.
    vectors = schema.SparseIndexVector
    assert index_types == {COLUMNS: vectors.Uint16Vector, 64: vectors.Uint8Vector}, index_types
    fc1 = model.get_layer("fc1").kernel.numpy()
    total_values = sum(
        len(b.data)
        for b in schema.ModelT.InitFromObj(schema.Model.GetRootAsModel(small, 0)).buffers
        if b.data is not None
    )
    # fc1's values are now its non-zero weights, 4 bytes each (plus the other tensors).
    assert total_values >= 4 * np.count_nonzero(fc1)


def test_compact_computes_the_same_function(converted):
    model, raw = converted
    x = np.random.default_rng(1).standard_normal((32, COLUMNS)).astype(np.float32)
    keras_out = model(x, training=False).numpy()
    np.testing.assert_allclose(_outputs(tflite.compact(raw), x), keras_out, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(_outputs(raw, x), keras_out, rtol=1e-5, atol=1e-5)


def test_compact_leaves_a_model_without_blocks_unchanged(converted):
    _, raw = converted
    once = tflite.compact(raw)
    assert tflite.compact(once) is once


def test_the_sparse_kind_is_compacted(converted):
    model, _ = converted
    function = tf.function(lambda x: model(x, training=False)).get_concrete_function(
        tf.TensorSpec([None, COLUMNS], tf.float32)
    )
    sparse = tflite.convert(function, model, tflite.SPARSE)
    assert all(len(s.dimMetadata) == 2 for s in _sparse_tensors(sparse).values())
