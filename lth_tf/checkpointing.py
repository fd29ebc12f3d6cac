"""Mid-round checkpoints: one checkpointer per round, and when to save or stop.

A round is resumable from its last mid-round TF checkpoint (model, masks,
optimizer state, its step counter and the round's step offset). Two pieces:

- `RoundCheckpointer`: the round's checkpoint directory with one
  tf.train.CheckpointManager: restore the latest, save at a step, discard once
  the round is finished.
- `CheckpointPolicy`: a Keras callback deciding when to save and when to stop:
  at evaluation-period ends and mid-period once `seconds` passed since the
  last save (preemptible machines), never a diverged (NaN) state, and on
  SIGINT/SIGTERM (`StopRequest`) save then stop with `Interrupted`. The clock
  and the signal state are arguments, so its decisions are unit-tested
  without a subprocess.

Multi-worker runs (MultiWorkerMirroredStrategy): the workers run the same
program in lock step, joined by collectives, so a worker that stops alone
leaves its peers blocked in the next all-reduce. Three rules keep them
together (`WorkerAgreement`: one tiny all-gather over the workers):
- they save by step (every period end), never by their own clocks;
- a stop request is agreed: at every batch and period end each worker
  shares whether it received a signal; when any did, all save at that same
  step and stop (the `PreemptionCheckpointHandler` idea, with lth_tf's own
  checkpoints and signal handling);
- a restart resumes every worker from the same step: each worker keeps its
  two newest checkpoints in its own directory (no shared file system needed)
  and all restore the newest step that every worker has, so a kill between
  two workers' writes costs one period, never a divergence;
- a round ends alike on every worker: all write final.npz, meet, then write
  summary.json, and a restart that finds the round finished on some workers
  only completes it on the others from their final.npz (lth_tf.rounds).
TPU runs are single-client (one process drives every TPU core), so the
process's own signal is already the whole run's decision.
"""

import math
import time

from lth_tf import files
from lth_tf.callbacks import Interrupted, StepCallback, StopRequest
from lth_tf.keras import tf
from lth_tf.rundir import CorruptRunError

# Under multi-worker training, the workers agree on a stop request at most every
# this many steps within a period (and at every period end): a preempted worker
# gets a grace period of seconds, and an agreement at every step would add a host
# sync and a collective to each one.
AGREE_EVERY = 10


class CorruptCheckpointError(CorruptRunError):
    """A mid-round checkpoint exists but cannot be restored into this model."""


