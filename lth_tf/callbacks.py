"""Keras callbacks: the step-k weight recorder, metrics as JSON lines, the NaN guard.

Keras calls `on_epoch_*` per *evaluation period* here: lth_tf fits a segment
of the schedule as `epochs` periods of `eval_every` steps each, and
`train.fit_segment` tells every `StepCallback` where each fit call starts
(`start_fit`), so it maps (period, batch) to the global step without reading
a variable (no host sync per step). The callbacks are built once per round.
"""

import json
import math
import time

from lth_tf import train
from lth_tf.cli import DivergedError, Interrupted, StopRequest  # noqa: F401 (their old home)
from lth_tf.keras import keras, tf


class StepCallback(keras.callbacks.Callback):
    """A callback that knows the global step of every batch of every fit call of a round."""

    def __init__(self):
        super().__init__()
        self.first_step = 0
        self.period = 1
        self._period_start = 0
        # Batch logs stay tensors: Keras then does not copy them to the host every step.
        self._supports_tf_logs = True

    def start_fit(self, first_step: int, period: int) -> None:
        """Called by train.fit_segment before each fit call: its first global step, its length."""
        self.first_step = first_step
        self.period = period
        self._period_start = first_step

    def on_epoch_begin(self, epoch, logs=None):
        self._period_start = self.first_step + epoch * self.period

    def global_step(self, batch: int) -> int:
        """The number of steps done once batch `batch` of this period has run."""
        return self._period_start + batch + 1

    def period_end_step(self) -> int:
        """The global step at the end of the current period."""
        return self._period_start + self.period


class RecordWeights(StepCallback):
    """Records the weights at global step `at_step` (the rewind point W_k), or at several.

    `save(step)` is called once per step, when exactly that many steps are done;
    when a fit call starts at one of them, that is before it trains. With
    steps_per_execution > 1 Keras only calls back at execution boundaries, so
    each step must be a multiple of it within its period (checked before
    training starts; see `train.check_reachable`).

    Args:
      at_step: one global step, or a collection of them (one dense training
        records W_k for every k of `imp --rewind_steps`).
      save: `save(step)`, called once for each step.
    """

    def __init__(self, at_step, save):
        super().__init__()
        steps = [at_step] if isinstance(at_step, int) else list(at_step)
        self.at_step = min(steps)
        self.pending = set(steps)
        self.save = save

    @property
    def done(self) -> bool:
        return not self.pending

    def _record(self, step: int) -> None:
        if step in self.pending:
            self.pending.discard(step)
            self.save(step)

    def on_train_begin(self, logs=None):
        self._record(self.first_step)

    def on_train_batch_end(self, batch, logs=None):
        if self.pending:
            self._record(self.global_step(batch))


class PeriodEnd(StepCallback):
    """At the end of each evaluation period: NaN guard, metrics JSONL and TensorBoard.

    Args:
      metrics_path: JSON lines file, appended to (one line per period).
      summary_writer: a tf.summary writer or None.
      write: False on non-chief workers.
      elapsed: `f()` -> seconds the round has run (across resumptions).
      test_data: a dataset evaluated each period too (test_loss, test_accuracy).
    """

    def __init__(
        self,
        metrics_path=None,
        summary_writer=None,
        write=True,
        elapsed=None,
        test_data=None,
    ):
        super().__init__()
        self.metrics_path = metrics_path
        self.writer = summary_writer
        self.write = write
        self.elapsed = elapsed
        self.test_data = test_data
        self._t0 = time.time()

    def on_epoch_end(self, epoch, logs=None):
        logs = dict(logs or {})
        step = train.global_step(self.model)
        loss = logs.get("loss")
        if loss is not None:
            loss = float(loss)
        if loss is None or not math.isfinite(loss):
            self.model.stop_training = True
            raise DivergedError(
                f"The training loss became {loss} by step {step}. Lower --lr, check the data, "
                "or use a warm-up; earlier rounds are kept."
            )
        seconds = self.elapsed() if self.elapsed else time.time() - self._t0
        record = {"step": step, "wall_seconds": round(seconds, 3)}
        # The rate of the last update (the optimizer keeps it in a variable).
        lr = self.model.optimizer.learning_rate
        if isinstance(lr, keras.optimizers.schedules.LearningRateSchedule):
            # Called with the optimizer's own counter, as the optimizer calls it.
            lr = lr(max(int(self.model.optimizer.iterations.numpy()) - 1, 0))
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


