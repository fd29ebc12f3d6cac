"""TFLite files of a ticket: a dense one and one in TFLite's sparse tensor format.

A pruned Keras model converted the ordinary way is as large as the dense one:
its zeros are stored. With `tf.lite.Optimize.EXPERIMENTAL_SPARSITY` the
converter stores each constant weight tensor that is sparse enough in TFLite's
sparse format (CSR-like: a dense outer dimension, compressed inner indices), so
the file shrinks with the density. Optionally the weights are also quantised to
int8 (dynamic-range: int8 weights, float activations).

The converter stores a fully connected kernel it finds sparse enough in 1x4
blocks (a dense row of four values wherever one of them is non-zero): for a
ticket, whose surviving weights are scattered, that stores most zeros again
(LeNet-300-100 at 5.5%: 3.7 values per non-zero weight of fc1). `compact`
rewrites such float32 tensors in the element-wise format (one value and one
column index per non-zero weight) when that is smaller; the builtin
FULLY_CONNECTED kernel computes with either format directly.

The runtime side (measured in benchmarks/tflite_latency.py): XNNPACK, the
delegate LiteRT's interpreter applies by default, does not take sparse fully
connected layers of a float32 file, so they run with the builtin sparse kernels
(a kernel stored behind a DENSIFY op is densified once) and the rest of the
model with XNNPACK. It refuses the converter's sparse int8 file outright
("failed to delegate FULLY_CONNECTED node ... TfLiteXNNPackDelegate failed to
prepare": an int8 kernel behind a DENSIFY op; per-tensor scales, the older
quantizers and full-integer quantisation are refused alike), so
`dequantize_densified` adds a DEQUANTIZE op after each such
DENSIFY: the file still stores the sparse int8 weights, and XNNPACK unpacks
them to float32 once at load time and runs the whole model. Every kind then
loads in the default interpreter; `interpreter` still falls back to the
builtin kernels (and says so in `resolver`) for a file it refuses.

Files are evaluated with LiteRT (`ai_edge_litert`, `pip install lth_tf[litert]`)
when it is installed, else with `tf.lite.Interpreter`, which TensorFlow
deprecates in its favour. `compact` and `dequantize_densified` edit the
flatbuffer through its Python schema module (TensorFlow's private one, else
LiteRT's); they check first that the schema has what they use and leave the
converter's own file when it does not, saying why.
"""

import importlib
import time
import warnings
from typing import NamedTuple

import numpy as np

from lth_tf.keras import tf

DENSE = "dense"
SPARSE = "sparse"
SPARSE_INT8 = "sparse_int8"
TFLITE_KINDS = (DENSE, SPARSE, SPARSE_INT8)

# What a file that XNNPACK refuses needs: the builtin kernels only.
BUILTIN_OPTION = "experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES"


class Runtime(NamedTuple):
    """The interpreter files are evaluated with."""

    interpreter: type  # Interpreter(model_content=..., num_threads=..., ...)
    resolvers: type  # its OpResolverType enum
    name: str  # e.g. "ai_edge_litert 2.3.0" or "tf.lite 2.21.0"


def runtime() -> Runtime:
    """LiteRT's interpreter (`ai_edge_litert`) when installed, else tf.lite's."""
    try:
        from ai_edge_litert import interpreter as litert
    except ImportError:
        return Runtime(
            tf.lite.Interpreter, tf.lite.experimental.OpResolverType, f"tf.lite {tf.__version__}"
        )
    from importlib.metadata import version

    return Runtime(
        litert.Interpreter, litert.OpResolverType, f"ai_edge_litert {version('ai-edge-litert')}"
    )


def _note(log, text: str):
    if log is None:
        warnings.warn(text, stacklevel=3)
    else:
        log(text)


