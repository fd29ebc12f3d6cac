"""Tables and plots of a run: `python -m lth_tf.report --run_dir=...`.

Writes report.md (accuracy-vs-density table for IMP and each control, per-layer
densities, stability and export sections) and accuracy_vs_density.png into the
run directory, and prints the table. The reading and formatting is
lth_tf/reporting.py; this module is only the command line.
"""

import sys

from absl import app, flags

from lth_tf import flagdefs, paths, reporting


def main(argv):
    del argv
    try:
        print(reporting.write_report(flags.FLAGS.run_dir))
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(
        f"\nWrote {paths.report_file(flags.FLAGS.run_dir)} and {paths.plot_file(flags.FLAGS.run_dir)}"
    )


def define_flags() -> None:
    """Defines this entry point's flags (lth_tf/flagdefs.py; idempotent)."""
    flagdefs.define_report_flags()


def run():
    define_flags()
    flagdefs.declare_key_flags(flagdefs.flag_names(flagdefs.define_report_flags))
    flags.mark_flag_as_required("run_dir")
    app.run(main)


if __name__ == "__main__":
    run()
