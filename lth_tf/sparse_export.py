"""The sparse network as a plain SavedModel (`python -m lth_tf.export` is the command line).

Writes, under <run_dir>/export/round_NN/:
  saved_model/        masks applied, tfmot wrappers stripped, the dataset's
                      evaluation preprocessing built in. Loads with plain
                      tf.saved_model.load (no lth_tf, Keras or tfmot). Signatures,
                      each returning {"probabilities": [B, classes] float32,
                      "classes": [B] int64}:
                        serving_default       raw uint8 images "images"
                                              [B, *data.serving_shape]: MNIST and
                                              CIFAR their own shape; ImageNet any
                                              size (one size per batch), centre-
                                              cropped and resized as in evaluation
                        serving_bytes         "image_bytes" [B] tf.string of encoded
                                              JPEG/PNG/GIF/BMP images (what TF
                                              Serving clients send), decoded and
                                              preprocessed one by one
                        serving_float         like serving_default, float pixels 0-255
                        serving_preprocessed  "inputs": model inputs, already
                                              preprocessed as data.eval yields them
  dense_saved_model/  the dense (round 0) network, the same way, for the size comparison
  model_dense.tflite, model_sparse.tflite (TFLite's sparse tensor format)
                      with --tflite; model_sparse_int8.tflite with --tflite_int8.
                      They are serving_default converted (uint8 images in).
  export.json         density per layer and overall measured again from the
                      reloaded SavedModel; its accuracy on the evaluation split
                      (the test split; ImageNet's validation split) through the
                      dataset's own eval pipeline, next to the round's recorded
                      one; the sizes of the dense and sparse SavedModels, raw and
                      zip-compressed; each TFLite file's size, size ratio to the
                      dense TFLite file and accuracy on the same examples
                      (LiteRT's interpreter; tf.lite's without ai_edge_litert),
                      whether it loads with the interpreter's default options
                      and, if not, the option it `needs`.
The default round (lth_tf.rundir.choose_round) is the sparsest IMP round whose
test accuracy is within 0.2 points of the dense network's (the paper's "matching").
Accuracies are measured on one device (the reloaded SavedModel and the TFLite
interpreter are plain single-device programs).
"""

import dataclasses
import io
import os
import zipfile

import numpy as np

from lth_tf import files, paths, reporting, rounds, rundir, sparsity
from lth_tf import tflite as tflite_lib
from lth_tf.keras import tf

EVAL_SPLIT = "test"  # ImageNet's 'test' is its validation split (lth_tf.data.imagenet)
SIGNATURES = ("serving_default", "serving_bytes", "serving_float", "serving_preprocessed")


class ExportError(ValueError):
    """The run or round cannot be exported."""


def _serving_module(model, data) -> tf.Module:
    """A tf.Module whose functions are the SavedModel's signatures (see the module doc).

    Args:
      model: the plain (stripped) Keras model.
      data: the run's dataset: its `serving_shape`, `serving_preprocess` (a batch of
        raw images) and `serving_preprocess_encoded` (one encoded image) are the
        evaluation preprocessing the signatures build in.
    """
    raw_shape = tuple(data.serving_shape)
    input_spec = tf.TensorSpec(tuple(data.input_shape), tf.float32)

    # One tf.function for the network, traced once and called by every signature
    # (tracing ResNet-50 takes seconds; four signatures would trace it four times).
    @tf.function(input_signature=[tf.TensorSpec([None, *data.input_shape], tf.float32)])
    def outputs(inputs):
        # Mixed-precision models compute in (b)float16; serving answers in float32.
        logits = tf.cast(model(inputs, training=False), tf.float32)
        probabilities = tf.nn.softmax(logits, axis=-1)
        return {
            "probabilities": probabilities,
            "classes": tf.argmax(probabilities, axis=-1, output_type=tf.int64),
        }

    class Serving(tf.Module):
        def __init__(self):
            super().__init__()
            # Only the variables are tracked, not the Keras model: the SavedModel is
            # then plain TensorFlow functions (no Keras metadata, and no tracing of
            # every layer's call at save time).
            self.model_variables = list(model.variables)

        @tf.function(input_signature=[tf.TensorSpec([None, *raw_shape], tf.uint8, "images")])
        def serve_uint8(self, images):
            return outputs(data.serving_preprocess(images))

        @tf.function(input_signature=[tf.TensorSpec([None, *raw_shape], tf.float32, "images")])
        def serve_float(self, images):
            return outputs(data.serving_preprocess(images))

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string, "image_bytes")])
        def serve_bytes(self, image_bytes):
            inputs = tf.map_fn(
                data.serving_preprocess_encoded, image_bytes, fn_output_signature=input_spec
            )
            return outputs(inputs)

        @tf.function(
            input_signature=[tf.TensorSpec([None, *data.input_shape], tf.float32, "inputs")]
        )
        def serve_preprocessed(self, inputs):
            return outputs(inputs)

    return Serving()


