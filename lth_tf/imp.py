"""`python -m lth_tf.imp`: iterative magnitude pruning with rewinding.

With no flags it runs the MNIST demo: LeNet-300-100 on the bundled real MNIST,
global IMP at 20% per round for 15 rounds (to 3.5% density) with the random-reinitialisation
control, and prints the accuracy-vs-density table. `--flagfile=flags/...`
runs a paper experiment. Rerunning the same command resumes the run.
"""

import dataclasses
import os
import sys

from absl import app, flags, logging

from lth_tf import (
    cli,
    distribute,
    files,
    flagdefs,
    masks,
    paths,
    reporting,
    rounds,
    rundir,
    runlock,
)
from lth_tf.cli import StopRequest
from lth_tf.keras import keras, tf

FLAGS = flags.FLAGS


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(
            f"Unexpected arguments {argv[1:]}; every option is a --flag.", exitcode=2
        )
    try:
        config = flagdefs.config_from_flags()
    except ValueError as e:
        raise app.UsageError(str(e), exitcode=2) from None
    # --replicate=i: one member of the group --replicates=N writes (a job of a job array).
    members = [FLAGS.replicate] if FLAGS.replicate else range(1, FLAGS.replicates + 1)
    group = FLAGS.replicates > 1 or FLAGS.replicate is not None
    if FLAGS.run_name:
        out_dir = paths.join(FLAGS.root_dir, FLAGS.run_name)
    else:  # the default name, or the directory an earlier spelling of this run has
        out_dir = rundir.find_run_dir(FLAGS.root_dir, config, group=group)
    if not group:
        runs = [(config, out_dir)]
    else:
        runs = [(replicate_config(config, i), paths.replicate_dir(out_dir, i)) for i in members]
    # A run resumes with the fields it recorded that no flag sets (its warm-up form).
    runs = [(rundir.resumed_config(c, d), d) for c, d in runs]
    if FLAGS.print_config:
        for c, d in runs:
            print(f"Run directory: {d}\n{c.to_json()}")
        return 0
    problem = _root_dir_problem(FLAGS.root_dir) or _group_problem(
        out_dir, FLAGS.replicates, FLAGS.replicate
    )
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    if FLAGS.deterministic:
        tf.config.experimental.enable_op_determinism()
    try:
        strategy = distribute.get_strategy(FLAGS.strategy, num_gpus=FLAGS.num_gpus, tpu=FLAGS.tpu)
    except distribute.StrategyError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    StopRequest.install()  # again: a multi-worker strategy took SIGTERM over
    chief = distribute.is_chief(strategy)
    log = print if chief else (lambda *a: None)
    if not FLAGS.run_name:
        _note_replay_run(config, out_dir, group, log)
    for i, (c, run_dir) in zip(members, runs, strict=True):
        if FLAGS.replicate:
            log(f"=== replicate {i} of group {out_dir}: seed {c.seed}, data_seed {c.data_seed}")
        elif len(runs) > 1:
            log(f"=== replicate {i}/{len(runs)}: seed {c.seed}, data_seed {c.data_seed}")
        code = _run_one(c, run_dir, strategy, log)
        if code:
            return code
    if chief:
        print(write_group_report(out_dir) if group else reporting.write_report(out_dir))
        print(f"\nReport: {paths.report_file(out_dir)}\nPlot:   {paths.plot_file(out_dir)}")
    return 0


def _note_replay_run(config, out_dir: str, group: bool, log) -> None:
    """Says so when a new per_round run starts beside this command's replay run.

    Runs written before --data_order existed replay round 0's data order: the
    same command now starts the papers' per_round run in another directory.
    """
    if config.data_order != "per_round" or tf.io.gfile.exists(out_dir):
        return
    replay = dataclasses.replace(config, data_order="replay")
    old = rundir.find_run_dir(FLAGS.root_dir, replay, group=group)
    if tf.io.gfile.exists(paths.config_file(paths.replicate_dir(old, 1) if group else old)):
        log(
            f"Note: {old} holds this experiment with --data_order=replay (every round on "
            "round 0's batches from k; runs written before --data_order existed). Starting "
            f"the per_round run in {out_dir}; add --data_order=replay to resume that one."
        )


def replicate_configs(config, n: int) -> list:
    """The configs of n replicates: replicate i (1-based) has seed+i-1 and data_seed+i-1."""
    return [replicate_config(config, i) for i in range(1, n + 1)]


def replicate_config(config, i: int):
    """Replicate i (1-based) of `config`'s group: seed+i-1 and data_seed+i-1."""
    return dataclasses.replace(config, seed=config.seed + i - 1, data_seed=config.data_seed + i - 1)


def write_group_report(group_dir: str, attempts: int = 5) -> str:
    """Writes the group's report (reporting.write_report) from what has finished; returns its table.

    The replicates of a job array finish in their own processes, each writing the
    group's report. A report read before another replicate's round was written
    and written after that replicate's own report would hide the round: so the
    report is written again while what it was read from has changed since (at
    most `attempts` times). The last report written then holds every round
    finished before its writer checked, and a round finished later is written
    by its own process after that.
    """
    for _ in range(attempts):
        before = _finished(group_dir)
        text = reporting.write_report(group_dir)
        if _finished(group_dir) == before:
            break
    return text


