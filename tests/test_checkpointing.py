"""Contracts of mid-round checkpoints (lth_tf.checkpointing) and the progress display.

The policy's decisions are tested on a simulated round: a fake clock, a fake
signal state and a `save` that records steps, without a model or a subprocess.
"""

import io
import math
import os

import numpy as np
import pytest

from lth_tf import checkpointing, files, paths, rounds, train
from lth_tf.callbacks import Interrupted, Progress, StepCallback, StopRequest, progress_mode
from lth_tf.keras import keras, tf

# ---- the policy, simulated -------------------------------------------------------------------


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


class FakeSignal:
    """Names a signal once `at` batches ran (counted by `tick`), like StopRequest after a kill."""

    def __init__(self, at=None, during_eval_of=None):
        self.at = at
        self.during_eval_of = during_eval_of
        self.batches = 0
        self.name = None

    def __call__(self):
        return self.name


def simulate(policy, start, total, period, *, clock=None, per_batch=0.0, signal=None, loss=1.0):
    """Runs `policy` through the fit calls of train.fit_segment for [start, total).

    Returns the steps at which it saved; raises what the policy raises.
    """
    for first, length, count in train.pieces(start, total, period):
        policy.start_fit(first, length)
        policy.on_train_begin()
        for epoch in range(count):
            policy.on_epoch_begin(epoch)
            for batch in range(length):
                if clock is not None:
                    clock.now += per_batch
                if signal is not None:
                    signal.batches += 1
                    if signal.at is not None and signal.batches == signal.at:
                        signal.name = "SIGTERM"
                step_loss = loss(policy.global_step(batch)) if callable(loss) else loss
                policy.on_train_batch_end(batch, {"loss": step_loss})
            end = first + (epoch + 1) * length
            if signal is not None and signal.during_eval_of == end:
                signal.name = "SIGINT"  # arrives while the period is evaluated
            policy.on_epoch_end(epoch, {"loss": loss(end) if callable(loss) else loss})
        policy.on_train_end()


def _policy(saved, total=100, seconds=0.0, **kwargs):
    return checkpointing.CheckpointPolicy(saved.append, total=total, seconds=seconds, **kwargs)


def test_with_0_seconds_it_saves_at_every_period_end_but_the_last():
    saved = []
    simulate(_policy(saved), 0, 100, 20, signal=FakeSignal())
    assert saved == [20, 40, 60, 80]


def test_a_resumed_round_saves_at_its_own_global_steps():
    saved = []
    simulate(_policy(saved), 47, 100, 20, signal=FakeSignal())
    assert saved == [60, 80]


def test_it_saves_when_seconds_passed_mid_period_and_at_period_ends():
    saved, clock = [], FakeClock()
    policy = _policy(saved, seconds=25.0, clock=clock, stop_requested=FakeSignal())
    simulate(policy, 0, 100, 20, clock=clock, per_batch=1.0)
    # 1 s per step: due after 25 s, at whichever comes first, a batch or a period end.
    assert saved == [25, 50, 75]


def test_period_ends_save_only_once_seconds_passed():
    saved, clock = [], FakeClock()
    policy = _policy(saved, seconds=30.0, clock=clock, stop_requested=FakeSignal())
    # Mid-period saves are checked at batch ends; here time only passes during evaluation.
    for first, length, count in train.pieces(0, 100, 20):
        policy.start_fit(first, length)
        for epoch in range(count):
            policy.on_epoch_begin(epoch)
            for batch in range(length):
                policy.on_train_batch_end(batch, {"loss": 1.0})
            clock.now += 20.0
            policy.on_epoch_end(epoch, {"loss": 1.0})
    assert saved == [40, 80]


def test_multi_worker_decides_by_step_never_by_clock():
    saved, clock = [], FakeClock()
    policy = _policy(saved, seconds=1e9, by_clock=False, clock=clock, stop_requested=FakeSignal())
    simulate(policy, 0, 100, 20, clock=clock, per_batch=1e6)  # clocks that disagree wildly
    assert saved == [20, 40, 60, 80]


