"""Compile a model with its recipe and fit one segment [start, end) of the schedule.

The learning rate is a function of the optimizer's iteration counter, so a
segment that starts at step s (a rewound round, a resumed checkpoint) uses the
schedule's value at s. The data pipeline is started at s too (lth_tf.data), so
the segment sees the batches the full schedule would have seen.
"""

import dataclasses
import math

from lth_tf import steps
from lth_tf.callbacks import PeriodEnd, RecordWeights
from lth_tf.keras import keras, tf


class StepSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warm-up, then multiply by `gamma` at each boundary step."""

    def __init__(self, lr: float, warmup_steps: int = 0, boundaries=(), gamma: float = 0.1):
        self.lr = float(lr)
        self.warmup_steps = int(warmup_steps)
        self.boundaries = tuple(int(b) for b in boundaries)
        self.gamma = float(gamma)

    def __call__(self, step):
        step = tf.cast(step, tf.float32)
        lr = tf.constant(self.lr, tf.float32)
        for boundary in self.boundaries:
            lr = tf.where(step >= boundary, lr * self.gamma, lr)
        if self.warmup_steps > 0:
            lr = lr * tf.minimum(1.0, (step + 1.0) / self.warmup_steps)
        return lr

    def get_config(self):
        return dict(
            lr=self.lr, warmup_steps=self.warmup_steps, boundaries=self.boundaries, gamma=self.gamma
        )


@dataclasses.dataclass(frozen=True)
class Schedule:
    """A config's durations resolved to steps for one dataset and batch size."""

    steps_per_epoch: int
    total: int  # T
    rewind: int  # k
    eval_every: int
    warmup: int
    boundaries: tuple[int, ...]


def resolve(config, steps_per_epoch: int) -> Schedule:
    """Turns the config's durations into steps; checks that they fit together."""
    spe = steps_per_epoch

    def to(text, what):
        return steps.to_steps(text, spe, what)

    schedule = Schedule(
        steps_per_epoch=spe,
        total=to(config.training_steps, "training_steps"),
        rewind=to(config.rewind_step, "rewind_step"),
        eval_every=to(config.eval_every, "eval_every"),
        warmup=to(config.warmup, "warmup"),
        boundaries=tuple(to(d, "lr_drops") for d in config.lr_drops),
    )
    if schedule.rewind >= schedule.total:
        raise ValueError(
            f"--rewind_step={config.rewind_step} is step {schedule.rewind}, not before the end of "
            f"training at step {schedule.total} (--training_steps={config.training_steps}). "
            "Choose a rewind step earlier than the end of training."
        )
    check_reachable(schedule.rewind, schedule.eval_every, config.steps_per_execution)
    return schedule


def check_reachable(step: int, period: int, steps_per_execution: int) -> None:
    """Can a callback see step `step`?

    Keras calls back after every execution of steps_per_execution steps, and at
    the end of every evaluation period (a Keras epoch, whose last execution is
    cut short). Segments are split at multiples of `period`.
    """
    offset = step % period
    if offset % steps_per_execution:
        raise ValueError(
            f"The rewind step {step} cannot be recorded with steps_per_execution="
            f"{steps_per_execution}: it is {offset} steps into an evaluation period of {period} "
            f"steps, and Keras only calls back every {steps_per_execution} steps and at period "
            "ends. Choose a rewind step at a multiple of steps_per_execution within its period, "
            "or lower --steps_per_execution."
        )


def make_optimizer(config, schedule: Schedule):
    lr = StepSchedule(config.lr, schedule.warmup, schedule.boundaries, config.lr_gamma)
    if config.optimizer == "sgd":
        return keras.optimizers.SGD(learning_rate=lr, momentum=config.momentum)
    # PyTorch's epsilon, as in the authors' framework.
    return keras.optimizers.Adam(learning_rate=lr, epsilon=1e-8)


def compile_model(model, config, schedule: Schedule) -> None:
    """Compiles `model` with the recipe's optimizer; builds the optimizer's slots now.

    Call once per model: later rounds reset the optimizer in place
    (`reset_optimizer`) so the compiled train step is reused, never retraced.
    """
    optimizer = make_optimizer(config, schedule)
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
        jit_compile=config.jit_compile,
        steps_per_execution=config.steps_per_execution,
    )
    optimizer.build(model.trainable_variables)


