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
import time

import numpy as np

from lth_tf import data as data_lib
from lth_tf import files, masks, models, paths, presets, sparsity, train
from lth_tf.callbacks import BatchEnd, Interrupted, StopRequest
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


class Experiment:
    """One run: a config, its run directory, data, and one compiled wrapped model.

    Args:
      config: the run's frozen config.
      run_dir: where it is written (see lth_tf/paths.py).
      strategy: a tf.distribute strategy (default: the default strategy).
      checkpoint_seconds: save a mid-round checkpoint at the end of an evaluation
        period when this many seconds passed since the last one (0: every period).
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
                validation_holdout=config.validation_holdout,
            )
        self.data = data
        self.schedule = train.resolve(config, self.data.steps_per_epoch(config.batch_size))
        with self.strategy.scope(), _precision(config.mixed_precision):
            self.model = sparsity.wrap(self._build(config.seed), output_rate=config.output_rate)
            train.compile_model(self.model, config, self.schedule)
            self.checkpoint = tf.train.Checkpoint(model=self.model, optimizer=self.model.optimizer)
        self.initial_weights = sparsity.get_weights(self.model)
        self.layers = sorted(sparsity.wrappers(self.model))
        self.rates = sparsity.layer_rates(self.model, config)
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
        rdir = paths.round_dir(self.run_dir, 0)
        ones = masks.ones_like({n: self.initial_weights[f"{n}/kernel"] for n in self.layers})
        return self._train_round(
            rdir, 0, IMP, ones, self.initial_weights, start_step=0, record_rewind=True
        )

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
        rdir = paths.round_dir(self.run_dir, r)
        return self._train_round(
            rdir, r, IMP, round_masks, self.rewind_weights(), start_step=self.schedule.rewind
        )

    def control_round(self, control: str, r: int, imp_masks: dict) -> dict:
        rdir = paths.round_dir(self.run_dir, r, control)
        if control == "random_reinit":
            # Same mask, weights drawn afresh from the initialiser.
            weights = sparsity.get_weights(self._build(_seed_for(self.config.seed, "reinit", r)))
            round_masks = imp_masks
        elif control == "random_prune":
            # Random mask with the IMP mask's per-layer densities, from the same W_k.
            round_masks = masks.random_like(imp_masks, _seed_for(self.config.seed, "prune", r))
            weights = self.rewind_weights()
        else:
            raise ValueError(f"Unknown control {control!r}.")
        return self._train_round(
            rdir, r, control, round_masks, weights, start_step=self.schedule.rewind
        )

    # ---- one round ----------------------------------------------------------------------

    def train_branch(self, rdir, r, branch, round_masks, weights, start_step, data_seed=None):
        """Trains masked `weights` from `start_step` to the end into `rdir` (idempotent).

        Used by the stability analyses for copies trained with other data orders.
        """
        return self._train_round(
            rdir, r, branch, round_masks, weights, start_step, data_seed=data_seed
        )

    def _train_round(
        self, rdir, r, branch, round_masks, weights, start_step, record_rewind=False, data_seed=None
    ):
        summary_path = paths.summary_file(rdir)
        if files.exists(summary_path):
            return files.read_json(summary_path)
        if StopRequest.signal_name is not None:
            raise Interrupted(
                f"Stopped by {StopRequest.signal_name} before round {r} ({branch}); every "
                "earlier round is finished. Rerun the same command to go on."
            )
        label = f"round {r}" if branch == IMP else f"round {r} ({branch})"
        density = masks.density(round_masks)
        self.log(f"== {label}: density {density:.4f}, steps {start_step}..{self.schedule.total}")
        masks_path = paths.masks_file(rdir)
        if files.exists(masks_path):
            saved = files.read_npz(masks_path)
            if set(saved) != set(round_masks) or any(
                not np.array_equal(saved[n], round_masks[n]) for n in saved
            ):
                raise CorruptRunError(
                    f"{masks_path} does not match the masks that follow from the previous round "
                    f"for {label}: the file was changed or the run is damaged. Delete "
                    f"{rdir} to recompute the round."
                )
        elif self.write:
            files.write_npz(masks_path, round_masks)
            files.write_json(paths.sparsity_file(rdir), masks.report(round_masks))

        masked = _apply(weights, round_masks)
        resume = paths.resume_dir(rdir)
        latest = tf.train.latest_checkpoint(resume) if files.exists(resume) else None
        if latest:
            try:
                self.checkpoint.restore(latest).assert_existing_objects_matched()
            except (tf.errors.OpError, ValueError, AssertionError) as e:
                raise CorruptRunError(
                    f"The mid-round checkpoint {latest} cannot be restored ({type(e).__name__}: "
                    f"{str(e)[:200]}). Delete {resume} to restart {label} from its start."
                ) from e
            start = int(self.model.optimizer.iterations.numpy())
            self.log(f"   resuming {label} from its checkpoint at step {start}")
        else:
            sparsity.set_masks(self.model, round_masks)
            sparsity.set_weights(self.model, masked)
            train.reset_optimizer(self.model, start_step)
            start = start_step
            if self.write:
                files.write_npz(paths.checkpoint_file(rdir, "start"), masked, compress=False)
        metrics_path = paths.metrics_file(rdir)
        kept = files.truncate_jsonl(metrics_path, start) if self.write else []
        clock = _Clock(offset=kept[-1]["wall_seconds"] if kept else 0.0)

        rewind_path = paths.checkpoint_file(rdir, "rewind")
        record_at = None
        if record_rewind:
            record_at = self.schedule.rewind
            if start > record_at:
                if not files.exists(rewind_path):
                    raise CorruptRunError(
                        f"{rewind_path} is missing but round 0 resumed past step {record_at}. "
                        f"Delete {rdir} to retrain the dense network."
                    )
                record_at = None  # recorded before the checkpoint we resumed from
            # else: (re)record W_k in this very trajectory, even if a file exists from an
            # attempt that was killed before its first checkpoint.

        def save_rewind(step):
            if self.write:
                files.write_npz(rewind_path, sparsity.get_weights(self.model), compress=False)

        total = self.schedule.total
        # Workers of a multi-worker run must take the same checkpoints: they decide by
        # step (every period end), never by their own clocks.
        by_clock = not isinstance(self.strategy, tf.distribute.MultiWorkerMirroredStrategy)
        last_save = [time.time()]

        def due():
            return not by_clock or time.time() - last_save[0] >= self.checkpoint_seconds

        def on_period_end(step):
            if step < total and due():
                self._save_checkpoint(resume)
                last_save[0] = time.time()

        def stop(step):
            raise Interrupted(
                f"Stopped by {StopRequest.signal_name} in {label} at step {step}, after saving a "
                "checkpoint there. Rerun the same command to resume from it."
            )

        def on_batch_end(logs):
            # Clean stops on signals (straight out of fit: no validation pass first) and
            # mid-period checkpoints for preemptible machines; never a checkpoint of
            # weights that already diverged.
            # The loss is read (a host sync) only when a checkpoint is about to be saved.
            stopping = StopRequest.signal_name is not None
            if not stopping and (not by_clock or self.checkpoint_seconds <= 0 or not due()):
                return
            loss = logs.get("loss")
            if loss is not None and not np.isfinite(float(loss)):
                return
            step = int(self.model.optimizer.iterations.numpy())
            if stopping:
                self._save_checkpoint(resume)
                stop(step)
            if step % self.schedule.eval_every and step < total:  # period ends: on_period_end
                self._save_checkpoint(resume)
                last_save[0] = time.time()

        writer = tf.summary.create_file_writer(paths.tensorboard_dir(rdir)) if self.write else None
        train.fit_segment(
            self.model,
            self.data,
            self.config,
            self.schedule,
            start,
            total,
            record_at=record_at,
            on_record=save_rewind,
            metrics_path=metrics_path,
            summary_writer=writer,
            on_period_end=on_period_end,
            write=self.write,
            elapsed=clock,
            data_seed=data_seed,
            extra_callbacks=[BatchEnd(on_batch_end)],
            should_stop=lambda: StopRequest.signal_name is not None,
        )
        step = int(self.model.optimizer.iterations.numpy())
        if StopRequest.signal_name is not None and step < total:
            # The signal came during an evaluation, after the last batch of a fit call.
            self._save_checkpoint(resume)
            stop(step)
        self.trained.append((branch, r))
        test = train.evaluate(self.model, self.data, "test", train.eval_batch_size(self.config))
        final = sparsity.get_weights(self.model)
        summary = _summary(
            r,
            branch,
            density,
            start_step,
            self.schedule.total,
            test,
            files.read_jsonl(metrics_path),
            clock(),
        )
        if self.write:
            files.write_npz(paths.checkpoint_file(rdir, "final"), final, compress=False)
            files.write_json(summary_path, summary)  # written last: the round is done
            if files.exists(resume):
                tf.io.gfile.rmtree(resume)
        self.log(
            f"   {label}: test accuracy {summary['test_accuracy']:.4f}, "
            f"best validation {summary['best_validation_accuracy']:.4f} at step "
            f"{summary['best_validation_step']}, {summary['wall_seconds']:.0f}s"
        )
        return summary

    def _save_checkpoint(self, resume_dir):
        if not self.write:
            return
        tf.io.gfile.makedirs(resume_dir)
        manager = tf.train.CheckpointManager(self.checkpoint, resume_dir, max_to_keep=1)
        manager.save(checkpoint_number=int(self.model.optimizer.iterations.numpy()))


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
