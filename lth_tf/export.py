"""`python -m lth_tf.export --run_dir=... [--round=N] [--tflite]`: ship the sparse network.

Writes, under <run_dir>/export/round_NN/:
  saved_model/   masks applied, tfmot wrappers stripped; a `serving_default`
                 signature taking raw uint8 images of the dataset's shape and
                 a `serving_float` one taking float pixels in [0, 255]; both
                 return class probabilities. Loads with plain tf.saved_model.load.
  model.tflite   with --tflite
  export.json    density per layer and overall measured again from the
                 reloaded SavedModel, the reloaded model's test accuracy next to
                 the round's recorded one, and the sizes of the dense and the
                 sparse export, raw and zip-compressed.
The default round is the sparsest IMP round whose test accuracy is within 0.2
points of the dense network's (the paper's "matching").
"""

import io
import os
import sys
import zipfile

import numpy as np
from absl import app, flags, logging

from lth_tf import files, flagdefs, paths, report, rounds, sparsity
from lth_tf.config import RunConfig
from lth_tf.keras import tf

MATCHING_POINTS = 0.002  # within 0.2 accuracy points of the dense network


class ExportError(ValueError):
    """The run or round cannot be exported."""


def load_run(run_dir: str) -> RunConfig:
    path = paths.config_file(run_dir)
    if not files.exists(path):
        raise ExportError(f"{run_dir} is not an lth_tf run directory (it has no config.json).")
    with tf.io.gfile.GFile(path) as f:
        return RunConfig.from_json(f.read())


def choose_round(run_dir: str) -> tuple[int, str]:
    """The sparsest finished IMP round that matches the dense network, and why."""
    imp = report.collect(run_dir).get("imp", {})
    if 0 not in imp:
        raise ExportError(f"{run_dir} has no finished dense round (round_00/summary.json).")
    dense = imp[0]["test_accuracy"]
    matching = [r for r, s in imp.items() if s["test_accuracy"] >= dense - MATCHING_POINTS]
    best = min(matching, key=lambda r: imp[r]["density"])
    why = (
        f"round {best}: the sparsest round ({100 * imp[best]['density']:.2f}% of weights) "
        f"within 0.2 points of the dense test accuracy {100 * dense:.2f}% "
        f"(it has {100 * imp[best]['test_accuracy']:.2f}%)"
    )
    return best, why


def _serving_module(model, mean, std, input_shape):
    mean = tf.constant(mean, tf.float32)
    std = tf.constant(std, tf.float32)

    class Serving(tf.Module):
        def __init__(self):
            super().__init__()
            self.model = model
            # Tracked explicitly so a plain tf.saved_model.load exposes them.
            self.model_variables = list(model.variables)

        def _probabilities(self, images):
            x = (tf.cast(images, tf.float32) / 255.0 - mean) / std
            return {"probabilities": tf.nn.softmax(self.model(x, training=False), axis=-1)}

        @tf.function(input_signature=[tf.TensorSpec([None, *input_shape], tf.uint8, "images")])
        def serve_uint8(self, images):
            return self._probabilities(images)

        @tf.function(input_signature=[tf.TensorSpec([None, *input_shape], tf.float32, "images")])
        def serve_float(self, images):
            return self._probabilities(images)

    return Serving()


def _save(model, data, directory):
    # Written beside its final name and renamed into place: a killed export never
    # leaves a half-written SavedModel where a reader (or TF Serving) looks.
    tmp = f"{directory}.tmp"
    for path in (tmp, f"{directory}.old"):
        if files.exists(path):
            tf.io.gfile.rmtree(path)
    module = _serving_module(model, data.mean, data.std, data.input_shape)
    tf.saved_model.save(
        module,
        tmp,
        signatures={"serving_default": module.serve_uint8, "serving_float": module.serve_float},
    )
    if files.exists(directory):
        tf.io.gfile.rename(directory, f"{directory}.old")
    tf.io.gfile.rename(tmp, directory)
    if files.exists(f"{directory}.old"):
        tf.io.gfile.rmtree(f"{directory}.old")


def _sizes(directory: str) -> dict:
    raw = 0
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as z:
        for root, _, names in tf.io.gfile.walk(directory):
            for name in names:
                path = os.path.join(root, name)
                with tf.io.gfile.GFile(path, "rb") as f:
                    blob = f.read()
                raw += len(blob)
                z.writestr(os.path.relpath(path, directory), blob)
    return {"raw_bytes": raw, "zip_bytes": len(buffer.getvalue())}


def measure(saved_model_path: str, data, batch_size: int) -> dict:
    """Reloads a SavedModel with plain TensorFlow; its densities and test accuracy."""
    loaded = tf.saved_model.load(saved_model_path)
    kernels = {}
    for var in loaded.model_variables:
        # Variables keep the name scope of the training wrapper, which tfmot names after
        # its class ('masked_layer_fc1/kernel:0'): report 'fc1/kernel'.
        *_, layer, weight = var.name.split(":")[0].split("/")
        for prefix in ("masked_layer_", "prune_low_magnitude_"):
            layer = layer.removeprefix(prefix)
        name = f"{layer}/{weight}"
        if name.endswith("/kernel"):
            kernels[name] = var.numpy()
    layers = {
        name: {
            "size": int(k.size),
            "nonzero": int(np.count_nonzero(k)),
            "density": float(np.count_nonzero(k) / k.size),
        }
        for name, k in sorted(kernels.items())
    }
    serve = loaded.signatures["serving_default"]
    correct = total = 0
    x_test, y_test = data.arrays.x_test, data.arrays.y_test
    for i in range(0, len(x_test), batch_size):
        probs = serve(images=tf.constant(x_test[i : i + batch_size]))["probabilities"].numpy()
        correct += int((probs.argmax(-1) == y_test[i : i + batch_size]).sum())
        total += len(probs)
    return {"layers": layers, "test_accuracy": correct / total}