def _save(module, directory):
    # Written beside its final name and renamed into place: a killed export never
    # leaves a half-written SavedModel where a reader (or TF Serving) looks.
    tmp = f"{directory}.tmp"
    for path in (tmp, f"{directory}.old"):
        if files.exists(path):
            files.remove_tree(path)
    tf.saved_model.save(
        module,
        tmp,
        signatures={
            "serving_default": module.serve_uint8,
            "serving_bytes": module.serve_bytes,
            "serving_float": module.serve_float,
            "serving_preprocessed": module.serve_preprocessed,
        },
    )
    if files.exists(directory):
        tf.io.gfile.rename(directory, f"{directory}.old")
    tf.io.gfile.rename(tmp, directory)
    if files.exists(f"{directory}.old"):
        files.remove_tree(f"{directory}.old")


def _sizes(directory: str) -> dict:
    # zlib's default level: level 9 took 7x as long on ResNet-50's 100 MB of float32
    # weights (a minute per SavedModel) for a file 0.4% smaller.
    raw = 0
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED, compresslevel=6) as z:
        for root, _, names in tf.io.gfile.walk(directory):
            for name in names:
                path = os.path.join(root, name)
                with tf.io.gfile.GFile(path, "rb") as f:
                    blob = f.read()
                raw += len(blob)
                z.writestr(os.path.relpath(path, directory), blob)
    return {"raw_bytes": raw, "zip_bytes": len(buffer.getvalue())}


def _capped(batches, limit: int | None):
    """(inputs, labels) numpy batches holding at most `limit` examples in all (None: all)."""
    seen = 0
    for inputs, labels in batches:
        if limit is not None:
            inputs, labels = inputs[: limit - seen], labels[: limit - seen]
        if len(labels) == 0:
            return
        yield inputs, labels
        seen += len(labels)
        if limit is not None and seen >= limit:
            return


def _check_eval_examples(eval_examples):
    if eval_examples is not None and (not isinstance(eval_examples, int) or eval_examples < 1):
        raise ValueError(
            f"eval_examples={eval_examples!r}; expected a positive number of examples, "
            "or None (the whole evaluation split)."
        )


def _layer_densities(variables) -> dict:
    kernels = {}
    for var in variables:
        # Variables keep the name scope of the training wrapper, which tfmot names after
        # its class ('masked_layer_fc1/kernel:0'): report 'fc1/kernel'.
        *_, layer, weight = var.name.split(":")[0].split("/")
        for prefix in ("masked_layer_", "prune_low_magnitude_"):
            layer = layer.removeprefix(prefix)
        name = f"{layer}/{weight}"
        if weight.endswith("kernel"):  # kernel, a DepthwiseConv2D's depthwise_kernel...
            kernels[name] = var.numpy()
    return {
        name: {
            "size": int(k.size),
            "nonzero": int(np.count_nonzero(k)),
            "density": float(np.count_nonzero(k) / k.size),
        }
        for name, k in sorted(kernels.items())
    }