def reset_optimizer(model, step: int) -> None:
    """Zeroes the optimizer's slots (momentum, Adam moments) and sets its step to `step`."""
    optimizer = model.optimizer
    # Under mixed_float16 Keras wraps the optimizer in a LossScaleOptimizer whose
    # own variables (the loss scale) must survive; only the inner slots reset.
    inner = getattr(optimizer, "inner_optimizer", optimizer)
    for var in inner.variables():
        if var is inner.iterations:
            continue
        var.assign(tf.zeros_like(var))
    optimizer.iterations.assign(step)


def pieces(start: int, end: int, period: int):
    """Splits [start, end) at multiples of `period` into (first, length, count) runs.

    Each run is one `fit` call of `count` Keras epochs of `length` steps.
    """
    runs = []
    s = start
    while s < end:
        e = min((s // period + 1) * period, end)
        if runs and runs[-1][1] == e - s and runs[-1][0] + runs[-1][1] * runs[-1][2] == s:
            runs[-1][2] += 1
        else:
            runs.append([s, e - s, 1])
        s = e
    return [tuple(r) for r in runs]


def fit_segment(
    model,
    data,
    config,
    schedule: Schedule,
    start: int,
    end: int,
    *,
    record_at: int | None = None,
    on_record=None,
    metrics_path=None,
    summary_writer=None,
    on_period_end=None,
    write=True,
    data_seed=None,
    elapsed=None,
    extra_callbacks=(),
    should_stop=None,
):
    """Trains `model` from step `start` to step `end` of the schedule.

    Args:
      model: compiled model whose optimizer.iterations is `start`.
      data: an lth_tf.data dataset.
      record_at: global step whose weights `on_record(step)` saves (None: no recording).
      metrics_path, summary_writer: where per-period metrics go.
      on_period_end: `f(step)` after each evaluation period (checkpointing).
      write: False on non-chief workers.
      data_seed: overrides config.data_seed (stability analyses).
      elapsed: `f()` -> seconds the round has run, for the metrics lines.
      extra_callbacks: more Keras callbacks for every fit call.
      should_stop: `f()` -> True once a callback stopped training for good (a
        signal): the remaining fit calls are skipped.
    """
    if int(model.optimizer.iterations.numpy()) != start:
        raise RuntimeError(
            f"The optimizer is at step {int(model.optimizer.iterations.numpy())}, not {start}."
        )
    seed = config.data_seed if data_seed is None else data_seed
    validation = data.eval("validation", eval_batch_size(config))
    test_data = data.eval("test", eval_batch_size(config)) if config.test_every_period else None
    recorded = record_at is None
    for first, length, count in pieces(start, end, schedule.eval_every):
        if should_stop is not None and should_stop():
            return
        callbacks = [
            PeriodEnd(
                first,
                length,
                metrics_path,
                summary_writer,
                on_period_end,
                write,
                elapsed,
                test_data,
            ),
            *extra_callbacks,
        ]
        compiled = int(model.steps_per_execution.numpy())
        executions = compiled
        if not recorded and first <= record_at <= first + length * count:
            callbacks.insert(0, RecordWeights(record_at, on_record, first, length))
            recorded = True
            # A round resumed mid-period from a checkpoint saved with another
            # steps_per_execution can start off the grid check_reachable assumed:
            # this one fit call then runs executions that end exactly at record_at
            # (a variable of the compiled model: no retrace).
            executions = math.gcd((record_at - first) % length, compiled)
            model.steps_per_execution = executions
        model.fit(
            data.train(config.batch_size, seed, start_step=first),
            steps_per_epoch=length,
            epochs=count,
            validation_data=validation,
            callbacks=callbacks,
            verbose=config.verbose if count > 1 or length > 1 else 0,
        )
        if executions != compiled:  # only a speed setting: no harm if an error skips this
            model.steps_per_execution = compiled
    if should_stop is not None and should_stop():
        return
    if not recorded and record_at == end:
        on_record(end)


def eval_batch_size(config) -> int:
    """Evaluation batch: at least 500 (the result does not depend on it, the speed does)."""
    return max(config.batch_size, 500)


def evaluate(model, data, split: str, batch_size: int) -> dict:
    """{'loss', 'accuracy'} of the model on a split."""
    result = model.evaluate(data.eval(split, batch_size), verbose=0, return_dict=True)
    return {k: float(v) for k, v in result.items()}
