"""TFLite files of a ticket: a dense one and one in TFLite's sparse tensor format.

A pruned Keras model converted the ordinary way is as large as the dense one:
its zeros are stored. With `tf.lite.Optimize.EXPERIMENTAL_SPARSITY` the
converter stores each constant weight tensor that is sparse enough in TFLite's
sparse format (CSR-like: a dense outer dimension, compressed inner indices), so
the file shrinks with the density. Optionally the weights are also quantised to
int8 (dynamic-range: int8 weights, float activations).

The runtime side (measured in benchmarks/tflite_latency.py): the builtin
FULLY_CONNECTED kernel computes with sparse weights directly; XNNPACK cannot
delegate a sparse *and* int8 fully connected layer, so such a model runs with
the builtin kernels (`interpreter` picks that and says so in `resolver`).
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
    return converter.convert()


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
