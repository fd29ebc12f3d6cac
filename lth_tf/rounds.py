"""Iterative magnitude pruning with rewinding: the rounds, the controls, resuming.

One `Experiment` owns one compiled, wrapped model and runs every round and
control branch with it: between rounds it only assigns weights, masks and the
optimizer's state, so the train step is traced once per process.

Each round is an idempotent phase: it is skipped when its summary.json exists,
and an unfinished round restarts from its last mid-round checkpoint.
"""

import contextlib
import dataclasses
import hashlib
import sys
import time

import numpy as np

from lth_tf import checkpointing, files, masks, models, paths, presets, sparsity, train
from lth_tf import data as data_lib
from lth_tf.callbacks import (
    Interrupted,
    PeriodEnd,
    Progress,
    RecordWeights,
    StopRequest,
    progress_mode,
)
from lth_tf.config import RunConfig
from lth_tf.keras import keras, tf
from lth_tf.rundir import CorruptRunError

IMP = "imp"


def round_fraction(config: RunConfig) -> float:
    """The fraction of surviving weights each round removes."""
    if config.target_density is None:
        return config.prune_fraction
    rounds = max(config.rounds, 1)
    return 1.0 - config.target_density ** (1.0 / rounds)


def _seed_for(*parts) -> int:
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:4], "little") % (2**31)


@dataclasses.dataclass
class _Clock:
    offset: float = 0.0
    t0: float = dataclasses.field(default_factory=time.time)

    def __call__(self) -> float:
        return self.offset + time.time() - self.t0


@dataclasses.dataclass(frozen=True)
class Start:
    """How a branch starts: its masks, its (unmasked) weights and its first global step."""

    masks: dict
    weights: dict
    step: int


# How each branch of round r >= 1 starts, from IMP's masks of that round. A new
# retraining mode (e.g. learning-rate rewinding, fine-tuning) is one more entry.
def _imp_start(e: "Experiment", r: int, imp_masks: dict) -> Start:
    return Start(imp_masks, e.rewind_weights(), e.schedule.rewind)


def _random_reinit_start(e: "Experiment", r: int, imp_masks: dict) -> Start:
    # Same mask, weights drawn afresh from the initialiser.
    weights = sparsity.get_weights(e._build(_seed_for(e.config.seed, "reinit", r)))
    return Start(imp_masks, weights, e.schedule.rewind)


def _random_prune_start(e: "Experiment", r: int, imp_masks: dict) -> Start:
    # A random mask with the IMP mask's per-layer densities, from the same W_k.
    random_masks = masks.random_like(imp_masks, _seed_for(e.config.seed, "prune", r))
    return Start(random_masks, e.rewind_weights(), e.schedule.rewind)


STARTS = {
    IMP: _imp_start,
    "random_reinit": _random_reinit_start,
    "random_prune": _random_prune_start,
}
CONTROLS = tuple(name for name in STARTS if name != IMP)


@dataclasses.dataclass(frozen=True)
class _Round:
    """One round (or control branch, or stability copy) to train into `rdir`."""

    rdir: str
    r: int
    branch: str
    start: Start
    record_rewind: bool = False  # round 0: save W_k on the way
    data_seed: int | None = None

    @property
    def label(self) -> str:
        return f"round {self.r}" if self.branch == IMP else f"round {self.r} ({self.branch})"