def convert(concrete_function, trackable, kind: str = SPARSE, log=None) -> bytes:
    """Converts a serving function to a TFLite flatbuffer.

    Args:
      concrete_function: the function to convert (e.g. a SavedModel signature's
        concrete function, preprocessing included).
      trackable: the object that owns its variables (frozen into constants).
      kind: 'dense' (plain float32), 'sparse' (float32 weights in the sparse
        tensor format, `compact`ed) or 'sparse_int8' (sparse format and int8
        weights, `dequantize_densified`).
      log: a print-like function told when a rewrite is skipped because the
        flatbuffer schema is not the one it was written for (default:
        warnings.warn); the file is then the converter's own.

    Returns:
      The flatbuffer's bytes.
    """
    if kind not in TFLITE_KINDS:
        raise ValueError(f"TFLite kind {kind!r} is not one of {', '.join(TFLITE_KINDS)}.")
    converter = tf.lite.TFLiteConverter.from_concrete_functions([concrete_function], trackable)
    if kind == SPARSE:
        converter.optimizations = [tf.lite.Optimize.EXPERIMENTAL_SPARSITY]
    elif kind == SPARSE_INT8:
        converter.optimizations = [
            tf.lite.Optimize.EXPERIMENTAL_SPARSITY,
            tf.lite.Optimize.DEFAULT,
        ]
    flatbuffer = converter.convert()
    if kind == SPARSE:
        return compact(flatbuffer, log)
    if kind == SPARSE_INT8:
        return dequantize_densified(flatbuffer, log)
    return flatbuffer


# ---- the flatbuffer schema --------------------------------------------------------------

# The schema's Python modules, tried in order: TensorFlow's is private (it may go as
# TFLite moves to LiteRT), LiteRT ships its own.
SCHEMA_MODULES = (
    "tensorflow.lite.python.schema_py_generated",
    "ai_edge_litert.schema_py_generated",
)
FILE_IDENTIFIER = b"TFL3"
SCHEMA_VERSION = 3
# The object-API classes and fields compact and dequantize_densified read or write...
_SCHEMA_FIELDS = {
    "ModelT": ("version", "subgraphs", "buffers", "operatorCodes"),
    "SubGraphT": ("tensors", "operators"),
    "TensorT": ("shape", "type", "buffer", "name", "quantization", "sparsity"),
    "BufferT": ("data", "offset"),
    "OperatorT": ("opcodeIndex", "inputs", "outputs"),
    "OperatorCodeT": ("builtinCode", "deprecatedBuiltinCode", "version"),
    "QuantizationParametersT": ("scale",),
    "SparsityParametersT": ("traversalOrder", "blockMap", "dimMetadata"),
    "DimensionMetadataT": (
        "format",
        "denseSize",
        "arraySegmentsType",
        "arraySegments",
        "arrayIndicesType",
        "arrayIndices",
    ),
    "Uint8VectorT": ("values",),
    "Uint16VectorT": ("values",),
    "Int32VectorT": ("values",),
}
# ...and the enum values they rely on (values in the file format, fixed by schema.fbs).
_SCHEMA_VALUES = {
    "TensorType": {"FLOAT32": 0, "INT8": 9},
    "DimensionType": {"DENSE": 0, "SPARSE_CSR": 1},
    "SparseIndexVector": {"Int32Vector": 1, "Uint16Vector": 2, "Uint8Vector": 3},
    "BuiltinOperator": {"DEQUANTIZE": 6, "DENSIFY": 124},
}


class SchemaChanged(Exception):
    """The flatbuffer or its schema module is not what the rewrites were written for."""


def _schema_problem(schema) -> str | None:
    """What `schema` lacks of _SCHEMA_FIELDS and _SCHEMA_VALUES (None: nothing)."""
    if not hasattr(schema, "Model") or not hasattr(schema.Model, "GetRootAsModel"):
        return "no Model.GetRootAsModel"
    for name, fields in _SCHEMA_FIELDS.items():
        cls = getattr(schema, name, None)
        if cls is None or not hasattr(cls, "InitFromObj"):
            return f"no {name}"
        missing = [f for f in fields if f not in vars(cls())]
        if missing:
            return f"{name} has no {', '.join(missing)}"
    for name, values in _SCHEMA_VALUES.items():
        for key, value in values.items():
            if getattr(getattr(schema, name, None), key, None) != value:
                return f"{name}.{key} is not {value}"
    return None