def test_a_diverged_state_is_never_saved():
    saved = []
    nan_after_30 = lambda step: math.nan if step > 30 else 1.0  # noqa: E731
    policy = _policy(saved, seconds=0.0, stop_requested=FakeSignal())
    simulate(policy, 0, 100, 20, loss=nan_after_30)
    assert saved == [20]
    # Nor mid-period, nor on a signal.
    saved, clock, signal = [], FakeClock(), FakeSignal(at=35)
    policy = _policy(saved, seconds=5.0, clock=clock, stop_requested=signal)
    simulate(policy, 0, 100, 20, clock=clock, per_batch=1.0, loss=nan_after_30, signal=signal)
    assert saved and max(saved) <= 30


def test_a_signal_saves_at_the_next_batch_end_then_stops():
    saved, signal = [], FakeSignal(at=33)
    policy = _policy(saved, seconds=1e9, stop_requested=signal, label="round 2")
    with pytest.raises(Interrupted, match=r"SIGTERM in round 2 at step 33.*Rerun the same"):
        simulate(policy, 0, 100, 20, signal=signal)
    assert saved == [33]


def test_a_signal_during_an_evaluation_saves_at_that_period_end_then_stops():
    saved, signal = [], FakeSignal(during_eval_of=60)
    policy = _policy(saved, seconds=1e9, stop_requested=signal)
    with pytest.raises(Interrupted, match="SIGINT .* at step 60"):
        simulate(policy, 0, 100, 20, signal=signal)
    assert saved == [60]


def test_a_signal_during_the_last_evaluation_lets_the_round_finish():
    saved, signal = [], FakeSignal(during_eval_of=100)
    simulate(_policy(saved, seconds=1e9, stop_requested=signal), 0, 100, 20, signal=signal)
    assert saved == []  # the round writes its final weights; the next one refuses to start


def test_a_signal_between_two_fit_calls_stops_at_the_end_of_the_first():
    saved, signal = [], FakeSignal()
    policy = _policy(saved, seconds=1e9, stop_requested=signal)
    policy.start_fit(0, 20)
    policy.on_epoch_begin(0)
    for batch in range(20):
        policy.on_train_batch_end(batch, {"loss": 1.0})
    policy.on_epoch_end(0, {"loss": 1.0})
    signal.name = "SIGTERM"
    with pytest.raises(Interrupted, match="at step 20"):
        policy.on_train_end()
    assert saved == [20]


def test_callbacks_map_keras_epochs_and_batches_to_global_steps():
    cb = StepCallback()
    cb.start_fit(500, 100)  # a rewound round: its first fit call starts at k = 500
    cb.on_epoch_begin(0)
    assert cb.global_step(0) == 501
    cb.on_epoch_begin(2)
    assert cb.global_step(99) == 800 and cb.period_end_step() == 800


# ---- the round checkpointer on a real model ----------------------------------------------------


@pytest.fixture()
def compiled(tiny_config):
    config = tiny_config(optimizer="adam", lr=0.01, lr_drops=("10it",), lr_gamma=0.5)
    schedule = train.Schedule(
        steps_per_epoch=10, total=40, rewind=20, eval_every=10, warmup=0, boundaries=(10,)
    )
    x = keras.Input((8,))
    model = keras.Model(x, keras.layers.Dense(3, name="output")(x))
    train.compile_model(model, config, schedule)
    rng = np.random.default_rng(0)
    batch = rng.normal(size=(16, 8)).astype(np.float32), rng.integers(0, 3, size=16)
    return model, batch


def test_global_step_is_the_round_start_plus_the_optimizers_own_count(compiled):
    model, (x, y) = compiled
    train.reset_optimizer(model, 20)
    assert int(model.optimizer.iterations.numpy()) == 0  # Adam's bias correction restarts
    assert train.global_step(model) == 20
    for _ in range(3):
        model.train_on_batch(x, y)
    assert train.global_step(model) == 23
    assert int(model.optimizer.iterations.numpy()) == 3
    # The schedule continues from the round's start: the drop at step 10 is behind it.
    assert float(model.optimizer.learning_rate.numpy()) == pytest.approx(0.005)