def progress_mode(verbose: int, stream) -> str | None:
    """What progress a round shows for config.verbose on `stream`.

    0: none; 1: a bar redrawn in place on a terminal, one line per evaluation
    period otherwise (logs, pipes, batch jobs); 2: always lines.
    """
    if not verbose:
        return None
    if verbose >= 2:
        return "lines"
    isatty = getattr(stream, "isatty", None)
    return "bar" if isatty is not None and isatty() else "lines"


class Progress(StepCallback):
    """The progress of one round over its global steps [start, total].

    One display per round, across its fit calls: a resumed or rewound round
    starts at its own step. In 'bar' mode the bar is redrawn in place at most
    every `min_interval` seconds (the loss is read from the device only then);
    in 'lines' mode one line is printed per evaluation period.

    Args:
      start, total: the round's first and last global steps.
      label: the round's name, e.g. 'round 2 (random_reinit)'.
      mode: 'bar' or 'lines' (see progress_mode).
      stream: where to write (default sys.stdout).
      clock: `f()` -> seconds (monotonic).
      min_interval: seconds between two redraws of the bar.
    """

    WIDTH = 30

    def __init__(
        self,
        start: int,
        total: int,
        *,
        label: str,
        mode: str,
        stream=None,
        clock=time.monotonic,
        min_interval: float = 0.2,
    ):
        super().__init__()
        if mode not in ("bar", "lines"):
            raise ValueError(f"Progress mode {mode!r}: expected 'bar' or 'lines'.")
        self.start = start
        self.total = total
        self.label = label
        self.mode = mode
        self.stream = stream
        self.clock = clock
        self.min_interval = min_interval
        self._t0 = clock()
        self._last_draw = None
        self._open = False  # a bar is drawn and its line not ended
        self._period_logs = {}

    def _write(self, text: str) -> None:
        import sys

        stream = self.stream or sys.stdout
        stream.write(text)
        stream.flush()

    def _eta(self, step: int) -> str:
        done = step - self.start
        if done <= 0:
            return "?"
        seconds = (self.clock() - self._t0) / done * (self.total - step)
        minutes, seconds = divmod(int(seconds), 60)
        hours, minutes = divmod(minutes, 60)
        return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes}:{seconds:02d}"

    def bar(self, step: int, loss=None) -> str:
        """The bar's text at global `step` (without the carriage return)."""
        span = max(self.total - self.start, 1)
        filled = int(self.WIDTH * (step - self.start) / span)
        bar = "=" * filled + (">" if filled < self.WIDTH else "") + "." * (self.WIDTH - filled - 1)
        text = f"{self.label} [{bar[: self.WIDTH]}] {step}/{self.total} ETA {self._eta(step)}"
        if loss is not None:
            text += f" loss {loss:.4f}"
        if "val_accuracy" in self._period_logs:
            text += f" val_accuracy {self._period_logs['val_accuracy']:.4f}"
        return text

    def on_train_begin(self, logs=None):
        if self.mode == "bar" and not self._open:
            self._draw(self.first_step)

    def _draw(self, step, loss=None):
        self._write("\r" + self.bar(step, loss) + "\033[K")
        self._open = True
        self._last_draw = self.clock()
        if step >= self.total:
            self.close()

    def on_train_batch_end(self, batch, logs=None):
        if self.mode != "bar":
            return
        step = self.global_step(batch)
        if step >= self.total or self.clock() - self._last_draw < self.min_interval:
            return  # the last frame is drawn at the period end, with its validation
        loss = (logs or {}).get("loss")
        self._draw(step, None if loss is None else float(loss))

    def on_epoch_end(self, epoch, logs=None):
        logs = {k: float(v) for k, v in (logs or {}).items()}
        self._period_logs = logs
        step = self.period_end_step()
        if self.mode == "bar":
            self._draw(step, logs.get("loss"))
            return
        parts = [f"{self.label}: step {step}/{self.total}"]
        for key in ("loss", "accuracy", "val_loss", "val_accuracy"):
            if key in logs:
                parts.append(f"{key} {logs[key]:.4f}")
        parts.append(f"{self.clock() - self._t0:.0f}s")
        self._write("  ".join(parts) + "\n")

    def close(self) -> None:
        """Ends the bar's line (call once the round ends or stops)."""
        if self._open:
            self._write("\n")
            self._open = False
