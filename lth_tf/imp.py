"""`python -m lth_tf.imp`: iterative magnitude pruning with rewinding.

With no flags it runs the MNIST demo: LeNet-300-100 on the bundled real MNIST,
global IMP at 20% per round for 8 rounds with the random-reinitialisation
control, and prints the accuracy-vs-density table. `--flagfile=flags/...`
runs a paper experiment. Rerunning the same command resumes the run.
"""

import sys

from absl import app, flags, logging

from lth_tf import distribute, flagdefs, paths, report, rounds
from lth_tf.keras import keras, tf

FLAGS = flags.FLAGS


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments {argv[1:]}; every option is a --flag.")
    try:
        config = flagdefs.config_from_flags()
    except ValueError as e:
        raise app.UsageError(str(e)) from None
    run_dir = paths.join(FLAGS.root_dir, FLAGS.run_name or paths.run_name(config))
    if FLAGS.print_config:
        print(f"Run directory: {run_dir}\n{config.to_json()}")
        return 0
    if FLAGS.deterministic:
        keras.utils.set_random_seed(config.seed)
        tf.config.experimental.enable_op_determinism()
    try:
        strategy = distribute.get_strategy(FLAGS.strategy, num_gpus=FLAGS.num_gpus, tpu=FLAGS.tpu)
    except distribute.StrategyError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    chief = distribute.is_chief(strategy)
    my_dir = distribute.worker_run_dir(run_dir, strategy)
    log = print if chief else (lambda *a: None)
    try:
        # Built first: it loads the data and checks the schedule (e.g. a rewind step
        # past the end) without writing anything, so bad input leaves no run directory.
        experiment = rounds.Experiment(
            config, my_dir, strategy=strategy, checkpoint_seconds=FLAGS.checkpoint_seconds, log=log
        )
        rounds.open_run_dir(config, my_dir)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    log(f"Run directory: {run_dir} ({strategy.num_replicas_in_sync} replica(s))")
    if config.rounds == 0:
        log("No --rounds or --target_density given: training the dense network (round 0) only.")
    experiment.run()
    if chief:
        print(report.write_report(run_dir))
        print(f"\nReport: {paths.report_file(run_dir)}\nPlot:   {paths.plot_file(run_dir)}")
    return 0


def run():
    flagdefs.define_train_flags()
    flagdefs.define_prune_flags()
    flagdefs.define_distribute_flags()
    flags.DEFINE_boolean(
        "print_config", False, "Print the resolved config and run directory; train nothing."
    )
    logging.set_verbosity(logging.WARNING)
    app.run(main)


if __name__ == "__main__":
    run()
