"""`python -m lth_tf.export --run_dir=... [--round=N] [--tflite [--tflite_int8]] [--eval_examples=N]`.

--data_dir, when given, replaces the data_dir of the run's config.json for this
command (e.g. after moving the run to another host).

Ships the sparse network of a finished round. Writes, under <run_dir>/export/round_NN/:
  saved_model/   masks applied, tfmot wrappers stripped, the dataset's evaluation
                 preprocessing built in; loads with plain tf.saved_model.load.
                 Signatures (each returns "probabilities" and "classes"):
                 serving_default (raw uint8 images; ImageNet: any size),
                 serving_bytes (encoded JPEG/PNG strings), serving_float (float
                 pixels 0-255), serving_preprocessed (model inputs).
  model_dense.tflite, model_sparse.tflite   with --tflite (sparse: TFLite's sparse
                 tensor format); model_sparse_int8.tflite with --tflite_int8
  export.json    density per layer and overall measured again from the reloaded
                 SavedModel, its accuracy on the evaluation split (first
                 --eval_examples examples) next to the round's recorded one, and
                 the sizes of the dense and sparse exports (SavedModel raw and zip,
                 TFLite files) with the accuracy of each TFLite model.
The default round is the sparsest IMP round whose test accuracy is within 0.2
points of the dense network's (the paper's "matching").
The export itself is lth_tf/sparse_export.py; this module is only the command line.
"""

from absl import app, flags, logging

from lth_tf import cli, flagdefs, paths, runlock, sparse_export


def main(argv):
    del argv
    f = flags.FLAGS
    return cli.exit_code(lambda: _export(f))


def _export(f):
    run_dir = flagdefs.one_run_dir(f.run_dir)
    with runlock.hold(run_dir, "lth_tf.export"):  # one writer per run directory
        result = sparse_export.export(
            run_dir,
            f.round,
            f.tflite,
            tflite_int8=f.tflite_int8,
            eval_examples=f.eval_examples or None,  # 0: all
            overrides=flagdefs.config_overrides(),  # --data_dir over config.json's
        )
    print(
        f"Exported round {result['round']} to {result['sparse']['path']}\n"
        f"  test accuracy: exported {100 * result['exported_test_accuracy']:.2f}%, "
        f"recorded {100 * result['recorded_test_accuracy']:.2f}%\n"
        f"  density: {100 * result['density_all_kernels']:.2f}% of all kernel weights "
        f"({100 * result['density_prunable']:.2f}% of prunable)\n"
        f"  size: dense {result['dense']['raw_bytes']:,} B raw / {result['dense']['zip_bytes']:,} B zip; "
        f"sparse {result['sparse']['raw_bytes']:,} B raw / {result['sparse']['zip_bytes']:,} B zip "
        f"(zip ratio {result['zip_ratio_sparse_over_dense']:.3f})\n"
        + "".join(
            f"  TFLite {kind}: {t['bytes']:,} B ({t['size_ratio_vs_dense']:.3f} of dense), "
            f"test accuracy {100 * t['test_accuracy']:.2f}%\n"
            for kind, t in result.get("tflite", {}).items()
        )
        + f"  accuracies on the first {result['eval_examples']:,} examples of the "
        f"{result['eval_split']} split\n"
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
    app.run(main, flags_parser=flagdefs.parse_flags)


if __name__ == "__main__":
    run()
