"""Compile a model with its recipe and fit one segment [start, end) of the schedule.

Two counters make the global step of the schedule: the optimizer's own
`iterations`, which restarts at 0 with the optimizer's fresh state each round
(Adam's bias correction restarts, as in the authors' framework), and a step
offset, the global step the round started from. The learning rate is the
schedule's value at `offset + iterations` (`OffsetSchedule`), so a round
rewound to step k continues the schedule from k. `global_step(model)` is the
one reader of that sum. The data pipeline is started at the segment's first
step too (lth_tf.data), so the segment sees the batches the full schedule of
its data seed would have seen (which seed each round has: rounds.Experiment.
round_data_seed).
"""

import dataclasses
import functools
import math

from lth_tf import distribute, sparsity, steps
from lth_tf.data import base
from lth_tf.keras import keras, tf


class StepSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warm-up, then multiply by `gamma` at each boundary step.

    At global step s the rate is lr * gamma^(boundaries <= s) * min(1, s / W) with
    warm-up form 'step' (open_lth's: step 0 trains at rate 0), or
    min(1, (s + 1) / W) with form 'step+1' (runs written before the form was a
    config field; lth_tf.config.WARMUP_FORMS).
    """

    def __init__(
        self,
        lr: float,
        warmup_steps: int = 0,
        boundaries=(),
        gamma: float = 0.1,
        warmup_form: str = "step",
    ):
        if warmup_form not in ("step", "step+1"):
            raise ValueError(f"warmup_form: got {warmup_form!r}; expected 'step' or 'step+1'.")
        self.lr = float(lr)
        self.warmup_steps = int(warmup_steps)
        self.boundaries = tuple(int(b) for b in boundaries)
        self.gamma = float(gamma)
        self.warmup_form = warmup_form

    def __call__(self, step):
        step = tf.cast(step, tf.float32)
        lr = tf.constant(self.lr, tf.float32)
        for boundary in self.boundaries:
            lr = tf.where(step >= boundary, lr * self.gamma, lr)
        if self.warmup_steps > 0:
            done = step + 1.0 if self.warmup_form == "step+1" else step
            lr = lr * tf.minimum(1.0, done / self.warmup_steps)
        return lr

    def get_config(self):
        return dict(
            lr=self.lr,
            warmup_steps=self.warmup_steps,
            boundaries=self.boundaries,
            gamma=self.gamma,
            warmup_form=self.warmup_form,
        )


def lr_schedule(config, schedule: "Schedule") -> StepSchedule:
    """The config's learning rate as a function of the global step."""
    return StepSchedule(
        config.lr, schedule.warmup, schedule.boundaries, config.lr_gamma, config.warmup_form
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


def check_reachable(step: int, period: int, steps_per_execution: int | None) -> None:
    """Can a callback see step `step`?

    Keras calls back after every execution of steps_per_execution steps, and at
    the end of every evaluation period (a Keras epoch, whose last execution is
    cut short). Segments are split at multiples of `period`. None (automatic,
    `execution_steps`) always reaches it.
    """
    offset = step % period
    if steps_per_execution is not None and offset % steps_per_execution:
        raise ValueError(
            f"The rewind step {step} cannot be recorded with steps_per_execution="
            f"{steps_per_execution}: it is {offset} steps into an evaluation period of {period} "
            f"steps, and Keras only calls back every {steps_per_execution} steps and at period "
            "ends. Choose a rewind step at a multiple of steps_per_execution within its period, "
            "or lower --steps_per_execution."
        )


class OffsetSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """`schedule(offset + step)`: the schedule continues from the round's first global step.

    The optimizer calls this with its own `iterations`, which restart at 0 each
    round; `offset` is a variable (assigned at each round start, restored from
    mid-round checkpoints), so changing it never retraces the train step.
    """

    def __init__(self, schedule, offset: tf.Variable):
        self.schedule = schedule
        self.offset = offset

    def __call__(self, step):
        return self.schedule(tf.cast(self.offset, tf.int64) + tf.cast(step, tf.int64))

    def get_config(self):
        return {"schedule": self.schedule.get_config()}


def make_optimizer(config, schedule: Schedule):
    """The recipe's optimizer; its `step_offset` variable is the round's first global step.

    Build it inside the strategy's scope: the offset is a (mirrored) variable.
    """
    offset = tf.Variable(
        0,
        dtype=tf.int64,
        trainable=False,
        name="step_offset",
        aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA,
    )
    lr = OffsetSchedule(lr_schedule(config, schedule), offset)
    if config.optimizer == "sgd":
        optimizer = sparsity.MaskedSGD(learning_rate=lr, momentum=config.momentum)
    else:
        # PyTorch's epsilon, as in the authors' framework.
        optimizer = keras.optimizers.Adam(learning_rate=lr, epsilon=1e-8)
    # An attribute of the optimizer, so that tf.train.Checkpoint(optimizer=...) saves
    # and restores it with `iterations`: a resumed round gets both back exactly.
    optimizer.step_offset = offset
    return optimizer


def _inner(optimizer):
    # Under mixed_float16 Keras wraps the optimizer in a LossScaleOptimizer.
    return getattr(optimizer, "inner_optimizer", optimizer)


def step_offset(model) -> tf.Variable:
    """The variable holding the global step at which the model's current round started."""
    optimizer = _inner(model.optimizer)
    offset = getattr(optimizer, "step_offset", None)
    if offset is None:
        raise ValueError(
            f"{type(optimizer).__name__} has no step_offset: compile the model with "
            "lth_tf.train.compile_model, which builds the optimizer with one."
        )
    return offset


def global_step(model) -> int:
    """Steps of the schedule done: the round's first step plus the optimizer's own count.

    Everything that names a step (metrics, checkpoints, the rewind point, the
    learning rate) uses this, never `optimizer.iterations` alone.
    """
    return int(step_offset(model).numpy()) + int(model.optimizer.iterations.numpy())


# A model whose training batch costs at most this many multiply-adds (forward pass)
# is "small": its step takes a few milliseconds on a CPU, so Keras' per-call host
# work (callbacks, the Python loop) would dominate it. LeNet-300-100 at batch 128
# is 3.4e7; Conv-2 at batch 60 is 2.6e9, ResNet-20 at batch 128 5e9.
SMALL_BATCH_MACS = 1e8
# The most steps per tf.function call chosen automatically: callbacks (progress,
# preemption checkpoints, a stop request) still run at least every few tenths of a
# second for a small model.
AUTO_STEPS_PER_EXECUTION = 100


def forward_macs(model) -> int:
    """Multiply-adds of one example's forward pass through the kernels of `model`.

    Dense layers count their kernel's size, convolutions their kernel's size
    times the output's spatial positions; other layers are not counted.
    """
    macs = 0
    for layer in model.layers:
        inner = getattr(layer, "layer", layer)  # a pruning wrapper's layer
        kernel = getattr(inner, "kernel", None)
        if kernel is None:
            continue
        size = 1
        for d in kernel.shape:
            size *= int(d)
        spatial = 1
        for d in layer.output_shape[1:-1]:
            spatial *= int(d or 1)
        macs += size * spatial
    return macs


def execution_steps(model, config, schedule: Schedule) -> int:
    """The steps per tf.function call to compile `model` with.

    The config's value when the user set one (1 turns the choice off).
    Otherwise (None), for a small model (`SMALL_BATCH_MACS`), the largest number up to
    `AUTO_STEPS_PER_EXECUTION` at which callbacks still see the rewind step
    (`check_reachable`): Keras then runs that many steps per call without going
    back to Python, the same steps with the same results, several times faster
    for LeNet on a CPU. Steps per execution is a speed setting only, so the
    choice is not part of the config (nor of the run's identity).
    """
    if config.steps_per_execution is not None:
        return config.steps_per_execution
    if config.batch_size * forward_macs(model) > SMALL_BATCH_MACS:
        return 1
    offset = schedule.rewind % schedule.eval_every
    for n in range(min(AUTO_STEPS_PER_EXECUTION, schedule.eval_every), 1, -1):
        if offset % n == 0:
            return n
    return 1


def compile_model(model, config, schedule: Schedule, *, steps_per_execution=None) -> None:
    """Compiles `model` with the recipe's optimizer; builds the optimizer's slots now.

    Call once per model: later rounds reset the optimizer in place
    (`reset_optimizer`) so the compiled train step is reused, never retraced.
    `steps_per_execution` overrides the config's (rounds.Experiment passes
    `execution_steps(...)`, the automatic choice for small models).

    With SGD the optimizer is `sparsity.MaskedSGD`, which takes over the masks of
    the model's MaskedLayer wrappers (their gradients are masked in its update).
    """
    optimizer = make_optimizer(config, schedule)
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
        jit_compile=config.jit_compile,
        steps_per_execution=steps_per_execution or config.steps_per_execution or 1,
    )
    # A model compiled before with MaskedSGD gives its masks back to the wrappers first:
    # another optimizer would otherwise train its pruned weights.
    sparsity.release_masks(model)
    if isinstance(_inner(optimizer), sparsity.MaskedSGD):
        _inner(optimizer).take_masks(model)
    optimizer.build(model.trainable_variables)


def reset_optimizer(model, step: int) -> None:
    """A fresh optimizer for a round that starts at global step `step`.

    Zeroes the slots (momentum, Adam moments) and the optimizer's own step
    counter, as a newly built optimizer has them: Adam's bias correction
    restarts. The learning-rate schedule continues from `step` (the offset).
    """
    # Under mixed_float16 the LossScaleOptimizer's own variables (the loss scale)
    # must survive; only the inner optimizer's state resets.
    inner = _inner(model.optimizer)
    for var in inner.variables():
        var.assign(tf.zeros_like(var))  # `iterations` is one of them
    step_offset(model).assign(step)


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
    model, data, config, schedule: Schedule, start: int, end: int, *, callbacks=(), data_seed=None
):
    """Trains `model` from global step `start` to `end` of the schedule.

    [start, end) is cut at the evaluation periods into `fit` calls (`pieces`);
    Keras runs silently (verbose=0): progress is a callback of the caller's.

    Args:
      model: compiled model whose `global_step` is `start`.
      data: an lth_tf.data dataset.
      config: the run's config (batch sizes, data seed).
      schedule: the resolved schedule (evaluation period).
      start, end: global steps.
      callbacks: Keras callbacks for every fit call, built once per round by the
        caller. Those with a `start_fit(first_step, period)` method (the
        lth_tf.callbacks.StepCallback ones) are told where each fit call starts,
        so they map Keras' (epoch, batch) to global steps without reading a
        variable.
      data_seed: overrides config.data_seed (stability analyses).

    Under a strategy other than the default, each input pipeline reads its share
    of every global batch (`train_data`); the global batch of each step is the
    same examples as on one device.
    """
    if global_step(model) != start:
        raise RuntimeError(f"The model is at global step {global_step(model)}, not {start}.")
    seed = config.data_seed if data_seed is None else data_seed
    validation, validation_steps = eval_data(model, data, "validation", eval_batch_size(config))
    for first, length, count in pieces(start, end, schedule.eval_every):
        for callback in callbacks:
            if hasattr(callback, "start_fit"):
                callback.start_fit(first, length)
        compiled = int(model.steps_per_execution.numpy())
        executions = _executions_reaching(callbacks, first, length, count, compiled)
        if executions != compiled:
            model.steps_per_execution = executions
        model.fit(
            train_data(model, data, config.batch_size, seed, first),
            steps_per_epoch=length,
            epochs=count,
            validation_data=validation,
            validation_steps=validation_steps,
            callbacks=list(callbacks),
            verbose=0,
        )
        if executions != compiled:  # only a speed setting: no harm if an error skips this
            model.steps_per_execution = compiled


