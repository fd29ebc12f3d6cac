"""Keras callbacks: the step-k weight recorder, metrics as JSON lines, the NaN guard.

Keras calls `on_epoch_*` per *evaluation period* here: lth_tf fits a segment
of the schedule as `epochs` periods of `eval_every` steps each, so every
callback maps (period, batch) to the global step with `first_step` and
`period`.
"""

import json
import math
import time

from lth_tf.keras import keras, tf


class DivergedError(RuntimeError):
    """Training produced a NaN or Inf loss."""


class _StepMapper(keras.callbacks.Callback):
    def __init__(self, first_step: int, period: int):
        super().__init__()
        self.first_step = first_step
        self.period = period
        self._period_start = first_step

    def on_epoch_begin(self, epoch, logs=None):
        self._period_start = self.first_step + epoch * self.period

    def global_step(self, batch: int) -> int:
        """The number of steps done once batch `batch` of this period has run."""
        return self._period_start + batch + 1


class RecordWeights(_StepMapper):
    """Records the weights (and step) at global step `at_step`: the rewind point W_k.

    `save(step)` is called once, when exactly `at_step` steps are done; with
    `at_step == first_step` that is before training begins. With
    steps_per_execution > 1 Keras only calls back at execution boundaries, so
    `at_step - first_step` must be a multiple of it (checked by the caller
    before training starts; see `train.check_reachable`).
    """

    def __init__(self, at_step: int, save, first_step: int, period: int):
        super().__init__(first_step, period)
        self.at_step = at_step
        self.save = save
        self.done = False

    def on_train_begin(self, logs=None):
        if self.at_step == self.first_step and not self.done:
            self.save(self.at_step)
            self.done = True

    def on_train_batch_end(self, batch, logs=None):
        if not self.done and self.global_step(batch) == self.at_step:
            self.save(self.at_step)
            self.done = True


class PeriodEnd(_StepMapper):
    """At the end of each evaluation period: NaN guard, metrics JSONL and TensorBoard, hooks.

    Args:
      first_step, period: the step mapping (see module docstring).
      metrics_path: JSON lines file, appended to (one line per period).
      summary_writer: a tf.summary writer or None.
      on_period_end: optional `f(step)` run after logging (e.g. a checkpoint save).
      write: False on non-chief workers.
      elapsed: `f()` -> seconds the round has run (across resumptions).
      test_data: a dataset evaluated each period too (test_loss, test_accuracy).
    """

    def __init__(
        self,
        first_step,
        period,
        metrics_path=None,
        summary_writer=None,
        on_period_end=None,
        write=True,
        elapsed=None,
        test_data=None,
    ):
        super().__init__(first_step, period)
        self.metrics_path = metrics_path
        self.writer = summary_writer
        self.on_period_end = on_period_end
        self.write = write
        self.elapsed = elapsed
        self.test_data = test_data
        self._t0 = time.time()

    def on_epoch_end(self, epoch, logs=None):
        logs = dict(logs or {})
        step = int(self.model.optimizer.iterations.numpy())
        loss = logs.get("loss")
        if loss is None or not math.isfinite(loss):
            self.model.stop_training = True
            raise DivergedError(
                f"The training loss became {loss} by step {step}. Lower --lr, check the data, "
                "or use a warm-up; earlier rounds are kept."
            )
        seconds = self.elapsed() if self.elapsed else time.time() - self._t0
        record = {"step": step, "wall_seconds": round(seconds, 3)}
        lr = self.model.optimizer.learning_rate
        if isinstance(lr, keras.optimizers.schedules.LearningRateSchedule):
            lr = lr(max(step - 1, 0))
        record["lr"] = float(lr.numpy() if hasattr(lr, "numpy") else lr)
        record.update({k: float(v) for k, v in logs.items()})
        if self.test_data is not None:
            test = self.model.evaluate(self.test_data, verbose=0, return_dict=True)
            record.update({f"test_{k}": float(v) for k, v in test.items()})
        if self.write and self.metrics_path:
            with tf.io.gfile.GFile(self.metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")
        if self.write and self.writer is not None:
            with self.writer.as_default(step=step):
                for key, value in record.items():
                    if key != "step":
                        tf.summary.scalar(key, value)
            self.writer.flush()
        if self.on_period_end is not None:
            self.on_period_end(step)


class Interrupted(RuntimeError):
    """Training stopped on SIGINT/SIGTERM after saving a resumable checkpoint."""


class StopRequest:
    """Set by the entry points' signal handlers; training stops at the next batch boundary."""

    signal_name: str | None = None

    @classmethod
    def install(cls) -> None:
        """SIGINT and SIGTERM request a clean stop; a second SIGINT stops at once."""
        import signal

        def handler(signum, frame):
            name = signal.Signals(signum).name
            if cls.signal_name is not None and signum == signal.SIGINT:
                raise KeyboardInterrupt
            cls.signal_name = name
            print(
                f"\n{name} received: saving a checkpoint at the next step, then stopping. "
                "Rerun the same command to resume.",
                flush=True,
            )

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)


class BatchEnd(keras.callbacks.Callback):
    """Calls `f(logs)` after every execution of steps_per_execution steps."""

    def __init__(self, f):
        super().__init__()
        self.f = f
        # Logs stay tensors: Keras then does not copy them to the host every step.
        self._supports_tf_logs = True

    def on_train_batch_end(self, batch, logs=None):
        self.f(logs or {})