class WorkerAgreement:
    """Host-side agreement between the workers of a multi-worker run.

    Every call is a collective: every worker must make the same calls in the
    same order (they do: the calls follow the steps, which all workers share).

    Args:
      strategy: a MultiWorkerMirroredStrategy (any strategy works, e.g. in tests).
    """

    def __init__(self, strategy):
        self.strategy = strategy

        @tf.function
        def gather(value):
            def replica_fn():
                ctx = tf.distribute.get_replica_context()
                return ctx.all_gather(tf.reshape(value, [1]), axis=0)

            per_replica = strategy.run(replica_fn)
            return strategy.experimental_local_results(per_replica)[0]

        self._gather = gather
        self.workers, self.position = _workers(strategy)

    def gather(self, value: int) -> list[int]:
        """Every replica's `value` (one per replica, so a worker's value may repeat)."""
        return [int(v) for v in self._gather(tf.constant(value, tf.int64)).numpy()]

    def by_worker(self, value: int) -> dict[str, int]:
        """{worker's name ('chief', 'worker 1'): its `value`}, a non-negative int, for every worker."""
        n = len(self.workers)
        return {self.workers[v % n]: v // n for v in self.gather(value * n + self.position)}

    def any(self, flag: bool) -> bool:
        """True on every worker when `flag` is True on at least one of them."""
        return max(self.gather(int(bool(flag)))) > 0


def _workers(strategy) -> tuple[list[str], int]:
    """The names of the cluster's training workers (the same list on every worker) and this
    worker's index in it; one unnamed worker when the strategy has no cluster."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or resolver.task_type is None:
        return ["worker 0"], 0
    cluster = resolver.cluster_spec()
    tasks = [
        (job, i)
        for job in ("chief", "worker")
        if job in cluster.jobs
        for i in cluster.task_indices(job)
    ]
    names = ["chief" if job == "chief" else f"{job} {i}" for job, i in tasks]
    return names, tasks.index((resolver.task_type, resolver.task_id))


def agreement(strategy) -> WorkerAgreement | None:
    """The agreement between `strategy`'s workers, or None for a one-process run."""
    if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return WorkerAgreement(strategy)
    return None


class RoundCheckpointer:
    """The mid-round checkpoints of one round, in `directory`.

    Args:
      checkpoint: a tf.train.Checkpoint of the model and its optimizer (built once
        per model, shared by the rounds).
      directory: the round's checkpoint directory (paths.resume_dir).
      write: False on non-chief workers: they never save nor delete.
      label: the round's name in messages, e.g. 'round 3 (random_reinit)'.
      agreement: a WorkerAgreement under multi-worker training: every worker keeps
        its two newest checkpoints and all restore the newest step they all have.
    """

    def __init__(
        self,
        checkpoint,
        directory: str,
        *,
        write: bool = True,
        label: str = "round",
        agreement: WorkerAgreement | None = None,
    ):
        self.checkpoint = checkpoint
        self.directory = directory
        self.write = write
        self.label = label
        self.agreement = agreement
        self._manager = None  # made at the first save: one per round
        self.restored = False  # True once restore() put a checkpoint back

    def latest(self) -> str | None:
        """The path prefix of the newest checkpoint, or None."""
        if not files.exists(self.directory):
            return None
        return tf.train.latest_checkpoint(self.directory)

    def saved(self) -> list[str]:
        """The path prefixes of the kept checkpoints, oldest first."""
        if not files.exists(self.directory):
            return []
        state = tf.train.get_checkpoint_state(self.directory)
        return list(state.all_model_checkpoint_paths) if state else []

    def restore(self) -> bool:
        """Restores the newest checkpoint into the model and optimizer.

        Under multi-worker training, the newest step that every worker has (see
        `_agreed`): all workers resume from the same step or all start over.

        Returns:
          False when there is none (the round starts from its beginning).

        Raises:
          CorruptCheckpointError: the checkpoint cannot be read or does not fit
            the model, or the workers share no step; the message says which
            directory to delete.
        """
        latest = self.latest() if self.agreement is None else self._agreed()
        if not latest:
            return False
        try:
            self.checkpoint.restore(latest).assert_existing_objects_matched()
            self.restored = True
        except (tf.errors.OpError, ValueError, AssertionError, IndexError) as e:
            # IndexError: a truncated data file ("Read less bytes than requested").
            raise CorruptCheckpointError(
                f"The mid-round checkpoint {latest} cannot be restored ({type(e).__name__}: "
                f"{str(e)[:200]}). Delete {self.directory} to restart {self.label} from its "
                "start."
            ) from e
        return True

    def _agreed(self) -> str | None:
        """The checkpoint of the newest step every worker has, or None (all start over)."""
        saved = self.saved()
        mine = {_step_of(path): path for path in saved}
        latest = _step_of(saved[-1]) if saved else -1
        target = min(self.agreement.gather(latest))
        if target < 0:
            # Some worker has no checkpoint (killed before its first write): every
            # worker starts the round over, so none may keep a newer state around.
            if saved:
                self.discard()
            return None
        steps = self.agreement.gather(target if target in mine else -1)
        if min(steps) < 0:
            raise CorruptCheckpointError(
                f"The workers' mid-round checkpoints of {self.label} share no step: this "
                f"worker has steps {sorted(mine)} in {self.directory}, and the newest step "
                f"that every worker has saved should be {target}. Delete the round's "
                "checkpoint directory on every worker to restart the round from its start."
            )
        return mine[target]

    def save(self, step: int) -> None:
        """Saves the current state as checkpoint number `step`, replacing the previous one.

        Under multi-worker training the previous one is kept too (see `_agreed`).
        """
        if not self.write:
            return
        if self._manager is None:
            tf.io.gfile.makedirs(self.directory)
            self._manager = tf.train.CheckpointManager(
                self.checkpoint, self.directory, max_to_keep=1 if self.agreement is None else 2
            )
        self._manager.save(checkpoint_number=step)

    def discard(self) -> None:
        """Deletes the round's checkpoints (the round is finished); never through a link."""
        if self.write and files.exists(self.directory):
            files.remove_tree(self.directory)


class CheckpointPolicy(StepCallback):
    """When a round saves its mid-round checkpoint, and when it stops on a signal.

    Saves at the end of each evaluation period before `total` (after the
    metrics line of that period is written: put it after PeriodEnd in the
    callbacks list) once `seconds` passed since the last save (0: every
    period), and mid-period at the first batch end past `seconds` (not when
    `seconds` is 0, nor when `by_clock` is False). Never saves when the batch's
    or period's loss is NaN/Inf. When `stop_requested()` names a signal: saves
    at the next batch or period end, then raises Interrupted.

    Args:
      save: `f(step)` saves a checkpoint at global step `step` (RoundCheckpointer.save).
      total: the round's last step (the finished round writes final weights instead).
      seconds: the minimum time between two saves.
      by_clock: False under multi-worker training: save at every period end and
        never mid-period, so every worker saves at the same steps.
      label: the round's name in the Interrupted message.
      clock: `f()` -> seconds (monotonic); tests pass a fake one.
      stop_requested: `f()` -> the name of the signal that asked to stop, or None
        (default: StopRequest.signal_name, set by the entry points' handlers).
      agree: under multi-worker training, `f(flag)` -> True when any worker's flag
        is True (WorkerAgreement.any), asked at every period end and at the first
        batch end `agree_every` steps after the last time it was asked (a host
        sync and a collective: not every step), so that all workers stop at the
        same step; None: this process decides alone, at every batch end.
      agree_every: steps between two agreements within a period.
    """

    def __init__(
        self,
        save,
        *,
        total: int,
        seconds: float,
        by_clock: bool = True,
        label: str = "round",
        clock=time.monotonic,
        stop_requested=None,
        agree=None,
        agree_every: int = AGREE_EVERY,
    ):
        super().__init__()
        self.save = save
        self.total = total
        self.seconds = seconds
        self.by_clock = by_clock
        self.label = label
        self.clock = clock
        self.stop_requested = stop_requested or (lambda: StopRequest.signal_name)
        self.agree = agree
        self.agree_every = agree_every
        self._last_save = clock()
        self._saved_step = None
        self._agreed_step = None

    def _stopping(self, step: int | None = None) -> bool:
        """Whether to stop here: this process's signal, or any worker's under `agree`.

        `step`: a batch end's step (agreements there are spaced by `agree_every`);
        None at period and fit ends (always agreed).
        """
        local = self.stop_requested() is not None
        if self.agree is None:
            return local
        if step is not None:
            if self._agreed_step is not None and step - self._agreed_step < self.agree_every:
                return False  # every worker skips the same batch ends: they share the steps
            self._agreed_step = step
        return self.agree(local)

    def _due(self) -> bool:
        return not self.by_clock or self.clock() - self._last_save >= self.seconds

    def _save(self, step: int) -> None:
        if step != self._saved_step:
            self.save(step)
            self._saved_step = step
        self._last_save = self.clock()

    def _stop(self, step: int):
        reason = self.stop_requested() or "another worker's stop request"
        raise Interrupted(
            f"Stopped by {reason} in {self.label} at step {step}, after saving "
            "a checkpoint there. Rerun the same command to resume from it."
        )

    def on_train_batch_end(self, batch, logs=None):
        # The loss is read (a host sync) only when a checkpoint is about to be saved.
        step = self.global_step(batch)
        stopping = self._stopping(step)
        if not stopping and (not self.by_clock or self.seconds <= 0 or not self._due()):
            return
        if not _finite((logs or {}).get("loss")):
            return  # never a checkpoint of weights that already diverged
        if stopping:
            if step == self.period_end_step():
                # The batch ends its period: on_epoch_end saves and stops once the
                # period's metrics line is written (or, at the round's last step, lets
                # the round finish), so a resumed round writes the same lines.
                return
            # Mid-period: straight out of fit, no validation pass first.
            self._save(step)
            self._stop(step)
        if step != self.period_end_step() and step < self.total:  # period ends: on_epoch_end
            self._save(step)

    def on_epoch_end(self, epoch, logs=None):
        if not _finite((logs or {}).get("loss")):
            return  # PeriodEnd raises DivergedError
        step = self.period_end_step()
        stopping = self._stopping()
        if step < self.total and (stopping or self._due()):
            self._save(step)
        if stopping and step < self.total:
            self._stop(step)  # the signal came during this period's evaluation

    def on_train_end(self, logs=None):
        # A signal after the last period end of this fit call (e.g. between calls).
        step = self.period_end_step()
        if self._stopping() and step < self.total:
            self._save(step)
            self._stop(step)


# ---- the running training metrics of a period ---------------------------------------------------
#
# Keras reports a period's training loss and accuracy as means over its steps (metric
# variables: a total and a count each), and resets them when a fit epoch starts. A round
# stopped mid-period saves them with its checkpoint; resumed, the period's fit call starts
# with them put back, so its metrics line (and summary.json's train_accuracy) is bit for
# bit the one of an uninterrupted run.


def metric_state(model, strategy) -> dict:
    """{'metrics': the model's compiled loss and metrics} for the round's tf.train.Checkpoint.

    Builds their variables now (Keras makes them at the first training step, after a
    restore). Empty under multi-worker training: its metric variables are reduced
    across the workers on read, and a mid-period resume there restarts the period's
    running means (weights, validation and test metrics are resumed exactly).
    """
    if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return {}
    y_pred = tf.zeros([1, int(model.output_shape[-1])])
    if not model.compiled_loss._built:
        model.compiled_loss.build(y_pred)
    if not model.compiled_metrics._built:
        model.compiled_metrics.build(y_pred, tf.zeros([1], tf.int64))
    return {"metrics": list(model.metrics)}


class ResumedPeriod(StepCallback):
    """Puts back the running training metrics restored from a mid-period checkpoint.

    At the start of the round's first fit epoch (after Keras' reset): the values the
    metric variables had right after the restore. Only for a checkpoint inside a
    period (`resumed_period`); a period-end checkpoint starts the next period afresh.
    """

    def __init__(self, variables, values):
        super().__init__()
        self.variables = variables
        self.values = values

    def on_epoch_begin(self, epoch, logs=None):
        super().on_epoch_begin(epoch, logs)
        if self.values is not None:
            for variable, value in zip(self.variables, self.values, strict=True):
                variable.assign(value)
            self.values = None  # once: later periods start from zero


def resumed_period(checkpoint, checkpointer, start: int, period: int) -> ResumedPeriod | None:
    """The callback that continues a period's running means, or None when there is none.

    Args:
      checkpoint: the round's tf.train.Checkpoint (with `metrics`: metric_state).
      checkpointer: the round's RoundCheckpointer, after restore().
      start: the step the round resumes from; period: the evaluation period.
    """
    metrics = getattr(checkpoint, "metrics", None)
    if not checkpointer.restored or not metrics or start % period == 0:
        return None
    variables = [v for m in metrics for v in m.variables]
    return ResumedPeriod(variables, [v.numpy() for v in variables])


def _step_of(path: str) -> int:
    # CheckpointManager names checkpoint number n '<directory>/ckpt-n'.
    return int(path.rsplit("-", 1)[1])


def _finite(loss) -> bool:
    return loss is None or math.isfinite(float(loss))