class Experiment:
    """One run: a config, its run directory, data, and one compiled wrapped model.

    Args:
      config: the run's frozen config.
      run_dir: where it is written (see lth_tf/paths.py).
      strategy: a tf.distribute strategy (default: the default strategy).
      checkpoint_seconds: save a mid-round checkpoint at the end of an evaluation
        period when this many seconds passed since the last one (0: every period),
        and mid-period once that many seconds passed (preemptible machines).
      write: False on non-chief workers.
      log: a print-like function for progress lines.
      data: a dataset object to use instead of loading config.dataset (tests,
        custom pipelines); it must have lth_tf.data.ArrayData's interface.
    """

    def __init__(
        self,
        config: RunConfig,
        run_dir: str,
        *,
        strategy=None,
        checkpoint_seconds: float = 300.0,
        write: bool = True,
        log=print,
        data=None,
    ):
        self.config = config
        self.run_dir = run_dir
        self.strategy = strategy or tf.distribute.get_strategy()
        self.checkpoint_seconds = checkpoint_seconds
        self.write = write
        self.log = log
        recipe = presets.recipe(config.arch)
        if data is None:
            data = data_lib.load(
                config.dataset,
                data_dir=config.data_dir,
                augment=config.augment,
                arch_dataset=recipe["dataset"],
            )
        self.data = data
        self.schedule = train.resolve(config, self.data.steps_per_epoch(config.batch_size))
        with self.strategy.scope(), _precision(config.mixed_precision):
            self.model = sparsity.wrap(self._build(config.seed), output_rate=config.output_rate)
            train.compile_model(
                self.model,
                config,
                self.schedule,
                steps_per_execution=train.execution_steps(self.model, config, self.schedule),
            )
            # The optimizer's state includes `iterations` and the round's step offset.
            self.checkpoint = tf.train.Checkpoint(model=self.model, optimizer=self.model.optimizer)
        self.initial_weights = sparsity.get_weights(self.model)
        self.layers = sorted(sparsity.wrappers(self.model))
        self.rates = {
            n: config.output_rate if n == models.OUTPUT_LAYER else 1.0 for n in self.layers
        }
        self.trained = []  # (branch, round) trained by this process, for tests and logs

    def _build(self, seed):
        return models.build_model(
            self.config.arch,
            self.data.input_shape,
            self.data.num_classes,
            seed=seed,
            weight_decay=self.config.weight_decay,
        )

    # ---- the protocol ----------------------------------------------------------------------

    def run(self) -> list:
        """Runs (or resumes) round 0 and IMP rounds 1..config.rounds with their controls."""
        summaries = [self.dense_round()]
        for r in range(1, self.config.rounds + 1):
            round_masks = self.imp_masks(r)
            summaries.append(self.imp_round(r, round_masks))
            for control in self.config.controls:
                summaries.append(self.control_round(control, r, round_masks))
        return summaries

    def dense_round(self) -> dict:
        ones = masks.ones_like({n: self.initial_weights[f"{n}/kernel"] for n in self.layers})
        start = Start(ones, self.initial_weights, 0)
        rdir = paths.round_dir(self.run_dir, 0)
        return self._train_round(_Round(rdir, 0, IMP, start, record_rewind=True))

    def rewind_weights(self) -> dict:
        path = paths.checkpoint_file(paths.round_dir(self.run_dir, 0), "rewind")
        if not files.exists(path):
            raise FileNotFoundError(f"{path} is missing: round 0 must finish before pruning.")
        if getattr(self, "_rewind_cache", (None,))[0] != path:
            self._rewind_cache = (path, files.read_npz(path))  # read once per process
        return self._rewind_cache[1]

    def imp_masks(self, r: int) -> dict:
        """Masks of IMP round r: round r-1's masks pruned by magnitude of its final weights."""
        # Always recomputed (cheap): _train_round checks a saved masks.npz against it,
        # so a mask file that does not follow from the previous round is detected.
        prev = paths.round_dir(self.run_dir, r - 1)
        prev_masks = files.read_npz(paths.masks_file(prev))
        final = files.read_npz(paths.checkpoint_file(prev, "final"))
        kernels = {n: final[f"{n}/kernel"] for n in self.layers}
        new = masks.prune(
            kernels, prev_masks, round_fraction(self.config), self.config.prune_scope, self.rates
        )
        masks.check_subset(new, prev_masks)
        return new

    def imp_round(self, r: int, round_masks: dict) -> dict:
        return self._branch_round(IMP, r, round_masks)

    def control_round(self, control: str, r: int, imp_masks: dict) -> dict:
        if control not in CONTROLS:
            raise ValueError(f"Unknown control {control!r}. Known controls: {', '.join(CONTROLS)}.")
        return self._branch_round(control, r, imp_masks)

    def _branch_round(self, branch: str, r: int, imp_masks: dict) -> dict:
        # The start is computed even when the round is done, as it always was: a
        # reinitialised model is built in the same order whatever was finished.
        start = STARTS[branch](self, r, imp_masks)
        rdir = paths.round_dir(self.run_dir, r, None if branch == IMP else branch)
        return self._train_round(_Round(rdir, r, branch, start))

    def train_branch(self, rdir, r, branch, round_masks, weights, start_step, data_seed=None):
        """Trains masked `weights` from `start_step` to the end into `rdir` (idempotent).

        Used by the stability analyses for copies trained with other data orders.
        """
        start = Start(round_masks, weights, start_step)
        return self._train_round(_Round(rdir, r, branch, start, data_seed=data_seed))

    # ---- one round: named steps --------------------------------------------------------------

    def _train_round(self, rd: _Round) -> dict:
        summary_path = paths.summary_file(rd.rdir)
        if files.exists(summary_path):
            return files.read_json(summary_path)
        self._refuse_if_stopping(rd)
        self.log(
            f"== {rd.label}: density {masks.density(rd.start.masks):.4f}, "
            f"steps {rd.start.step}..{self.schedule.total}"
        )
        self._verify_or_write_masks(rd)
        checkpointer = checkpointing.RoundCheckpointer(
            self.checkpoint, paths.resume_dir(rd.rdir), write=self.write, label=rd.label
        )
        start = self._restore_or_start(rd, checkpointer)
        metrics_path = paths.metrics_file(rd.rdir)
        kept = files.truncate_jsonl(metrics_path, start) if self.write else []
        clock = _Clock(offset=kept[-1]["wall_seconds"] if kept else 0.0)
        recorder = self._rewind_recorder(rd, start)
        self._train(rd, start, checkpointer, recorder, clock)
        return self._finish(rd, checkpointer, clock)

    def _refuse_if_stopping(self, rd: _Round) -> None:
        if StopRequest.signal_name is not None:
            raise Interrupted(
                f"Stopped by {StopRequest.signal_name} before round {rd.r} ({rd.branch}); every "
                "earlier round is finished. Rerun the same command to go on."
            )

    def _verify_or_write_masks(self, rd: _Round) -> None:
        """Writes the round's masks, or checks that a saved masks.npz is these masks."""
        masks_path = paths.masks_file(rd.rdir)
        if files.exists(masks_path):
            saved = files.read_npz(masks_path)
            expected = rd.start.masks
            if set(saved) != set(expected) or any(
                not np.array_equal(saved[n], expected[n]) for n in saved
            ):
                raise CorruptRunError(
                    f"{masks_path} does not match the masks that follow from the previous round "
                    f"for {rd.label}: the file was changed or the run is damaged. Delete "
                    f"{rd.rdir} to recompute the round."
                )
        elif self.write:
            files.write_npz(masks_path, rd.start.masks)
            files.write_json(paths.sparsity_file(rd.rdir), masks.report(rd.start.masks))

    def _restore_or_start(self, rd: _Round, checkpointer) -> int:
        """Puts the model at the round's start, or at its last checkpoint; returns the step."""
        # A damaged checkpoint raises checkpointing.CorruptCheckpointError, a CorruptRunError.
        if checkpointer.restore():
            start = train.global_step(self.model)
            self.log(f"   resuming {rd.label} from its checkpoint at step {start}")
            return start
        masked = _apply(rd.start.weights, rd.start.masks)
        sparsity.set_masks(self.model, rd.start.masks)
        sparsity.set_weights(self.model, masked)
        train.reset_optimizer(self.model, rd.start.step)
        if self.write:
            files.write_npz(paths.checkpoint_file(rd.rdir, "start"), masked, compress=False)
        return rd.start.step

    def _rewind_recorder(self, rd: _Round, start: int):
        """Round 0's callback that saves W_k, or None when there is nothing to record."""
        if not rd.record_rewind:
            return None
        at = self.schedule.rewind
        path = paths.checkpoint_file(rd.rdir, "rewind")
        if start > at:
            if not files.exists(path):
                raise CorruptRunError(
                    f"{path} is missing but round 0 resumed past step {at}. "
                    f"Delete {rd.rdir} to retrain the dense network."
                )
            return None  # recorded before the checkpoint we resumed from
        # (Re)record W_k in this very trajectory, even if a file exists from an
        # attempt that was killed before its first checkpoint.

        def save(step):
            if self.write:
                files.write_npz(path, sparsity.get_weights(self.model), compress=False)

        return RecordWeights(at, save)

    def _train(self, rd: _Round, start: int, checkpointer, recorder, clock) -> None:
        """Trains from `start` to the end with the round's callbacks; closes its writer."""
        total = self.schedule.total
        writer = (
            tf.summary.create_file_writer(paths.tensorboard_dir(rd.rdir)) if self.write else None
        )
        test_data = None
        if self.config.test_every_period:
            test_data = self.data.eval("test", train.eval_batch_size(self.config))
        callbacks = [
            PeriodEnd(paths.metrics_file(rd.rdir), writer, self.write, clock, test_data),
            checkpointing.CheckpointPolicy(
                checkpointer.save,
                total=total,
                seconds=self.checkpoint_seconds,
                # Workers of a multi-worker run must take the same checkpoints: they
                # decide by step (every period end), never by their own clocks.
                by_clock=not isinstance(self.strategy, tf.distribute.MultiWorkerMirroredStrategy),
                label=rd.label,
            ),
        ]
        if recorder is not None:
            callbacks.insert(0, recorder)  # W_k is recorded before a checkpoint at k
        mode = progress_mode(self.config.verbose, sys.stdout) if self.write else None
        progress = Progress(start, total, label=rd.label, mode=mode) if mode else None
        if progress is not None:
            callbacks.append(progress)
        try:
            train.fit_segment(
                self.model,
                self.data,
                self.config,
                self.schedule,
                start,
                total,
                callbacks=callbacks,
                data_seed=rd.data_seed,
            )
        finally:
            if progress is not None:
                progress.close()
            if writer is not None:
                writer.close()

    def _finish(self, rd: _Round, checkpointer, clock) -> dict:
        """Tests the trained network, writes final weights and summary.json (last)."""
        self.trained.append((rd.branch, rd.r))
        test = train.evaluate(self.model, self.data, "test", train.eval_batch_size(self.config))
        final = sparsity.get_weights(self.model)
        summary = _summary(
            rd.r,
            rd.branch,
            masks.density(rd.start.masks),
            rd.start.step,
            self.schedule.total,
            test,
            files.read_jsonl(paths.metrics_file(rd.rdir)),
            clock(),
        )
        if self.write:
            files.write_npz(paths.checkpoint_file(rd.rdir, "final"), final, compress=False)
            files.write_json(paths.summary_file(rd.rdir), summary)  # last: the round is done
        checkpointer.discard()
        self.log(
            f"   {rd.label}: test accuracy {summary['test_accuracy']:.4f}, "
            f"best validation {summary['best_validation_accuracy']:.4f} at step "
            f"{summary['best_validation_step']}, {summary['wall_seconds']:.0f}s"
        )
        return summary