def measure(
    saved_model_path: str,
    data,
    batch_size: int,
    eval_examples: int | None = None,
    split: str = EVAL_SPLIT,
) -> dict:
    """Reloads a SavedModel with plain TensorFlow; its densities and accuracy.

    The accuracy is measured through the dataset's own evaluation pipeline:
    `data.eval(split, batch_size)` batches, preprocessed exactly as in training-time
    evaluation, fed to the `serving_preprocessed` signature. Single device.

    Args:
      saved_model_path: a SavedModel written by `export`.
      data: the run's dataset (lth_tf.data.Dataset).
      batch_size: evaluation batch size.
      eval_examples: evaluate only the first this many examples (None: all).
      split: the split to evaluate.

    Returns:
      {"layers": {name: {size, nonzero, density}}, "test_accuracy": float,
       "examples": int}.
    """
    _check_eval_examples(eval_examples)
    loaded = tf.saved_model.load(saved_model_path)
    serve = loaded.signatures["serving_preprocessed"]
    correct = total = 0
    for inputs, labels in _capped(data.eval(split, batch_size).as_numpy_iterator(), eval_examples):
        classes = serve(inputs=tf.constant(inputs))["classes"].numpy()
        correct += int((classes == labels).sum())
        total += len(labels)
    if total == 0:
        raise ExportError(f"The {split} split of {data.name} has no examples to evaluate.")
    return {
        "layers": _layer_densities(loaded.model_variables),
        "test_accuracy": correct / total,
        "examples": total,
    }


def _raw_batches(data, split: str, batch_size: int, eval_examples: int | None):
    """Raw (uint8 images, labels) numpy batches of `split`, as serving_default takes them.

    Images of datasets served at any size (ImageNet) differ in size: one per batch.
    """
    fixed = all(d is not None for d in data.serving_shape)
    ds = data.raw_eval(split).batch(batch_size if fixed else 1)
    return _capped(ds.as_numpy_iterator(), eval_examples)


def _write_tflite(module, data, run_dir, round_index, kinds, batch_size, eval_examples, log):
    """Converts serving_default to each TFLite kind; file sizes and accuracies.

    Each file's accuracy is measured with LiteRT's interpreter (tf.lite's without
    ai_edge_litert) under its default options; a file those refuse is measured
    with the builtin kernels, and its entry and a log line say which option it needs.
    """
    function = module.serve_uint8.get_concrete_function()
    out = {}
    for kind in kinds:
        notes = []  # a rewrite skipped (lth_tf.tflite's schema check)
        flatbuffer = tflite_lib.convert(function, module, kind, log=notes.append)
        path = paths.tflite_file(run_dir, round_index, kind)
        files.write_bytes(path, flatbuffer)
        acc = tflite_lib.accuracy(
            flatbuffer, _raw_batches(data, EVAL_SPLIT, batch_size, eval_examples)
        )
        out[kind] = {
            "path": path,
            "bytes": len(flatbuffer),
            "test_accuracy": acc["accuracy"],
            "examples": acc["examples"],
            "resolver": acc["resolver"],
            "runtime": acc["runtime"],
            "loads_by_default": acc["resolver"] == "xnnpack",
            "notes": notes,
        }
        for note in notes:
            log(note)
        if acc["resolver"] != "xnnpack":
            out[kind]["needs"] = tflite_lib.BUILTIN_OPTION
            log(
                f"TFLite {kind}: {path} does not load in {acc['runtime']}'s default "
                f"interpreter (XNNPACK refuses it); load it with Interpreter(model_path=..., "
                f"{tflite_lib.BUILTIN_OPTION})."
            )
        log(f"TFLite {kind}: {len(flatbuffer):,} B, test accuracy {100 * acc['accuracy']:.2f}%.")
    for entry in out.values():
        entry["size_ratio_vs_dense"] = entry["bytes"] / out[tflite_lib.DENSE]["bytes"]
    return out


def _finished_round(run_dir: str, round_index: int) -> tuple:
    """(directory, summary) of a finished IMP round whose masks and weights are all there.

    Raises:
      ExportError: the round is unfinished or missing, or a file it needs is gone.
    """
    rdir = paths.round_dir(run_dir, round_index)
    summary_path = paths.summary_file(rdir)
    if not files.exists(summary_path):
        done = sorted(rundir.finished_rounds(run_dir).get(rundir.IMP, {}))
        state = "is unfinished" if tf.io.gfile.isdir(rdir) else "does not exist"
        raise ExportError(f"Round {round_index} of {run_dir} {state}; finished rounds: {done}.")
    for rd in {paths.round_dir(run_dir, 0), rdir}:
        for needed in (paths.masks_file(rd), paths.checkpoint_file(rd, "final")):
            if not files.exists(needed):
                raise ExportError(
                    f"{needed} is missing: the run is damaged. Rerun "
                    "`python -m lth_tf.imp` with the run's flags to recompute it."
                )
    return rdir, files.read_json(summary_path)