def test_restore_brings_back_weights_slots_iterations_and_the_step_offset(compiled, tmp_path):
    model, (x, y) = compiled
    checkpoint = tf.train.Checkpoint(model=model, optimizer=model.optimizer)
    ckpt = checkpointing.RoundCheckpointer(checkpoint, str(tmp_path / "ckpt"))
    assert ckpt.latest() is None and ckpt.restore() is False
    train.reset_optimizer(model, 20)
    for _ in range(3):
        model.train_on_batch(x, y)
    ckpt.save(train.global_step(model))
    weights = model.get_weights()
    slots = [v.numpy() for v in model.optimizer.variables()]
    # Another round moves everything on.
    train.reset_optimizer(model, 0)
    model.train_on_batch(x, y)
    assert train.global_step(model) == 1

    again = checkpointing.RoundCheckpointer(checkpoint, str(tmp_path / "ckpt"))
    assert again.restore() is True
    assert int(train.step_offset(model).numpy()) == 20
    assert int(model.optimizer.iterations.numpy()) == 3
    assert train.global_step(model) == 23
    for a, b in zip(weights, model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(slots, [v.numpy() for v in model.optimizer.variables()], strict=True):
        np.testing.assert_array_equal(a, b)


def test_one_manager_per_round_keeps_only_the_latest_checkpoint(compiled, tmp_path):
    model, _ = compiled
    checkpoint = tf.train.Checkpoint(model=model, optimizer=model.optimizer)
    ckpt = checkpointing.RoundCheckpointer(checkpoint, str(tmp_path / "ckpt"))
    for step in (10, 20, 30):
        ckpt.save(step)
    assert ckpt.latest().endswith("ckpt-30")
    assert sorted({name.split(".")[0] for name in os.listdir(tmp_path / "ckpt")}) == [
        "checkpoint",
        "ckpt-30",
    ]
    ckpt.discard()
    assert not (tmp_path / "ckpt").exists()


def test_a_non_chief_checkpointer_writes_and_deletes_nothing(compiled, tmp_path):
    model, _ = compiled
    checkpoint = tf.train.Checkpoint(model=model, optimizer=model.optimizer)
    ckpt = checkpointing.RoundCheckpointer(checkpoint, str(tmp_path / "ckpt"), write=False)
    ckpt.save(10)
    assert not (tmp_path / "ckpt").exists()


def test_a_damaged_checkpoint_is_named_with_what_to_delete(compiled, tmp_path):
    model, _ = compiled
    checkpoint = tf.train.Checkpoint(model=model, optimizer=model.optimizer)
    directory = tmp_path / "ckpt"
    checkpointing.RoundCheckpointer(checkpoint, str(directory)).save(10)
    for name in os.listdir(directory):
        if name.startswith("ckpt-10.data"):
            blob = (directory / name).read_bytes()
            (directory / name).write_bytes(blob[: len(blob) // 2])
    ckpt = checkpointing.RoundCheckpointer(checkpoint, str(directory), label="round 4")
    with pytest.raises(checkpointing.CorruptCheckpointError, match="ckpt-10 cannot be restored"):
        ckpt.restore()
    with pytest.raises(
        checkpointing.CorruptCheckpointError, match=rf"Delete {directory} .*round 4"
    ):
        ckpt.restore()


# ---- a mid-round resume through Experiment -----------------------------------------------------


class _SignalAt(StepCallback):
    """Requests a stop (as a SIGTERM handler would) once global step `step` has run."""

    def __init__(self, step):
        super().__init__()
        self.step = step

    def on_train_batch_end(self, batch, logs=None):
        if self.global_step(batch) == self.step:
            StopRequest.signal_name = "SIGTERM"


def _quiet(*args):
    pass


def test_a_round_stopped_mid_way_resumes_its_exact_state(
    tiny_config, tmp_path, monkeypatch, capsys
):
    config = tiny_config(rounds=1, verbose=2)  # k = 20, 40 steps, one period per 20
    # One step per execution, so that the stop comes at the very next step (with the
    # automatic choice for small models it would come at the end of the execution).
    monkeypatch.setattr(train, "AUTO_STEPS_PER_EXECUTION", 1)
    reference = rounds.Experiment(config, str(tmp_path / "A"), checkpoint_seconds=0, log=_quiet)
    reference.run()
    out = capsys.readouterr().out
    # Progress: one line per evaluation period at global steps, no Keras "Epoch 1/1".
    assert "round 0: step 20/40" in out and "round 1: step 40/40" in out
    assert "Epoch" not in out and "round 1: step 20/40" not in out

    real_fit = train.fit_segment

    def fit_with_a_signal(model, data, cfg, schedule, start, end, *, callbacks=(), **kw):
        if start == 20:  # round 1: signal after step 25, the policy stops at 26
            callbacks = [*callbacks, _SignalAt(25)]
        return real_fit(model, data, cfg, schedule, start, end, callbacks=callbacks, **kw)

    monkeypatch.setattr(StopRequest, "signal_name", None)
    monkeypatch.setattr(train, "fit_segment", fit_with_a_signal)
    run_b = str(tmp_path / "B")
    lines = []
    with pytest.raises(Interrupted, match="round 1 at step 26"):
        rounds.Experiment(config, run_b, checkpoint_seconds=0, log=lines.append).run()
    rdir = paths.round_dir(run_b, 1)
    saved = tf.train.load_checkpoint(tf.train.latest_checkpoint(paths.resume_dir(rdir)))
    values = {
        k.split("/")[1]: saved.get_tensor(k)
        for k in saved.get_variable_to_shape_map()
        if k.startswith("optimizer/_iterations") or k.startswith("optimizer/step_offset")
    }
    assert values == {"_iterations": 6, "step_offset": 20}

    monkeypatch.setattr(StopRequest, "signal_name", None)
    monkeypatch.setattr(train, "fit_segment", real_fit)
    resumed = rounds.Experiment(config, run_b, checkpoint_seconds=0, log=lines.append)
    resumed.run()
    assert "   resuming round 1 from its checkpoint at step 26" in lines
    assert resumed.trained == [("imp", 1)]
    a = files.read_npz(paths.checkpoint_file(paths.round_dir(str(tmp_path / "A"), 1), "final"))
    b = files.read_npz(paths.checkpoint_file(rdir, "final"))
    for key in a:
        np.testing.assert_allclose(a[key], b[key], rtol=0, atol=1e-6, err_msg=key)
    assert not os.path.exists(paths.resume_dir(rdir))


def test_a_damaged_mid_round_checkpoint_stops_the_run_with_a_corrupt_run_error(
    tiny_config, tmp_path
):
    config = tiny_config(rounds=0)
    run_dir = str(tmp_path / "run")
    resume = paths.resume_dir(paths.round_dir(run_dir, 0))
    os.makedirs(resume)
    with open(os.path.join(resume, "checkpoint"), "w") as f:
        f.write('model_checkpoint_path: "ckpt-5"\nall_model_checkpoint_paths: "ckpt-5"\n')
    with open(os.path.join(resume, "ckpt-5.index"), "wb") as f:
        f.write(b"not a checkpoint")
    e = rounds.Experiment(config, run_dir, checkpoint_seconds=0, log=_quiet)
    with pytest.raises(rounds.CorruptRunError, match=r"ckpt-5 cannot be restored.*Delete .*ckpt"):
        e.run()


# ---- the progress display ----------------------------------------------------------------------


class _Stream(io.StringIO):
    def __init__(self, tty):
        super().__init__()
        self.tty = tty

    def isatty(self):
        return self.tty


def test_progress_mode_follows_verbose_and_the_terminal():
    assert progress_mode(0, _Stream(True)) is None
    assert progress_mode(1, _Stream(True)) == "bar"
    assert progress_mode(1, _Stream(False)) == "lines"
    assert progress_mode(2, _Stream(True)) == "lines"


def _drive(progress, start, total, period, clock=None):
    for first, length, count in train.pieces(start, total, period):
        progress.start_fit(first, length)
        progress.on_train_begin()
        for epoch in range(count):
            progress.on_epoch_begin(epoch)
            for batch in range(length):
                if clock is not None:
                    clock.now += 1.0
                progress.on_train_batch_end(batch, {"loss": 0.5})
            progress.on_epoch_end(epoch, {"loss": 0.5, "accuracy": 0.9, "val_accuracy": 0.8})
        progress.on_train_end()
    progress.close()


def test_lines_mode_prints_one_line_per_evaluation_period_at_global_steps():
    stream = _Stream(False)
    _drive(Progress(500, 1000, label="round 2", mode="lines", stream=stream), 500, 1000, 200)
    lines = stream.getvalue().splitlines()
    assert [line.split("  ")[0] for line in lines] == [
        "round 2: step 600/1000",
        "round 2: step 800/1000",
        "round 2: step 1000/1000",
    ]
    assert "val_accuracy 0.8000" in lines[0] and "\r" not in stream.getvalue()


def test_one_bar_per_round_starts_at_the_rounds_step_and_ends_its_line():
    stream, clock = _Stream(True), FakeClock()
    progress = Progress(500, 1000, label="round 2", mode="bar", stream=stream, clock=clock)
    _drive(progress, 500, 1000, 200, clock=clock)
    frames = [f for f in stream.getvalue().split("\r") if f]
    assert frames[0].startswith("round 2 [>") and " 500/1000 " in frames[0]
    assert " 1000/1000 " in frames[-1] and frames[-1].endswith("\n")
    assert stream.getvalue().count("\n") == 1  # one bar for the round's three fit calls
    assert "[" + "=" * Progress.WIDTH + "]" in frames[-1]


# ---- a stop in the last evaluation period ------------------------------------------------------
#
# The signal comes at the last batch end of a round (global step T = 40): the batch that also
# ends the period. The round must either finish there or save after the period's metrics line:
# a resumed run ends with the same files as an uninterrupted one (metrics.jsonl and summary.json
# included), for IMP rounds, controls, branches and stability copies alike.


def test_a_signal_at_the_last_batch_end_lets_the_round_finish():
    saved, signal = [], FakeSignal(at=100)
    simulate(_policy(saved, seconds=1e9, stop_requested=signal), 0, 100, 20, signal=signal)
    assert saved == []  # no checkpoint at T: the round writes its final weights and summary


def test_a_signal_at_a_period_ending_batch_saves_after_the_periods_evaluation():
    signal, order = FakeSignal(at=60), []

    class Saves(list):
        def append(self, step):
            order.append(("save", step))

    policy = _policy(Saves(), seconds=1e9, stop_requested=signal)
    policy.on_epoch_end = _tracing(policy.on_epoch_end, order, "period end")
    with pytest.raises(Interrupted, match="at step 60"):
        simulate(policy, 0, 100, 20, signal=signal)
    # The save comes from the period end (after PeriodEnd wrote the line), not the batch end.
    assert order[-2:] == [("period end", 60), ("save", 60)]


def _tracing(method, order, name):
    def traced(epoch, logs=None):
        order.append((name, method.__self__.period_end_step()))
        return method(epoch, logs)

    return traced


T = 40  # tiny_config: 40 steps, evaluation every 20, k = 20


def _round_files(root) -> dict:
    """{relative path: content} of every metrics.jsonl, summary.json and final.npz under root,
    without wall times."""
    out = {}
    for dirpath, _, names in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        for name in names:
            path = os.path.join(dirpath, name)
            if name == "metrics.jsonl":
                lines = files.read_jsonl(path)
                out[f"{rel}/{name}"] = [
                    {k: v for k, v in r.items() if k != "wall_seconds"} for r in lines
                ]
            elif name == "summary.json":
                summary = files.read_json(path)
                summary.pop("wall_seconds")
                out[f"{rel}/{name}"] = summary
            elif name == "final.npz":
                out[f"{rel}/{name}"] = {k: v.tobytes() for k, v in files.read_npz(path).items()}
    return out


def _stop_config(tiny_config):
    return tiny_config(rounds=1, controls=("random_prune",))


def _run_all(config, run_dir):
    """The run, a branch off its round 0 and a stability point: every kind of trained round."""
    from lth_tf import branching, linear_mode, rundir

    rundir.open_run_dir(config, run_dir)
    rounds.Experiment(config, run_dir, checkpoint_seconds=0, log=_quiet).run()
    e = rounds.Experiment(config, run_dir, checkpoint_seconds=0, log=_quiet)
    branching.Branch(e, branching.make_spec(e, "lr_rewind", num_rounds=1)).run()
    linear_mode.Stability(run_dir, num_alphas=3, log=_quiet).point(1, 20)


@pytest.fixture(scope="module")
def uninterrupted(tiny_config, tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("uninterrupted") / "run")
    _run_all(_stop_config(tiny_config), run_dir)
    return _round_files(run_dir)


# The fit calls of _run_all in order: round 0, round 1, its control, the branch's round 1,
# the stability copies 1 and 2.
@pytest.mark.parametrize(
    "call, what",
    [
        (1, "IMP round 1"),
        (2, "control random_prune"),
        (3, "branch lr_rewind"),
        (4, "stability copy 1"),
    ],
)
def test_a_stop_in_the_last_period_resumes_to_the_files_of_an_uninterrupted_run(
    tiny_config, tmp_path, monkeypatch, uninterrupted, call, what
):
    real_fit = train.fit_segment
    calls = []

    def fit_with_a_signal(model, data, cfg, schedule, start, end, *, callbacks=(), **kw):
        calls.append(start)
        if len(calls) - 1 == call:  # a signal arrives during the last execution of the round
            callbacks = [_SignalAt(T), *callbacks]  # before the policy sees the batch
        return real_fit(model, data, cfg, schedule, start, end, callbacks=callbacks, **kw)

    monkeypatch.setattr(train, "fit_segment", fit_with_a_signal)
    run_dir = str(tmp_path / "run")
    with pytest.raises(Interrupted):
        _run_all(_stop_config(tiny_config), run_dir)
    assert len(calls) == call + 1, what  # stopped in that round, not before
    monkeypatch.setattr(StopRequest, "signal_name", None)
    monkeypatch.setattr(train, "fit_segment", real_fit)
    _run_all(_stop_config(tiny_config), run_dir)
    assert _round_files(run_dir) == uninterrupted, what


@pytest.mark.parametrize("call, step", [(0, 15), (1, 35)])  # round 0, round 1 (its last period)
def test_a_stop_mid_period_resumes_the_periods_running_means(
    tiny_config, tmp_path, monkeypatch, call, step
):
    # Keras calls back every 5 steps: a signal can stop a round inside a period. The period's
    # training loss and accuracy (means over its steps) must come out as without the stop.
    config = tiny_config(rounds=1, steps_per_execution=5)
    reference = str(tmp_path / "reference")
    rounds.Experiment(config, reference, checkpoint_seconds=0, log=_quiet).run()
    real_fit = train.fit_segment
    calls = []

    def fit_with_a_signal(model, data, cfg, schedule, start, end, *, callbacks=(), **kw):
        calls.append(start)
        if len(calls) - 1 == call:
            callbacks = [_SignalAt(step), *callbacks]
        return real_fit(model, data, cfg, schedule, start, end, callbacks=callbacks, **kw)

    monkeypatch.setattr(train, "fit_segment", fit_with_a_signal)
    run_dir = str(tmp_path / "run")
    with pytest.raises(Interrupted, match=f"at step {step}"):
        rounds.Experiment(config, run_dir, checkpoint_seconds=0, log=_quiet).run()
    monkeypatch.setattr(StopRequest, "signal_name", None)
    monkeypatch.setattr(train, "fit_segment", real_fit)
    rounds.Experiment(config, run_dir, checkpoint_seconds=0, log=_quiet).run()
    assert _round_files(run_dir) == _round_files(reference)
