"""Tables and plots of runs: `python -m lth_tf.report --run_dir=... [--run_dir=...] [--out=DIR]`.

One --run_dir (a run, or a replicate group whose replicate_N are runs): writes
report.md (accuracy-vs-density table for IMP and each control, test accuracy at
early stopping and the early-stopping step, matching rounds, per-layer
densities, stability and export sections), report.json and
accuracy_vs_density.png into it (or into --out), and prints the table. For a
group the numbers are mean ± std [min, max] over the replicates.

Several --run_dir: one comparison table and figure, each run labelled by what
differs between the configs, written to --out (default: a comparison_<hash>
directory next to the runs); nothing is written into the compared runs.

The reading and formatting is lth_tf/reporting.py; this module is only the
command line.
"""

from absl import app, flags

from lth_tf import cli, flagdefs, paths, reporting


def main(argv):
    del argv
    return cli.exit_code(_report)


def _report():
    run_dirs, out = flags.FLAGS.run_dir, flags.FLAGS.out
    if len(run_dirs) == 1:
        out = out or run_dirs[0]
        print(reporting.write_report(run_dirs[0], out=out))
    else:
        out, table = reporting.write_comparison(run_dirs, out=out)
        print(table)
    print(
        f"\nWrote {paths.report_file(out)}, {paths.report_json_file(out)} and "
        f"{paths.plot_file(out)}"
    )


def define_flags() -> None:
    """Defines this entry point's flags (lth_tf/flagdefs.py; idempotent)."""
    flagdefs.define_report_flags()


def run():
    define_flags()
    flagdefs.declare_key_flags(flagdefs.flag_names(flagdefs.define_report_flags))
    flags.mark_flag_as_required("run_dir")
    app.run(main, flags_parser=flagdefs.parse_flags)


if __name__ == "__main__":
    run()