def export(
    run_dir: str,
    round_index: int | None = None,
    tflite: bool = False,
    log=print,
    *,
    tflite_int8: bool = False,
    eval_examples: int | None = None,
    data=None,
    overrides=None,
) -> dict:
    """Exports a finished IMP round of a run; returns the export report.

    Args:
      run_dir: an lth_tf run directory.
      round_index: the IMP round to export (default: lth_tf.rundir.choose_round's).
      tflite: also write dense and sparse TFLite files (and measure their accuracy).
      log: a print-like function for progress lines.
      tflite_int8: also write a sparse TFLite file with int8 weights (implies tflite).
      eval_examples: measure accuracies on the first this many examples of the
        evaluation split (None: all of it).
      data: the dataset object the run was trained with, when it is not what the
        run's config loads (as for lth_tf.rounds.Experiment, e.g. ImageNet at a
        non-default image size). Default: loaded from the config.
      overrides: config fields set for this export over the run's config.json
        (lth_tf.flagdefs.OVERRIDE_FIELDS, e.g. data_dir after moving the run).

    Raises:
      RunDirError: run_dir is not a run, or has no finished dense round.
      ExportError: the round is unfinished or missing, or the run is damaged.
      ValueError: eval_examples is not a positive integer.
    """
    _check_eval_examples(eval_examples)
    config = dataclasses.replace(rundir.load_config(run_dir), **(overrides or {}))
    if round_index is None:
        round_index, why = rundir.choose_round(run_dir)
        log(f"Exporting {why}.")
    rdir, summary = _finished_round(run_dir, round_index)
    experiment = rounds.Experiment(config, run_dir, write=False, log=lambda *a: None, data=data)
    data = experiment.data

    def build(rd):
        sparsity.set_masks(experiment.model, files.read_npz(paths.masks_file(rd)))
        sparsity.set_weights(experiment.model, files.read_npz(paths.checkpoint_file(rd, "final")))
        return sparsity.strip(experiment.model)

    result = {"round": round_index, "recorded_test_accuracy": summary["test_accuracy"]}
    # The stripped models share the training model's variables, so each network is
    # saved (and converted) before the next one is loaded: dense first, the ticket last.
    for name, rd, directory in (
        ("dense", paths.round_dir(run_dir, 0), paths.dense_saved_model_dir(run_dir, round_index)),
        ("sparse", rdir, paths.saved_model_dir(run_dir, round_index)),
    ):
        module = _serving_module(build(rd), data)
        _save(module, directory)
        result[name] = {"path": directory, **_sizes(directory)}
    if tflite or tflite_int8:
        kinds = [tflite_lib.DENSE, tflite_lib.SPARSE]
        if tflite_int8:
            kinds.append(tflite_lib.SPARSE_INT8)
        # `module` is the ticket's: "dense" here is the same network stored densely.
        result["tflite"] = _write_tflite(
            module, data, run_dir, round_index, kinds, config.batch_size, eval_examples, log
        )
    measured = measure(result["sparse"]["path"], data, config.batch_size, eval_examples)
    total = sum(v["size"] for v in measured["layers"].values())
    nonzero = sum(v["nonzero"] for v in measured["layers"].values())
    result.update(
        layers=measured["layers"],
        # Layers with weights that no round masks (lth_tf.sparsity.unmasked_layers).
        unmasked_layers=sparsity.unmasked_layers(experiment.model),
        density_all_kernels=nonzero / total,
        density_prunable=summary["density"],
        exported_test_accuracy=measured["test_accuracy"],
        eval_split=EVAL_SPLIT,
        eval_examples=measured["examples"],
        signatures=list(SIGNATURES),
        zip_ratio_sparse_over_dense=result["sparse"]["zip_bytes"] / result["dense"]["zip_bytes"],
        raw_ratio_sparse_over_dense=result["sparse"]["raw_bytes"] / result["dense"]["raw_bytes"],
    )
    files.write_json(paths.export_report_file(run_dir, round_index), result)
    reporting.write_report(run_dir)
    return result
