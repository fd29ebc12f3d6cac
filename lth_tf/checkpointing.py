"""Mid-round checkpoints: one checkpointer per round, and when to save or stop.

A round is resumable from its last mid-round TF checkpoint (model, masks,
optimizer state, its step counter and the round's step offset). Two pieces:

- `RoundCheckpointer`: the round's checkpoint directory with one
  tf.train.CheckpointManager: restore the latest, save at a step, discard once
  the round is finished.
- `CheckpointPolicy`: a Keras callback deciding when to save and when to stop:
  at evaluation-period ends and mid-period once `seconds` passed since the
  last save (preemptible machines), never a diverged (NaN) state, and on
  SIGINT/SIGTERM (`StopRequest`) save then stop with `Interrupted`. Workers of
  a multi-worker run decide by step (every period end), never by their own
  clocks, so they all take the same checkpoints. The clock and the signal
  state are arguments, so its decisions are unit-tested without a subprocess.
"""

import math
import time

from lth_tf import files
from lth_tf.callbacks import Interrupted, StepCallback, StopRequest
from lth_tf.keras import tf
from lth_tf.rundir import CorruptRunError


class CorruptCheckpointError(CorruptRunError):
    """A mid-round checkpoint exists but cannot be restored into this model."""


class RoundCheckpointer:
    """The mid-round checkpoints of one round, in `directory`.

    Args:
      checkpoint: a tf.train.Checkpoint of the model and its optimizer (built once
        per model, shared by the rounds).
      directory: the round's checkpoint directory (paths.resume_dir).
      write: False on non-chief workers: they never save nor delete.
      label: the round's name in messages, e.g. 'round 3 (random_reinit)'.
    """

    def __init__(self, checkpoint, directory: str, *, write: bool = True, label: str = "round"):
        self.checkpoint = checkpoint
        self.directory = directory
        self.write = write
        self.label = label
        self._manager = None  # made at the first save: one per round

    def latest(self) -> str | None:
        """The path prefix of the newest checkpoint, or None."""
        if not files.exists(self.directory):
            return None
        return tf.train.latest_checkpoint(self.directory)

    def restore(self) -> bool:
        """Restores the newest checkpoint into the model and optimizer.

        Returns:
          False when there is none (the round starts from its beginning).

        Raises:
          CorruptCheckpointError: the checkpoint cannot be read or does not fit
            the model; the message says which directory to delete.
        """
        latest = self.latest()
        if not latest:
            return False
        try:
            self.checkpoint.restore(latest).assert_existing_objects_matched()
        except (tf.errors.OpError, ValueError, AssertionError, IndexError) as e:
            # IndexError: a truncated data file ("Read less bytes than requested").
            raise CorruptCheckpointError(
                f"The mid-round checkpoint {latest} cannot be restored ({type(e).__name__}: "
                f"{str(e)[:200]}). Delete {self.directory} to restart {self.label} from its "
                "start."
            ) from e
        return True

    def save(self, step: int) -> None:
        """Saves the current state as checkpoint number `step`, replacing the previous one."""
        if not self.write:
            return
        if self._manager is None:
            tf.io.gfile.makedirs(self.directory)
            self._manager = tf.train.CheckpointManager(
                self.checkpoint, self.directory, max_to_keep=1
            )
        self._manager.save(checkpoint_number=step)

    def discard(self) -> None:
        """Deletes the round's checkpoints (the round is finished)."""
        if self.write and files.exists(self.directory):
            tf.io.gfile.rmtree(self.directory)


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
    ):
        super().__init__()
        self.save = save
        self.total = total
        self.seconds = seconds
        self.by_clock = by_clock
        self.label = label
        self.clock = clock
        self.stop_requested = stop_requested or (lambda: StopRequest.signal_name)
        self._last_save = clock()
        self._saved_step = None

    def _due(self) -> bool:
        return not self.by_clock or self.clock() - self._last_save >= self.seconds

    def _save(self, step: int) -> None:
        if step != self._saved_step:
            self.save(step)
            self._saved_step = step
        self._last_save = self.clock()

    def _stop(self, step: int):
        raise Interrupted(
            f"Stopped by {self.stop_requested()} in {self.label} at step {step}, after saving "
            "a checkpoint there. Rerun the same command to resume from it."
        )

    def on_train_batch_end(self, batch, logs=None):
        # The loss is read (a host sync) only when a checkpoint is about to be saved.
        stopping = self.stop_requested() is not None
        if not stopping and (not self.by_clock or self.seconds <= 0 or not self._due()):
            return
        if not _finite((logs or {}).get("loss")):
            return  # never a checkpoint of weights that already diverged
        step = self.global_step(batch)
        if stopping:
            # Straight out of fit: no validation pass first.
            self._save(step)
            self._stop(step)
        if step % self.period and step < self.total:  # period ends: on_epoch_end
            self._save(step)

    def on_epoch_end(self, epoch, logs=None):
        if not _finite((logs or {}).get("loss")):
            return  # PeriodEnd raises DivergedError
        step = self.period_end_step()
        stopping = self.stop_requested() is not None
        if step < self.total and (stopping or self._due()):
            self._save(step)
        if stopping and step < self.total:
            self._stop(step)  # the signal came during this period's evaluation

    def on_train_end(self, logs=None):
        # A signal after the last period end of this fit call (e.g. between calls).
        step = self.period_end_step()
        if self.stop_requested() is not None and step < self.total:
            self._save(step)
            self._stop(step)


def _finite(loss) -> bool:
    return loss is None or math.isfinite(float(loss))
