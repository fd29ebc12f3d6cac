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
The export itself is lth_tf/sparse_export.py; this module is only the command line.
"""

import sys

from absl import app, flags, logging

from lth_tf import flagdefs, paths, sparse_export


def main(argv):
    del argv
    f = flags.FLAGS
    try:
        run_dir = flagdefs.one_run_dir(f.run_dir)
        result = sparse_export.export(run_dir, f.round, f.tflite)
    except (sparse_export.ExportError, ValueError, FileNotFoundError) as e:
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
        f"  report: {paths.export_report_file(run_dir, result['round'])}"
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