def _executions_reaching(callbacks, first: int, length: int, count: int, compiled: int) -> int:
    """Steps per execution for one fit call so that every pending recording step is reached.

    A round resumed mid-period from a checkpoint saved with another
    steps_per_execution (a speed setting, outside the run's identity) can start
    off the grid `check_reachable` assumed, and the automatic choice for small
    models (`execution_steps`) only knows the run's own rewind step: a fit call
    that holds a step still to record (RecordWeights.pending) then runs
    executions that end exactly there. steps_per_execution is a variable of the compiled model: no retrace.
    """
    executions = compiled
    for callback in callbacks:
        pending = getattr(callback, "pending", None)  # RecordWeights: steps not yet recorded
        if pending is None:
            at = getattr(callback, "at_step", None)
            pending = () if at is None or getattr(callback, "done", False) else (at,)
        for at in pending:
            if first < at <= first + length * count:
                executions = math.gcd(executions, (at - first) % length)
    return executions


def eval_batch_size(config) -> int:
    """Evaluation batch: at least 500 (the result does not depend on it, the speed does)."""
    return max(config.batch_size, 500)


def train_data(model, data, batch_size: int, data_seed: int, start_step: int):
    """Training batches for `model.fit`, from global step `start_step`.

    On the default strategy: `data.train(batch_size, data_seed, start_step)`, the
    global batches, exactly as they always were. Under any other strategy (the
    model's `distribute_strategy`): a distributed dataset built per input pipeline
    with `distribute_datasets_from_function`, where each worker reads only its
    share of each global batch, as per-replica batches of
    batch_size / num_replicas_in_sync. What is guaranteed: at every step s the
    replicas together train on exactly the examples (and augmentations) of the
    one-device batch of step s, so rewinding and resuming see the same batches
    and results do not depend on the number of workers or replicas, up to the
    order of float reductions.

    Raises:
      ValueError: if `batch_size` is not divisible by the number of replicas.
    """
    strategy = model.distribute_strategy
    if not distribute.is_distributed(strategy):
        return data.train(batch_size, data_seed, start_step=start_step)
    check_global_batch(batch_size, strategy)
    return distribute.distribute_input(
        strategy,
        functools.partial(data.train, batch_size, data_seed, start_step),
    )


