"""`python -m lth_tf.stability`: instability (linear mode connectivity) and weight distances.

    python -m lth_tf.stability --run_dir=RUN --round=R --rewind_steps=0,500it [--repeats=3]

Trains two copies of round R's subnetwork from each W_k with different data
orders (--repeats pairs, 3 by default as the LMC paper), measures the error
barrier along the line between them and the L2 distances (what is measured,
and how, is lth_tf/linear_mode.py's docstring). Round R must be finished. At
R >= 1 each k is analysed with its own IMP mask, as the LMC paper: IMP rewound
to k (the branch rewind_<k>it, trained first when missing) for another k than
the run's; --shared_mask uses the run's round R mask for every k instead.
--subnetwork=random_prune|random_reinit analyses the controls at the same
density, --branch=NAME the round's mask of a branch (lth_tf.branch) for every
k (the branch's own k is then the default k). The
copies train under --strategy (--num_gpus, --tpu: the same flags as imp), with
the run's own mixed precision; --data_dir, --jit_compile and
--steps_per_execution, when given, replace the values in the run's config.json
for this command (e.g. after moving the run to another host). Results go under <run_dir>/stability/ and into
the run's report.md; this module is only the command line.
"""

from absl import app, flags, logging

from lth_tf import (
    cli,
    distribute,
    files,
    flagdefs,
    linear_mode,
    paths,
    reporting,
    rundir,
    runlock,
    steps,
)
from lth_tf.cli import StopRequest


def main(argv):
    del argv
    return cli.exit_code(_stability)


def _stability():
    f = flags.FLAGS
    run_dir = flagdefs.one_run_dir(f.run_dir)
    if f.branch is not None:
        check_branch(run_dir, f.branch)
    strategy = distribute.get_strategy(f.strategy, num_gpus=f.num_gpus, tpu=f.tpu)
    StopRequest.install()  # again: a multi-worker strategy took SIGTERM over
    chief = distribute.is_chief(strategy)
    analysis = linear_mode.Stability(
        run_dir,
        strategy=strategy,
        log=print if chief else (lambda *a: None),
        num_alphas=f.num_alphas,
        repeats=f.repeats,
        recompute_bn=f.recompute_bn,
        eval_examples=f.eval_examples,
        overrides=flagdefs.config_overrides(),  # --data_dir, speed: over config.json's
    )
    spe = analysis.schedule.steps_per_epoch
    default = analysis.config.rewind_step
    if f.branch is not None:
        described = paths.branch_file(run_dir, f.branch)
        if files.exists(described):
            default = files.read_json(described)["rewind_step"]  # the branch's own k
    texts = f.rewind_steps or [default]
    total, training_steps = analysis.schedule.total, analysis.config.training_steps
    ks = [steps.rewind_point(t, spe, total, training_steps, "rewind_steps") for t in texts]
    if f.branch is not None:
        analysis.masks_of(f.round, f.branch)  # a branch that is not there: the known ones
    # One writer per directory: the run (the chief), or a worker's scratch copy.
    with runlock.hold(analysis.out_dir, "lth_tf.stability", create=True):
        analysis.sweep(
            f.round, ks, subnetwork=f.subnetwork, branch=f.branch, shared_mask=f.shared_mask
        )
        if not chief:
            return 0  # the chief writes the report
        reporting.write_report(run_dir)
    print(reporting.stability_table(run_dir))
    series = linear_mode.series_name(f.subnetwork, f.branch)
    print(f"\nPlots: {paths.stability_dir(run_dir, f.round, series)}")
    return 0


def check_branch(run_dir: str, branch: str) -> None:
    """Refuses a --branch that is not a name, or not one of the run's branches.

    Raises:
      ValueError: saying what was received and listing the run's branches.
    """
    paths.check_name(branch, "--branch", "the name of one of the run's branches")
    rundir.config_json(run_dir)  # not a run: say so, not "no such branch"
    known = rundir.branches(run_dir)
    if branch not in known:
        raise ValueError(
            f"--branch={branch}: {run_dir} has no such branch (no "
            f"{paths.branch_dir(run_dir, branch)}). Its branches: {', '.join(known) or 'none'}. "
            "Pass one of them, or make the branch with `python -m lth_tf.branch` first."
        )


def define_flags() -> None:
    """Defines this entry point's flags (lth_tf/flagdefs.py; idempotent)."""
    flagdefs.define_stability_flags()


def run():
    define_flags()
    flagdefs.declare_key_flags(flagdefs.flag_names(flagdefs.define_stability_flags))
    flags.mark_flag_as_required("run_dir")
    logging.set_verbosity(logging.WARNING)
    StopRequest.install()
    app.run(main, flags_parser=flagdefs.parse_flags)


if __name__ == "__main__":
    run()
