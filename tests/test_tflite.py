"""Contracts of lth_tf.tflite: the sparse TFLite file stores a ticket's scattered
weights one by one, not in 1x4 blocks, and computes the same function; every kind
loads in LiteRT's default interpreter with the Keras model's outputs; without
LiteRT the files are evaluated with tf.lite; a flatbuffer schema the rewrites were
not written for leaves the converter's own file, and says so."""

import importlib
import sys

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


# ---- LiteRT ------------------------------------------------------------------------------


def _function(model):
    return tf.function(lambda x: model(x, training=False)).get_concrete_function(
        tf.TensorSpec([None, COLUMNS], tf.float32)
    )


def _litert_outputs(flatbuffer, x, **options):
    """Outputs of LiteRT's Interpreter as a user would call it (default options)."""
    litert = pytest.importorskip("ai_edge_litert.interpreter")
    it = litert.Interpreter(model_content=flatbuffer, **options)
    it.resize_tensor_input(it.get_input_details()[0]["index"], x.shape)
    it.allocate_tensors()
    it.set_tensor(it.get_input_details()[0]["index"], x)
    it.invoke()
    return it.get_tensor(it.get_output_details()[0]["index"])


@pytest.fixture(scope="module")
def kinds(converted):
    """Each kind converted by tflite.convert, and the Keras model's outputs."""
    model, _ = converted
    x = np.random.default_rng(2).standard_normal((16, COLUMNS)).astype(np.float32)
    notes = []
    files = {
        kind: tflite.convert(_function(model), model, kind, log=notes.append)
        for kind in tflite.TFLITE_KINDS
    }
    assert notes == []  # no rewrite skipped
    return files, x, model(x, training=False).numpy()


def test_litert_is_the_runtime_when_installed():
    pytest.importorskip("ai_edge_litert")
    assert tflite.runtime().name.startswith("ai_edge_litert ")