def _unpack(flatbuffer: bytes) -> tuple:
    """(schema module, ModelT) of a flatbuffer, through the first schema module that fits.

    Raises:
      SchemaChanged: saying what did not fit.
    """
    try:
        import flatbuffers  # noqa: F401  (needed to pack the model again)
    except ImportError as e:
        raise SchemaChanged(f"the flatbuffers package is missing ({e})") from None
    problems = []
    for name in SCHEMA_MODULES:
        try:
            schema = importlib.import_module(name)
        except ImportError:
            problems.append(f"{name} is not installed")
            continue
        problem = _schema_problem(schema)
        if problem is None:
            break
        problems.append(f"{name}: {problem}")
    else:
        raise SchemaChanged("; ".join(problems))
    identifier = bytes(flatbuffer[4:8])
    if identifier != FILE_IDENTIFIER:
        raise SchemaChanged(f"file identifier {identifier!r}, expected {FILE_IDENTIFIER!r}")
    model = schema.ModelT.InitFromObj(schema.Model.GetRootAsModel(flatbuffer, 0))
    if model.version != SCHEMA_VERSION:
        raise SchemaChanged(f"schema version {model.version}, expected {SCHEMA_VERSION}")
    if any(b.offset for b in model.buffers or ()):
        raise SchemaChanged("buffers stored after the flatbuffer (a model over 2 GB)")
    return schema, model


def _pack(model, size_hint: int) -> bytes:
    import flatbuffers

    builder = flatbuffers.Builder(size_hint)
    builder.Finish(model.Pack(builder), file_identifier=FILE_IDENTIFIER)
    return bytes(builder.Output())


def _skipped(what: str, why: SchemaChanged, log):
    _note(
        log,
        f"TFLite: {what} skipped, the file is the converter's own: the flatbuffer schema is "
        f"not the one lth_tf.tflite was written for ({why}).",
    )


# ---- compact ----------------------------------------------------------------------------

# TFLite's DimensionType values (schema.fbs).
_DENSE, _SPARSE_CSR = 0, 1


def compact(flatbuffer: bytes, log=None) -> bytes:
    """Rewrites the 1x4-block-sparse float32 matrices of a TFLite model element-wise.

    Each such matrix (a fully connected kernel) is decoded to its dense values
    and stored again as rows of (column index, value) pairs, with the narrowest
    index type that holds its indices, whenever that takes fewer bytes than
    the blocks. The operators and every other tensor are left as they were,
    so the model computes the same function.

    Args:
      flatbuffer: a TFLite model.
      log: a print-like function told when the schema check fails (default:
        warnings.warn).

    Returns:
      The flatbuffer's bytes (the input, unchanged, when no matrix got smaller
      or the flatbuffer schema is not the one this was written for).
    """
    try:
        schema, model = _unpack(flatbuffer)
    except SchemaChanged as e:
        _skipped("compact (1x4 blocks stored weight by weight)", e, log)
        return flatbuffer
    changed = False
    for graph in model.subgraphs:
        for tensor in graph.tensors:
            if not _is_block_sparse_matrix(tensor, schema):
                continue
            buffer = model.buffers[tensor.buffer]
            old_bytes = len(buffer.data) + _index_bytes(tensor.sparsity)
            sparsity, values = _element_sparsity(_decode_blocks(tensor, buffer.data), schema)
            if values.nbytes + _index_bytes(sparsity) >= old_bytes:
                continue
            tensor.sparsity = sparsity
            buffer.data = np.frombuffer(values.tobytes(), np.uint8)
            changed = True
    if not changed:
        return flatbuffer
    return _pack(model, len(flatbuffer))