def eval_data(model, data, split: str, batch_size: int):
    """One pass over `split` for `model.evaluate` (or fit's validation_data).

    Returns:
      (dataset, steps). On the default strategy `data.eval(split, batch_size)`
      and None (Keras reads to the end). Under another strategy, a distributed
      dataset where each input pipeline evaluates a disjoint share of the
      examples (Keras reduces the metrics over the replicas), and the number of
      steps that reads every share to its end: Keras needs it for a distributed
      dataset, and every worker must run the same number of steps.
    """
    strategy = model.distribute_strategy
    if not distribute.is_distributed(strategy):
        return data.eval(split, batch_size), None
    dataset = distribute.distribute_input(strategy, functools.partial(data.eval, split, batch_size))
    # lth_tf.data.base.eval_share: every pipeline runs this many steps.
    steps = base.eval_steps(data.num_examples(split), batch_size, strategy.num_replicas_in_sync)
    return dataset, steps


def check_global_batch(batch_size: int, strategy) -> None:
    """Raises a ValueError unless the global batch splits evenly over the replicas."""
    n = strategy.num_replicas_in_sync
    if batch_size % n:
        raise ValueError(
            f"--batch_size={batch_size} is not divisible by the {n} replicas: the batch size "
            f"is global and every replica trains on an equal share. Use a multiple of {n}."
        )


def evaluate(model, data, split: str, batch_size: int) -> dict:
    """{'loss', 'accuracy'} of the model on a split (per input pipeline under a strategy)."""
    dataset, steps = eval_data(model, data, split, batch_size)
    result = model.evaluate(dataset, steps=steps, verbose=0, return_dict=True)
    return {k: float(v) for k, v in result.items()}