@pytest.mark.parametrize("kind", [tflite.DENSE, tflite.SPARSE])
def test_float_files_give_the_keras_outputs_in_litert(kinds, kind):
    files, x, keras_out = kinds
    np.testing.assert_allclose(_litert_outputs(files[kind], x), keras_out, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def converted_int8(converted):
    """The converter's own sparse int8 file (before dequantize_densified)."""
    model, _ = converted
    converter = tf.lite.TFLiteConverter.from_concrete_functions([_function(model)], model)
    converter.optimizations = [tf.lite.Optimize.EXPERIMENTAL_SPARSITY, tf.lite.Optimize.DEFAULT]
    return converter.convert()


def test_the_converters_sparse_int8_file_is_refused_by_the_default_interpreter(converted_int8):
    # The premise of dequantize_densified: if LiteRT's XNNPACK starts taking an int8
    # kernel behind a DENSIFY op, this says so.
    x = np.zeros((1, COLUMNS), np.float32)
    with pytest.raises(RuntimeError, match="XNNPack"):
        _litert_outputs(converted_int8, x)


def test_the_sparse_int8_file_loads_by_default_and_computes_the_float_function(kinds):
    files, x, keras_out = kinds
    litert = pytest.importorskip("ai_edge_litert.interpreter")
    by_default = _litert_outputs(files[tflite.SPARSE_INT8], x)
    builtin = _litert_outputs(
        files[tflite.SPARSE_INT8],
        x,
        experimental_op_resolver_type=litert.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
    )
    # XNNPACK and the builtin kernels compute the same float32 function of the
    # dequantized weights (a wrongly read sparse weight gives NaN or garbage here)...
    np.testing.assert_allclose(by_default, builtin, rtol=1e-5, atol=1e-6)
    # ...which is the Keras model's up to the int8 rounding of the weights
    # (measured: 6e-4 at most, on outputs of magnitude 0.1).
    np.testing.assert_allclose(by_default, keras_out, atol=5e-3)
    assert np.mean(by_default.argmax(-1) == keras_out.argmax(-1)) >= 0.9
    # The file still stores fc1's weights as sparse int8.
    model = schema.ModelT.InitFromObj(schema.Model.GetRootAsModel(files[tflite.SPARSE_INT8], 0))
    stored = [
        t
        for t in model.subgraphs[0].tensors
        if t.sparsity is not None and t.type == schema.TensorType.INT8
    ]
    assert [tuple(t.shape) for t in stored] == [(64, COLUMNS)], stored


def test_every_kind_is_evaluated_with_the_default_options(kinds):
    files, x, _ = kinds
    for kind, flatbuffer in files.items():
        _, resolver = tflite.interpreter(flatbuffer)
        assert resolver == "xnnpack", kind


def test_without_litert_files_are_evaluated_with_tf_lite(kinds, monkeypatch):
    files, x, keras_out = kinds
    monkeypatch.setitem(sys.modules, "ai_edge_litert", None)  # import fails
    assert tflite.runtime().name == f"tf.lite {tf.__version__}"
    for kind, flatbuffer in files.items():
        it, resolver = tflite.interpreter(flatbuffer)
        assert isinstance(it, tf.lite.Interpreter) and resolver == "xnnpack", kind
        out = tflite._run(it, x)
        atol = 5e-3 if kind == tflite.SPARSE_INT8 else 1e-5
        np.testing.assert_allclose(out, keras_out, atol=atol, err_msg=kind)
    labels = keras_out.argmax(-1)
    acc = tflite.accuracy(files[tflite.SPARSE], [(x, labels)])
    assert acc["accuracy"] == 1.0 and acc["runtime"].startswith("tf.lite ")


def test_a_refused_file_is_evaluated_with_the_builtin_kernels(converted_int8):
    _, resolver = tflite.interpreter(converted_int8)
    assert resolver == "builtin"


# ---- the schema check --------------------------------------------------------------------


@pytest.mark.parametrize(
    "patch",
    [
        ("SCHEMA_MODULES", ("lth_tf_no_such_schema",)),
        ("_SCHEMA_FIELDS", {**tflite._SCHEMA_FIELDS, "TensorT": ("sparsity", "noSuchField")}),
        ("_SCHEMA_VALUES", {**tflite._SCHEMA_VALUES, "DimensionType": {"SPARSE_CSR": 7}}),
        ("SCHEMA_VERSION", 4),
    ],
    ids=["module gone", "field gone", "enum value changed", "version"],
)
def test_a_changed_schema_leaves_the_converters_file_and_says_so(converted, monkeypatch, patch):
    model, raw = converted
    monkeypatch.setattr(tflite, *patch)
    notes = []
    assert tflite.compact(raw, log=notes.append) is raw
    assert len(notes) == 1 and "converter's own" in notes[0], notes
    # Through convert too, the note going to its log (the export prints it).
    notes = []
    sparse = tflite.convert(_function(model), model, tflite.SPARSE, log=notes.append)
    assert len(sparse) == len(raw) and len(notes) == 1, notes
    with pytest.warns(UserWarning, match="schema"):
        tflite.compact(raw)  # no log: a warning


def test_another_file_identifier_is_left_alone(converted):
    _, raw = converted
    other = raw[:4] + b"XYZ3" + raw[8:]
    notes = []
    assert tflite.compact(other, log=notes.append) is other
    assert tflite.dequantize_densified(other, log=notes.append) is other
    assert len(notes) == 2 and "XYZ3" in notes[0], notes


def test_litert_schema_serves_when_tensorflows_is_gone(converted, monkeypatch):
    pytest.importorskip("ai_edge_litert")
    _, raw = converted
    monkeypatch.setattr(
        tflite, "SCHEMA_MODULES", ("lth_tf_no_such_schema", "ai_edge_litert.schema_py_generated")
    )
    notes = []
    assert len(tflite.compact(raw, log=notes.append)) < 0.75 * len(raw)
    assert notes == []