def _is_block_sparse_matrix(tensor, schema) -> bool:
    """A float32 2-D tensor stored as (dense rows, CSR blocks, dense block)."""
    sparsity = tensor.sparsity
    return (
        sparsity is not None
        and tensor.type == schema.TensorType.FLOAT32
        and len(tensor.shape) == 2
        and sparsity.blockMap is not None
        and len(sparsity.blockMap) == 1
        and len(sparsity.dimMetadata) == 3
        and [d.format for d in sparsity.dimMetadata] == [_DENSE, _SPARSE_CSR, _DENSE]
    )


def _index_bytes(sparsity) -> int:
    return sum(
        np.asarray(v.values).nbytes
        for d in sparsity.dimMetadata
        if d.format == _SPARSE_CSR
        for v in (d.arraySegments, d.arrayIndices)
    )


def _decode_blocks(tensor, data) -> np.ndarray:
    """The dense float32 matrix of a block-sparse tensor (blocks along the columns)."""
    rows_meta, blocks_meta, block_meta = tensor.sparsity.dimMetadata
    width = block_meta.denseSize
    segments = np.asarray(blocks_meta.arraySegments.values, np.int64)
    block_columns = np.asarray(blocks_meta.arrayIndices.values, np.int64)
    values = np.frombuffer(np.asarray(data, np.uint8).tobytes(), np.float32).reshape(-1, width)
    rows, columns = int(tensor.shape[0]), int(tensor.shape[1])
    if rows_meta.denseSize != rows or len(segments) != rows + 1 or len(values) != segments[-1]:
        raise ValueError(f"Malformed block-sparse tensor {tensor.name!r} in the TFLite model.")
    padded = np.zeros((rows, (columns + width - 1) // width, width), np.float32)
    row_of_block = np.repeat(np.arange(rows), np.diff(segments))
    padded[row_of_block, block_columns] = values
    return padded.reshape(rows, -1)[:, :columns]


def _element_sparsity(matrix: np.ndarray, schema):
    """(SparsityParametersT, float32 values) of `matrix` as dense rows of CSR columns."""
    nonzero = matrix != 0
    segments = np.concatenate([[0], np.cumsum(nonzero.sum(axis=1))])
    columns = np.nonzero(nonzero)[1]
    rows_meta = schema.DimensionMetadataT()
    rows_meta.format, rows_meta.denseSize = _DENSE, matrix.shape[0]
    columns_meta = schema.DimensionMetadataT()
    columns_meta.format = _SPARSE_CSR
    columns_meta.arraySegmentsType, columns_meta.arraySegments = _index_vector(
        segments, int(segments[-1]), schema
    )
    columns_meta.arrayIndicesType, columns_meta.arrayIndices = _index_vector(
        columns, matrix.shape[1] - 1, schema
    )
    sparsity = schema.SparsityParametersT()
    sparsity.traversalOrder = [0, 1]
    sparsity.dimMetadata = [rows_meta, columns_meta]
    return sparsity, matrix[nonzero].astype(np.float32)


def _index_vector(values: np.ndarray, largest: int, schema):
    """(union type, vector) of the narrowest of TFLite's index vectors that holds `largest`."""
    for dtype, vector, kind in (
        (np.uint8, schema.Uint8VectorT, schema.SparseIndexVector.Uint8Vector),
        (np.uint16, schema.Uint16VectorT, schema.SparseIndexVector.Uint16Vector),
        (np.int32, schema.Int32VectorT, schema.SparseIndexVector.Int32Vector),
    ):
        if largest <= np.iinfo(dtype).max:
            out = vector()
            out.values = values.astype(dtype)
            return kind, out
    raise ValueError(f"A sparse index of {largest} does not fit TFLite's int32 index vectors.")


# ---- dequantize_densified ---------------------------------------------------------------


def dequantize_densified(flatbuffer: bytes, log=None) -> bytes:
    """Makes a sparse int8 model load in the default interpreter (XNNPACK).

    The converter stores a sparse int8 kernel behind a DENSIFY op that feeds a
    hybrid (float activations, int8 weights) FULLY_CONNECTED or CONV_2D op,
    which XNNPACK claims and then fails to prepare. This adds a DEQUANTIZE op
    after each such DENSIFY (whose consumers all take float32 activations) and
    gives its consumers the float32 output: XNNPACK then densifies and
    dequantizes the weights once at load time and computes in float32 with
    them (the builtin kernels compute the same, per invoke). Once XNNPACK takes
    such a model, it would also take an op reading a sparse weight directly (a
    small float kernel the converter stores in blocks) and read it as dense:
    so each such weight gets a DENSIFY op of its own. The file still stores the
    sparse weights (a few hundred bytes more for the ops).

    Args:
      flatbuffer: a TFLite model.
      log: a print-like function told when the schema check fails (default:
        warnings.warn).

    Returns:
      The flatbuffer's bytes (the input, unchanged, when it has no int8 DENSIFY
      to dequantize or the flatbuffer schema is not the one this was written for).
    """
    try:
        schema, model = _unpack(flatbuffer)
    except SchemaChanged as e:
        _skipped("dequantize_densified (loads in the default interpreter)", e, log)
        return flatbuffer
    ops, types = schema.BuiltinOperator, schema.TensorType
    codes = model.operatorCodes

    def builtin(op) -> int:  # codes over 127 are only in builtinCode
        c = codes[op.opcodeIndex]
        return max(c.builtinCode, c.deprecatedBuiltinCode)

    def opcode(code: int, version: int) -> int:
        for i, c in enumerate(codes):
            if max(c.builtinCode, c.deprecatedBuiltinCode) == code and c.version == version:
                return i
        c = schema.OperatorCodeT()
        c.builtinCode = c.deprecatedBuiltinCode = code
        c.version = version
        codes.append(c)
        return len(codes) - 1

    def inputs(op) -> list:
        return [] if op.inputs is None else [int(i) for i in op.inputs]

    def consumers(graph, index):
        return [op for op in graph.operators if index in inputs(op)]

    def dequantizable(graph, op) -> bool:
        """A DENSIFY of int8 weights whose consumers all take float32 activations."""
        if builtin(op) != ops.DENSIFY or len(op.outputs) != 1:
            return False
        tensor = graph.tensors[int(op.outputs[0])]
        readers = consumers(graph, int(op.outputs[0]))
        return (
            tensor.type == types.INT8
            and tensor.quantization is not None
            and tensor.quantization.scale is not None
            and bool(readers)
            and all(graph.tensors[int(r.inputs[0])].type == types.FLOAT32 for r in readers)
        )

    if not any(dequantizable(g, op) for g in model.subgraphs for op in g.operators):
        return flatbuffer

    def add_op(graph, operators, code, version, source: int, tensor_type, quantization=None):
        """Appends `code`(source) to operators; its consumers read the new output instead."""
        out = schema.TensorT()
        src = graph.tensors[source]
        suffix = b"/dense" if code == ops.DENSIFY else b"/dequantized"
        out.name, out.shape, out.type = src.name + suffix, src.shape, tensor_type
        out.quantization = quantization
        out.buffer = 0  # TFLite's empty buffer: computed, not stored
        graph.tensors.append(out)
        index = len(graph.tensors) - 1
        for reader in consumers(graph, source):
            reader.inputs = [index if int(i) == source else i for i in reader.inputs]
        op = schema.OperatorT()
        op.opcodeIndex = opcode(code, version)
        op.inputs, op.outputs = [source], [index]
        operators.append(op)
        return op

    def dequantize_after(graph, operators, densify):
        weights = int(densify.outputs[0])
        per_channel = len(graph.tensors[weights].quantization.scale) > 1
        # Version 5 dequantizes per channel, 2 per tensor (TFLite's op_version.cc).
        version = 5 if per_channel else 2
        add_op(graph, operators, ops.DEQUANTIZE, version, weights, types.FLOAT32)

    for graph in model.subgraphs:
        operators = []
        for op in graph.operators:
            if builtin(op) != ops.DENSIFY:
                for i in inputs(op):
                    if i >= 0 and graph.tensors[i].sparsity is not None:
                        t = graph.tensors[i]
                        dense = add_op(graph, operators, ops.DENSIFY, 1, i, t.type, t.quantization)
                        if dequantizable(graph, dense):
                            dequantize_after(graph, operators, dense)
            operators.append(op)
            if dequantizable(graph, op):
                dequantize_after(graph, operators, op)
        graph.operators = operators
    return _pack(model, len(flatbuffer))


# ---- evaluation -------------------------------------------------------------------------


def interpreter(flatbuffer: bytes, num_threads: int = 1):
    """A ready interpreter with the default options (XNNPACK), else the builtin kernels only.

    The interpreter is LiteRT's when `ai_edge_litert` is installed, else
    tf.lite's (`runtime`). The builtin kernels (BUILTIN_OPTION) are used only
    when the default options refuse the model.

    Returns:
      (interpreter, resolver) with tensors allocated; resolver is "xnnpack" (the
      default options) or "builtin".
    """
    rt = runtime()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tf.lite.Interpreter's deprecation notice
        try:
            it = rt.interpreter(model_content=flatbuffer, num_threads=num_threads)
            it.allocate_tensors()
            return it, "xnnpack"
        except RuntimeError:
            # e.g. XNNPACK refusing a hybrid int8 op behind a DENSIFY (see the module doc).
            it = rt.interpreter(
                model_content=flatbuffer,
                num_threads=num_threads,
                experimental_op_resolver_type=rt.resolvers.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
            )
            it.allocate_tensors()
            return it, "builtin"


def _probabilities_index(it) -> int:
    """The output holding class scores.

    lth_tf.export's serving functions return {"classes", "probabilities"}, which a
    TFLite model lists in key order (classes first); a model with one output
    (benchmarks) has only that.
    """
    for key in it.get_signature_list():
        outputs = it.get_signature_runner(key).get_output_details()
        if "probabilities" in outputs:
            return outputs["probabilities"]["index"]
    return it.get_output_details()[0]["index"]


def _run(it, images: np.ndarray, output: int | None = None) -> np.ndarray:
    """Output `output` (default: the first) for one batch; resizes the input when its shape changed."""
    inp = it.get_input_details()[0]
    if tuple(inp["shape"]) != images.shape:
        it.resize_tensor_input(inp["index"], images.shape)
        it.allocate_tensors()
        inp = it.get_input_details()[0]
    it.set_tensor(inp["index"], images.astype(inp["dtype"]))
    it.invoke()
    return it.get_tensor(it.get_output_details()[0]["index"] if output is None else output)


def accuracy(flatbuffer: bytes, batches) -> dict:
    """Top-1 accuracy of a classifier flatbuffer over (images, labels) numpy batches.

    Batches may differ in shape (e.g. ImageNet images of their own size, one per
    batch, for a model converted with a dynamic input shape): the input is resized.

    Returns:
      {"accuracy", "examples", "resolver", "runtime"} (resolver: "xnnpack", the
      default options, or "builtin"; runtime: `runtime().name`).
    """
    it, resolver = interpreter(flatbuffer)
    output = _probabilities_index(it)
    correct = total = 0
    for images, labels in batches:
        out = _run(it, np.asarray(images), output)
        correct += int((out.argmax(-1) == np.asarray(labels)).sum())
        total += len(labels)
    if total == 0:
        raise ValueError("No evaluation examples were given to measure the TFLite accuracy.")
    return {
        "accuracy": correct / total,
        "examples": total,
        "resolver": resolver,
        "runtime": runtime().name,
    }


def latency(flatbuffer: bytes, images: np.ndarray, repeats: int = 200, warmup: int = 20) -> dict:
    """Median and mean seconds per invoke on `images` (one batch), one thread."""
    it, resolver = interpreter(flatbuffer)
    output = _probabilities_index(it)
    for _ in range(warmup):
        _run(it, images, output)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        _run(it, images, output)
        times.append(time.perf_counter() - t)
    return {
        "median_s": float(np.median(times)),
        "mean_s": float(np.mean(times)),
        "batch": int(images.shape[0]),
        "repeats": repeats,
        "resolver": resolver,
    }