@contextlib.contextmanager
def _precision(mixed_precision):
    """Layers built inside take the mixed-precision policy; variables stay float32."""
    if mixed_precision is None:
        yield
        return
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(f"mixed_{mixed_precision}")
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(previous)


def _apply(weights: dict, round_masks: dict) -> dict:
    out = dict(weights)
    for name, mask in round_masks.items():
        key = f"{name}/kernel"
        out[key] = (weights[key] * mask).astype(weights[key].dtype)
    return out


def _summary(r, branch, density, start, end, test, metrics, seconds) -> dict:
    evals = [m for m in metrics if "val_accuracy" in m]
    best = max(evals, key=lambda m: m["val_accuracy"]) if evals else {}
    lowest = min(evals, key=lambda m: m["val_loss"]) if evals else {}
    last = metrics[-1] if metrics else {}
    return {
        "round": r,
        "branch": branch,
        "density": density,
        "test_accuracy": test["accuracy"],
        "test_loss": test["loss"],
        "best_validation_accuracy": best.get("val_accuracy"),
        "best_validation_step": best.get("step"),
        "early_stopping_step": lowest.get("step"),  # minimum validation loss, as in the paper
        # With test_every_period: test accuracy at those iterations (the 2019 paper's figures).
        "test_accuracy_at_early_stopping": lowest.get("test_accuracy"),
        "test_accuracy_at_best_validation": best.get("test_accuracy"),
        "min_validation_loss": lowest.get("val_loss"),
        "train_accuracy": last.get("accuracy"),
        "start_step": start,
        "end_step": end,
        "steps": end - start,
        "wall_seconds": round(seconds, 2),
    }
