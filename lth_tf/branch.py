"""`python -m lth_tf.branch`: an experiment that branches off an existing run's round 0.

    python -m lth_tf.branch --run_dir=RUN --kind=rewind --rewind_step=500it --rounds=N
    python -m lth_tf.branch --run_dir=RUN --kind=lr_rewind --rounds=N
    python -m lth_tf.branch --run_dir=RUN --kind=finetune --finetune_lr=1e-4 \\
        --finetune_steps=2ep --rounds=N
    python -m lth_tf.branch --run_dir=RUN --kind=oneshot --densities=0.2,0.05,0.01

The branch reuses the run's dense round 0 and writes <RUN>/branches/<name>/
(one-shot: one branch per density, oneshot_<k>it_d<density reached, %>);
rerunning the command resumes it, or does nothing once it is done. The run's
report then shows the branch as one more series. The kinds are described in
lth_tf/branching.py; this module is only the command line.
"""

import contextlib
import dataclasses

from absl import app, flags, logging

from lth_tf import branching, cli, distribute, flagdefs, paths, reporting, rounds, rundir, runlock
from lth_tf.cli import StopRequest

FLAGS = flags.FLAGS

KEY_FLAGS = (
    "run_dir",
    "kind",
    "rewind_step",
    "rounds",
    "finetune_lr",
    "finetune_steps",
    "densities",
)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(
            f"Unexpected arguments {argv[1:]}; every option is a --flag.", exitcode=2
        )
    return cli.exit_code(_branch)


def _branch():
    run_dir = flagdefs.one_run_dir(FLAGS.run_dir)
    config = rundir.load_config(run_dir)
    requested = flagdefs.explicit_config_flags()
    branching.check_shares_round_0(config, requested)
    # What changes nothing computed may differ from the run's (e.g. where the data is).
    config = dataclasses.replace(
        config, **{k: v for k, v in requested.items() if k in branching.PROCESS_FIELDS}
    )
    strategy = distribute.get_strategy(FLAGS.strategy, num_gpus=FLAGS.num_gpus, tpu=FLAGS.tpu)
    chief = distribute.is_chief(strategy)
    experiment = rounds.Experiment(
        config,
        run_dir,
        strategy=strategy,
        checkpoint_seconds=FLAGS.checkpoint_seconds,
        write=chief,
        log=print if chief else (lambda *a: None),
    )
    # The chief writes the run (one writer per run directory); other workers write nothing.
    with runlock.hold(run_dir, "lth_tf.branch") if chief else contextlib.nullcontext():
        specs = branching.make_specs(
            experiment,
            FLAGS.kind,
            rewind_step=FLAGS.rewind_step,
            num_rounds=FLAGS.rounds,
            densities=[float(d) for d in FLAGS.densities or () if d],
            finetune_lr=FLAGS.finetune_lr,
            finetune_steps=FLAGS.finetune_steps,
        )
        # Their names: an older lth_tf's, where it made them.
        branches = [branching.Branch(experiment, spec) for spec in specs]
        for b in branches:
            b.run()
        if chief:
            print(reporting.write_report(run_dir))
            for b in branches:
                print(f"\nBranch {b.name}: {paths.branch_dir(run_dir, b.name)}")
    return 0


def define_flags() -> None:
    """Defines this entry point's flags (lth_tf/flagdefs.py; idempotent)."""
    flagdefs.define_branch_flags()


def run():
    StopRequest.install()
    define_flags()
    flagdefs.declare_key_flags(KEY_FLAGS)
    flags.mark_flag_as_required("run_dir")
    flags.mark_flag_as_required("kind")
    logging.set_verbosity(logging.WARNING)
    app.run(flagdefs.brief_usage_errors(main), flags_parser=flagdefs.parse_flags)


if __name__ == "__main__":
    run()
