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

The runtime side (measured in benchmarks/tflite_latency.py): XNNPACK does not
take sparse fully connected layers, so they run with the builtin sparse
kernels and the rest of the model with XNNPACK; XNNPACK refuses a model with a
sparse *and* int8 fully connected layer outright, so such a model runs with
the builtin kernels only (`interpreter` picks that and says so in `resolver`).
"""

import time

import numpy as np

from lth_tf.keras import tf

DENSE = "dense"
SPARSE = "sparse"
SPARSE_INT8 = "sparse_int8"
KINDS = (DENSE, SPARSE, SPARSE_INT8)


def convert(concrete_function, trackable, kind: str = SPARSE) -> bytes:
    """Converts a serving function to a TFLite flatbuffer.

    Args:
      concrete_function: the function to convert (e.g. a SavedModel signature's
        concrete function, preprocessing included).
      trackable: the object that owns its variables (frozen into constants).
      kind: 'dense' (plain float32), 'sparse' (float32 weights in the sparse
        tensor format) or 'sparse_int8' (sparse format and int8 weights).

    Returns:
      The flatbuffer's bytes.
    """
    if kind not in KINDS:
        raise ValueError(f"TFLite kind {kind!r} is not one of {', '.join(KINDS)}.")
    converter = tf.lite.TFLiteConverter.from_concrete_functions([concrete_function], trackable)
    if kind == SPARSE:
        converter.optimizations = [tf.lite.Optimize.EXPERIMENTAL_SPARSITY]
    elif kind == SPARSE_INT8:
        converter.optimizations = [
            tf.lite.Optimize.EXPERIMENTAL_SPARSITY,
            tf.lite.Optimize.DEFAULT,
        ]
    flatbuffer = converter.convert()
    return compact(flatbuffer) if kind == SPARSE else flatbuffer


# TFLite's DimensionType values (schema.fbs).
_DENSE, _SPARSE_CSR = 0, 1


def compact(flatbuffer: bytes) -> bytes:
    """Rewrites the 1x4-block-sparse float32 matrices of a TFLite model element-wise.

    Each such matrix (a fully connected kernel) is decoded to its dense values
    and stored again as rows of (column index, value) pairs, with the narrowest
    index type that holds its indices, whenever that takes fewer bytes than
    the blocks. The operators and every other tensor are left as they were,
    so the model computes the same function.

    Returns:
      The flatbuffer's bytes (the input, unchanged, when no matrix got smaller).
    """
    import flatbuffers
    from tensorflow.lite.python import schema_py_generated as schema

    model = schema.ModelT.InitFromObj(schema.Model.GetRootAsModel(flatbuffer, 0))
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
    builder = flatbuffers.Builder(len(flatbuffer))
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


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


def interpreter(flatbuffer: bytes, num_threads: int = 1):
    """A ready interpreter: XNNPACK where it can run the model, else the builtin kernels.

    Returns:
      (tf.lite.Interpreter, resolver name) with tensors allocated.
    """
    import warnings

    resolvers = tf.lite.experimental.OpResolverType
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tf.lite.Interpreter's deprecation notice
        try:
            it = tf.lite.Interpreter(model_content=flatbuffer, num_threads=num_threads)
            it.allocate_tensors()
            return it, "xnnpack"
        except RuntimeError:
            # XNNPACK refuses sparse int8 fully connected layers at prepare time.
            it = tf.lite.Interpreter(
                model_content=flatbuffer,
                num_threads=num_threads,
                experimental_op_resolver_type=resolvers.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
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
      {"accuracy", "examples", "resolver"} (resolver: "xnnpack" or "builtin").
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
    return {"accuracy": correct / total, "examples": total, "resolver": resolver}


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