def _finished(group_dir: str) -> list:
    """The group's replicates and the rounds each has finished (a finished round never changes)."""
    return [
        (d, {b: sorted(rs) for b, rs in rundir.finished_rounds(d).items()})
        for d in rundir.replicate_dirs(group_dir)
    ]


def _run_one(config, run_dir, strategy, log) -> int:
    """Runs (or resumes) one run; returns a non-zero exit code on failure (lth_tf.cli)."""
    if FLAGS.deterministic:
        keras.utils.set_random_seed(config.seed)
    my_dir = distribute.worker_run_dir(run_dir, strategy)

    def work():
        # Built first: it loads the data and checks the schedule (e.g. a rewind step
        # past the end) without writing anything, so bad input leaves no run directory.
        experiment = rounds.Experiment(
            config,
            my_dir,
            strategy=strategy,
            checkpoint_seconds=FLAGS.checkpoint_seconds,
            log=log,
            rewind_points=[k for k in FLAGS.rewind_steps or () if k],
        )
        check_keeps_weights(experiment)
        rundir.open_run_dir(config, my_dir, write=False)  # a refusal writes nothing
        # One writer per directory: each worker of a multi-worker run has its own.
        with runlock.hold(my_dir, "lth_tf.imp", create=True):
            rundir.open_run_dir(config, my_dir)  # again under the lock
            devices = strategy.num_replicas_in_sync  # a replica per device
            log(f"Run directory: {run_dir} ({devices} device{'s' if devices != 1 else ''})")
            for line in flagdefs.protocol_lines(config):
                log(line)
            if experiment.unmasked:
                dense = ", ".join(f"{n} ({kind})" for n, kind in experiment.unmasked.items())
                log(
                    f"Left dense in every round (lth_tf masks Dense and convolution kernels): {dense}."
                )
            experiment.run()

    return cli.exit_code(work)


def check_keeps_weights(experiment) -> None:
    """Refuses a pruning protocol that leaves a layer with no weight (nothing written yet).

    Checked against the model's own layer sizes, once it is built: e.g.
    --target_density=1e-9 would prune every weight of LeNet and train to chance.

    Raises:
      ValueError: naming the layer, the round and what to change.
    """
    config = experiment.config
    sizes = {n: experiment.initial_weights[f"{n}/kernel"].size for n in experiment.layers}
    fraction = rounds.round_fraction(config)
    emptied = masks.emptied_layer(
        sizes, experiment.rates, fraction, config.rounds, config.prune_scope
    )
    if emptied is None:
        return
    name, r, size, rate = emptied
    rounds_text = f"{config.rounds} round{'s' if config.rounds != 1 else ''}"
    if config.target_density is not None:
        asked = f"--target_density={config.target_density:g} in {rounds_text}"
    else:
        asked = f"--prune_fraction={config.prune_fraction:g} for {rounds_text}"
    raise ValueError(
        f"{asked} would leave layer {name} ({size:,} weights, prune rate {rate:g}) with no "
        f"weight by round {r}: the network could only guess. Choose a larger --target_density, "
        "fewer --rounds or a smaller --prune_fraction (or a lower rate for that layer)."
    )


def _group_problem(out_dir: str, replicates: int, replicate: int | None = None) -> str | None:
    """Why out_dir cannot hold this invocation's run or replicate group (nothing written).

    replicate: --replicate=i (one member of the group), or None.
    """
    has_config = files.exists(paths.config_file(out_dir))
    if (replicates > 1 or replicate is not None) and has_config:
        asked = (
            f"--replicate={replicate}" if replicate is not None else f"--replicates={replicates}"
        )
        return (
            f"{out_dir} holds a single run, not a replicate group: {asked} "
            "would write its replicates inside it. Choose another --run_name for the group."
        )
    if replicates == 1 and replicate is None and not has_config and tf.io.gfile.isdir(out_dir):
        names = [n.rstrip("/") for n in tf.io.gfile.listdir(out_dir)]
        if any(paths.REPLICATE_RE.match(n) for n in names):
            return (
                f"{out_dir} is a replicate group (it holds {', '.join(sorted(names))}). Rerun "
                "with the group's --replicates=N to extend or resume it (or --replicate=i for "
                "its member i), or choose another --run_name for a single run."
            )
    return None


def _root_dir_problem(root: str) -> str | None:
    """Why runs cannot be written under `root` (checked before anything is written)."""
    if "://" in root:  # gs:// and other remote file systems: checked on first write
        return None
    path = os.path.abspath(root)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    if not os.path.isdir(path):
        return (
            f"--root_dir={root}: {path} is a file, not a directory. Choose a directory for "
            "the runs, e.g. --root_dir=runs."
        )
    if not os.access(path, os.W_OK | os.X_OK):
        return (
            f"--root_dir={root}: {path} is not writable by this user. Choose a writable "
            "directory, or fix its permissions."
        )
    return None


def define_flags() -> None:
    """Defines this entry point's flags (lth_tf/flagdefs.py; idempotent)."""
    flagdefs.define_imp_flags()


def run():
    StopRequest.install()
    define_flags()
    flagdefs.declare_key_flags(flagdefs.IMP_KEY_FLAGS)
    logging.set_verbosity(logging.WARNING)
    app.run(flagdefs.brief_usage_errors(main), flags_parser=flagdefs.parse_flags)


if __name__ == "__main__":
    run()