def export(run_dir: str, round_index: int | None = None, tflite: bool = False, log=print) -> dict:
    """Exports a finished IMP round of a run; returns the export report."""
    config = load_run(run_dir)
    if round_index is None:
        round_index, why = choose_round(run_dir)
        log(f"Exporting {why}.")
    rdir = paths.round_dir(run_dir, round_index)
    summary_path = paths.summary_file(rdir)
    if not files.exists(summary_path):
        done = sorted(report.collect(run_dir).get("imp", {}))
        state = "is unfinished" if tf.io.gfile.isdir(rdir) else "does not exist"
        raise ExportError(f"Round {round_index} of {run_dir} {state}; finished rounds: {done}.")
    summary = files.read_json(summary_path)
    for rd in {paths.round_dir(run_dir, 0), rdir}:
        for needed in (paths.masks_file(rd), paths.checkpoint_file(rd, "final")):
            if not files.exists(needed):
                raise ExportError(
                    f"{needed} is missing: the run is damaged. Rerun "
                    "`python -m lth_tf.imp` with the run's flags to recompute it."
                )
    experiment = rounds.Experiment(config, run_dir, write=False, log=lambda *a: None)
    if not hasattr(experiment.data, "arrays"):
        raise ExportError(
            f"Export measures accuracy on in-memory datasets; {config.dataset} is not one."
        )

    def build(rd):
        sparsity.set_masks(experiment.model, files.read_npz(paths.masks_file(rd)))
        sparsity.set_weights(experiment.model, files.read_npz(paths.checkpoint_file(rd, "final")))
        return sparsity.strip(experiment.model)

    result = {"round": round_index, "recorded_test_accuracy": summary["test_accuracy"]}
    for name, rd in (("dense", paths.round_dir(run_dir, 0)), ("sparse", rdir)):
        directory = paths.saved_model_dir(run_dir, round_index)
        if name == "dense":
            directory = paths.join(paths.export_dir(run_dir, round_index), "dense_saved_model")
        plain = build(rd)
        _save(plain, experiment.data, directory)
        result[name] = {"path": directory, **_sizes(directory)}
        if name == "sparse" and tflite:
            flatbuffer = tf.lite.TFLiteConverter.from_saved_model(directory).convert()
            files.write_bytes(paths.tflite_file(run_dir, round_index), flatbuffer)
            result["tflite"] = {
                "path": paths.tflite_file(run_dir, round_index),
                "bytes": len(flatbuffer),
            }
    measured = measure(result["sparse"]["path"], experiment.data, config.batch_size)
    total = sum(v["size"] for v in measured["layers"].values())
    nonzero = sum(v["nonzero"] for v in measured["layers"].values())
    result.update(
        layers=measured["layers"],
        density_all_kernels=nonzero / total,
        density_prunable=summary["density"],
        exported_test_accuracy=measured["test_accuracy"],
        zip_ratio_sparse_over_dense=result["sparse"]["zip_bytes"] / result["dense"]["zip_bytes"],
        raw_ratio_sparse_over_dense=result["sparse"]["raw_bytes"] / result["dense"]["raw_bytes"],
    )
    files.write_json(paths.export_report_file(run_dir, round_index), result)
    report.write_report(run_dir)
    return result


def main(argv):
    del argv
    f = flags.FLAGS
    try:
        result = export(f.run_dir, f.round, f.tflite)
    except (ExportError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(
        f"Exported round {result['round']} to {result['sparse']['path']}\n"
        f"  test accuracy: exported {100 * result['exported_test_accuracy']:.2f}%, "
        f"recorded {100 * result['recorded_test_accuracy']:.2f}%\n"
        f"  density: {100 * result['density_all_kernels']:.2f}% of all kernel weights "
        f"({100 * result['density_prunable']:.2f}% of prunable)\n"
        f"  size: dense {result['dense']['raw_bytes']:,} B raw / {result['dense']['zip_bytes']:,} B zip; "
        f"sparse {result['sparse']['raw_bytes']:,} B raw / {result['sparse']['zip_bytes']:,} B zip "
        f"(zip ratio {result['zip_ratio_sparse_over_dense']:.3f})\n"
        f"  report: {paths.export_report_file(f.run_dir, result['round'])}"
    )
    return 0


def define_flags() -> None:
    """Defines this entry point's flags (lth_tf/flagdefs.py; idempotent)."""
    flagdefs.define_export_flags()


def run():
    define_flags()
    flagdefs.declare_key_flags(flagdefs.flag_names(flagdefs.define_export_flags))
    flags.mark_flag_as_required("run_dir")
    logging.set_verbosity(logging.WARNING)
    app.run(main)


if __name__ == "__main__":
    run()
