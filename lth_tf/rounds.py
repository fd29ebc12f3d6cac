"""Iterative magnitude pruning with rewinding: the rounds, the controls, resuming.

One `Experiment` owns one compiled, wrapped model and runs every round and
control branch with it: between rounds it only assigns weights, masks and the
optimizer's state, so the train step is traced once per process.

Each round is an idempotent phase: it is skipped when its summary.json exists,
and an unfinished round restarts from its last mid-round checkpoint. Under
multi-worker training the workers first agree whether it is finished; where it
is on some workers only (one was killed between the workers' summary.json
writes), every worker completes it from its final.npz (finished_only_on).
"""

import contextlib
import dataclasses
import sys
import time

import numpy as np

from lth_tf import (
    checkpointing,
    criteria,
    files,
    masks,
    models,
    paths,
    presets,
    sparsity,
    steps,
    subnetworks,
    train,
)
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

IMP = subnetworks.IMP
# How a round starts (masks, weights, first step): lth_tf.subnetworks.Start.
Start = subnetworks.Start


def round_fraction(config: RunConfig) -> float:
    """The fraction of surviving weights each round removes (every rate 1; else see
    Experiment.matched_rounds)."""
    if config.target_density is None:
        return config.prune_fraction
    rounds = max(config.rounds, 1)
    return 1.0 - config.target_density ** (1.0 / rounds)


_seed_for = subnetworks.seed_for


@dataclasses.dataclass
class _Clock:
    offset: float = 0.0
    t0: float = dataclasses.field(default_factory=time.time)

    def __call__(self) -> float:
        return self.offset + time.time() - self.t0


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


def _round_list(rounds: list[int]) -> str:
    """'round 0', 'rounds 0-3' (consecutive) or 'rounds 1, 3'."""
    if len(rounds) == 1:
        return f"round {rounds[0]}"
    if rounds == list(range(rounds[0], rounds[-1] + 1)):
        return f"rounds {rounds[0]}-{rounds[-1]}"
    return f"rounds {', '.join(map(str, rounds))}"


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
      rewind_points: durations ('100it', '2ep') or steps of more rewind points k
        whose weights W_k round 0 records besides the run's own k (`imp
        --rewind_steps`), for branches rewound elsewhere (lth_tf.branching). Not
        part of the run's identity: they add files, they change nothing trained.
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
        rewind_points=(),
    ):
        self.config = config
        self.run_dir = run_dir
        self.strategy = strategy or tf.distribute.get_strategy()
        # Multi-worker: the workers agree on stops and on the step they resume from.
        self.agreement = checkpointing.agreement(self.strategy)
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
                input_shards=config.input_shards,
            )
        self.data = data
        self.schedule = train.resolve(config, self.data.steps_per_epoch(config.batch_size))
        self.rewind_points = resolve_rewind_points(rewind_points, config, self.schedule)
        with self.strategy.scope(), _precision(config.mixed_precision):
            self.model = sparsity.wrap(self._build(config.seed), output_rate=config.output_rate)
            train.compile_model(
                self.model,
                config,
                self.schedule,
                steps_per_execution=train.execution_steps(self.model, config, self.schedule),
            )
            # The optimizer's state includes `iterations` and the round's step offset; a
            # period's running training metrics are saved too (checkpointing.metric_state).
            self.checkpoint = tf.train.Checkpoint(
                model=self.model,
                optimizer=self.model.optimizer,
                **checkpointing.metric_state(self.model, self.strategy),
            )
        self.initial_weights = sparsity.get_weights(self.model)
        self.layers = sorted(sparsity.wrappers(self.model))
        # {name: class} of the layers with weights that stay dense in every round.
        self.unmasked = sparsity.unmasked_layers(self.model)
        self.rates = sparsity.layer_rates(self.model, config)
        self.criterion = criteria.resolve(config.prune_criterion)  # a user's: imported now
        self.trained = []  # (branch, round) trained by this process, for tests and logs

    def fresh_weights(self, seed: int) -> dict:
        """The weights of a model built afresh from the initialiser with `seed` (unmasked)."""
        return sparsity.get_weights(self._build(seed))

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
        self._say_what_is_finished()
        summaries = [self.dense_round()]
        for r in range(1, self.config.rounds + 1):
            round_masks = self.imp_masks(r)
            summaries.append(self.imp_round(r, round_masks))
            for control in self.config.controls:
                summaries.append(self.control_round(control, r, round_masks))
        return summaries

    def _say_what_is_finished(self) -> None:
        """On a rerun, says which of the rounds `run` would train are finished (kept as they are)."""
        done = {}
        for branch in (IMP, *self.config.controls):
            for r in range(0 if branch == IMP else 1, self.config.rounds + 1):
                rdir = paths.round_dir(self.run_dir, r, None if branch == IMP else branch)
                if files.exists(paths.summary_file(rdir)):
                    done.setdefault(branch, []).append(r)
        if not done:
            return
        total = (self.config.rounds + 1) + self.config.rounds * len(self.config.controls)
        count = sum(len(rs) for rs in done.values())
        listed = "; ".join(f"{b} {_round_list(rs)}" for b, rs in done.items())
        if count == total:
            self.log(
                f"Every round this command asks for is already finished ({listed}): nothing "
                "to train. Add --rounds=N with a larger N to prune further."
            )
        else:
            self.log(f"Already finished, kept as they are: {listed}. Training the rest.")

    def dense_round(self) -> dict:
        ones = masks.ones_like({n: self.initial_weights[f"{n}/kernel"] for n in self.layers})
        start = Start(ones, self.initial_weights, 0)
        rdir = paths.round_dir(self.run_dir, 0)
        if files.exists(paths.summary_file(rdir)):
            missing = [k for k in self.rewind_points if not self._recorded(k)]
            if missing:
                self.log(
                    f"   round 0 is finished without W_k for k = {missing}: too late to record "
                    "them; lth_tf.branch trains the dense network from W_0 to k where needed."
                )
        return self._train_round(
            _Round(rdir, 0, IMP, start, record_rewind=True, data_seed=self.round_data_seed(0))
        )

    def _recorded(self, k: int) -> bool:
        r0 = paths.round_dir(self.run_dir, 0)
        if k == 0:
            return files.exists(paths.checkpoint_file(r0, "start"))
        if k == self.schedule.rewind:
            return files.exists(paths.checkpoint_file(r0, "rewind"))
        return files.exists(paths.rewind_file(r0, k))

    def dense_weights_at(self, k: int, *, source: str | None = None) -> dict:
        """The dense W_k of this run: recorded by round 0 where it was, else trained to k.

        Round 0 records the run's own k (checkpoints/rewind.npz) and every k of
        `rewind_points` (checkpoints/rewind_step_NNNNNNN.npz); W_0 is round 0's
        start.npz (not written twice: no rewind.npz when k = 0). Any other k is
        trained from W_0 with round 0's data order and a fresh optimizer (k steps;
        it does not count as a trained round), and cached
        under this Experiment's run_dir (paths.rewind_point_file). The one way to
        W_k: branches (lth_tf.branching), criteria (masks_after) and the stability
        analyses (lth_tf.linear_mode) all ask here.

        Args:
          k: the step.
          source: the run directory whose round 0 is read (default: run_dir); a
            stability worker reads the chief's run and caches in its own copy.

        Raises:
          ValueError: k is outside the schedule [0, T).
          FileNotFoundError: round 0 has not started (no start.npz), or it has
            not recorded the run's own k.
        """
        steps.rewind_point(
            k,
            self.schedule.steps_per_epoch,
            self.schedule.total,
            self.config.training_steps,
            "rewind_step",
        )
        if k == self.schedule.rewind and source is None:
            return self.rewind_weights()
        r0 = paths.round_dir(source or self.run_dir, 0)
        start = paths.checkpoint_file(r0, "start")
        candidates = [paths.rewind_file(r0, k), paths.rewind_point_file(self.run_dir, k)]
        if k == self.schedule.rewind:
            candidates.insert(0, paths.checkpoint_file(r0, "rewind"))
        if k == 0:
            candidates.append(start)
        for path in candidates:
            if files.exists(path):
                return files.read_npz(path)
        if not files.exists(start):
            raise FileNotFoundError(
                f"{start} is missing: round 0 must run before rewinding to {k}."
            )
        self.log(f"== W_{k} was not recorded by round 0: training the dense network 0..{k}")
        init = files.read_npz(start)
        sparsity.set_masks(
            self.model, masks.ones_like({n: init[f"{n}/kernel"] for n in self.layers})
        )
        sparsity.set_weights(self.model, init)
        train.reset_optimizer(self.model, 0)
        train.fit_segment(self.model, self.data, self.config, self.schedule, 0, k)
        self.trained.append(("dense_to_k", k))
        weights = sparsity.get_weights(self.model)
        if self.write:
            files.write_npz(paths.rewind_point_file(self.run_dir, k), weights, compress=False)
        return weights

    def final_weights(self, rdir: str) -> dict:
        """A finished round's final weights (checkpoints/final.npz)."""
        return files.read_npz(paths.checkpoint_file(rdir, "final"))

    def rewind_weights(self) -> dict:
        """W_k: round 0's rewind.npz, or its start.npz when k = 0 (W_0, not written twice)."""
        r0 = paths.round_dir(self.run_dir, 0)
        path = _w_k_file(r0, self.schedule.rewind)
        if not files.exists(path):
            if files.exists(paths.summary_file(r0)):
                raise CorruptRunError(
                    f"{path} is missing, although round 0 is finished "
                    f"({paths.summary_file(r0)}): W_k, the weights every pruned round rewinds "
                    "to, was deleted or moved. Nothing was changed, and every finished round is "
                    "kept. Put the file back (e.g. from a copy of the run) and rerun the same "
                    "command. It cannot be recomputed in place: round 0 would have to train "
                    "again, and the finished rounds would no longer follow from it; for a fresh "
                    "run use another --run_name or --root_dir."
                )
            raise FileNotFoundError(f"{path} is missing: round 0 must finish before pruning.")
        if getattr(self, "_rewind_cache", (None,))[0] != path:
            self._rewind_cache = (path, files.read_npz(path))  # read once per process
        return self._rewind_cache[1]

    def imp_masks(self, r: int) -> dict:
        """Masks of IMP round r: round r-1's masks pruned by magnitude of its final weights."""
        # Always recomputed (cheap): _train_round checks a saved masks.npz against it,
        # so a mask file that does not follow from the previous round is detected.
        return self.masks_after(
            paths.round_dir(self.run_dir, r - 1), imp_rounds=self.matched_rounds(r), r=r
        )

    def kernel_sizes(self) -> dict:
        """{prunable layer: its kernel's size}."""
        return {n: self.initial_weights[f"{n}/kernel"].size for n in self.layers}

    def matched_rounds(self, r: int) -> float | None:
        """With a target density and a layer at a rate other than 1: IMP's rounds of round r.

        Round r of R is then where IMP at --prune_fraction (and the rates) is after
        r * n / R rounds, n its rounds to the target overall density
        (masks.matched_rounds): round R reaches the target overall with each
        layer where IMP would have it. None otherwise: every round prunes
        round_fraction (with every rate 1 that reaches the target in every layer).
        """
        c = self.config
        if c.target_density is None or all(rate == 1 for rate in self.rates.values()):
            return None
        n = masks.matched_rounds(
            self.kernel_sizes(), c.target_density, c.prune_fraction, c.prune_scope, self.rates
        )
        return n if r == c.rounds else r * n / max(c.rounds, 1)

    def masks_after(
        self,
        prev_rdir: str,
        fraction: float | None = None,
        *,
        imp_rounds: float | None = None,
        r: int = 0,
        branch: str = IMP,
        rewind_step: int | None = None,
    ) -> dict:
        """The masks that prune a finished round's masks by the run's criterion.

        The criterion (config.prune_criterion, lth_tf.criteria) scores the round's
        final weights; the default, magnitude, is |W_f|.

        Args:
          prev_rdir: a finished round directory (masks.npz, checkpoints/final.npz).
          fraction: of the survivors to remove; default: the run's round fraction.
          imp_rounds: instead, prune straight to IMP's survivors after this many
            (real) rounds at --prune_fraction (masks.prune_to_rounds: one-shot
            pruning matched to IMP layer by layer).
          r, branch: the round these masks are for and its branch: the criterion's
            seed (random scores) is drawn from the run's seed, r and the branch.
          rewind_step: the k whose W_k the criterion sees (default: the run's k);
            read (or trained, dense_weights_at) only for a criterion other than magnitude.
        """
        prev_masks = files.read_npz(paths.masks_file(prev_rdir))
        final = files.read_npz(paths.checkpoint_file(prev_rdir, "final"))
        kernels = {n: final[f"{n}/kernel"] for n in self.layers}
        c = self.config
        if c.prune_criterion == criteria.MAGNITUDE:
            scores = criteria.magnitude(kernels, None, prev_masks, 0)
        else:
            k = self.schedule.rewind if rewind_step is None else rewind_step
            w_k = self.dense_weights_at(k)
            rewind = {n: w_k[f"{n}/kernel"] for n in self.layers}
            seed = _seed_for(c.seed, "criterion", r, branch)
            scores = criteria.scores(self.criterion, kernels, rewind, prev_masks, seed)
        if imp_rounds is not None:
            new = masks.prune_scores_to_rounds(
                scores, prev_masks, imp_rounds, c.prune_fraction, c.prune_scope, self.rates
            )
            masks.check_subset(new, prev_masks)
            return new
        if fraction is None:
            fraction = round_fraction(c)
        new = masks.prune_scores(scores, prev_masks, fraction, c.prune_scope, self.rates)
        masks.check_subset(new, prev_masks)
        return new

    def round_data_seed(self, r: int, branch: str = IMP) -> int:
        """The data seed of round r of `branch` (IMP, a control, a branch's name).

        Round 0 trains with the config's data seed, and so does every round with
        data_order=replay: each then sees round 0's batches from its first step.
        With data_order=per_round every other round draws its own order from the
        data seed, its round and its branch (the authors' framework draws a new
        order per level), so a round sees its own SGD noise, not the dense run's.
        """
        if (r == 0 and branch == IMP) or self.config.data_order == "replay":
            return self.config.data_seed
        return _seed_for(self.config.data_seed, "data", r, branch)

    def imp_round(self, r: int, round_masks: dict) -> dict:
        return self._branch_round(IMP, r, round_masks)

    def control_round(self, control: str, r: int, imp_masks: dict) -> dict:
        if control not in subnetworks.CONTROLS:
            known = ", ".join(subnetworks.CONTROL_NAMES)
            raise ValueError(f"Unknown control {control!r}. Known controls: {known}.")
        return self._branch_round(control, r, imp_masks)

    def _branch_round(self, branch: str, r: int, imp_masks: dict) -> dict:
        # The start is computed even when the round is done, as it always was: a
        # reinitialised model is built in the same order whatever was finished.
        start = subnetworks.start(self, branch, r, imp_masks)
        rdir = paths.round_dir(self.run_dir, r, None if branch == IMP else branch)
        data_seed = self.round_data_seed(r, branch)
        return self._train_round(_Round(rdir, r, branch, start, data_seed=data_seed))

    def train_branch(self, rdir, r, branch, round_masks, weights, start_step, data_seed=None):
        """Trains masked `weights` from `start_step` to the end into `rdir` (idempotent).

        Used by lth_tf.branching for the rounds of a branch (data_seed None: the
        round's own order, `round_data_seed(r, branch)`), and by the stability
        analyses for copies trained with other data orders (their data_seed).
        """
        if data_seed is None:
            data_seed = self.round_data_seed(r, branch)
        start = Start(round_masks, weights, start_step)
        return self._train_round(_Round(rdir, r, branch, start, data_seed=data_seed))

    # ---- one round: named steps --------------------------------------------------------------

    def _train_round(self, rd: _Round) -> dict:
        summary_path = paths.summary_file(rd.rdir)
        if self.agreement is not None:
            finished_on = finished_only_on(self.agreement, rd.rdir, rd.label)
            if finished_on:
                return self._complete(rd, finished_on)
        if files.exists(summary_path):
            return files.read_json(summary_path)
        self._refuse_if_stopping(rd)
        self.log(
            f"== {rd.label}: density {masks.density(rd.start.masks):.4f}, "
            f"steps {rd.start.step}..{self.schedule.total}"
        )
        self._verify_or_write_masks(rd)
        checkpointer = checkpointing.RoundCheckpointer(
            self.checkpoint,
            paths.resume_dir(rd.rdir),
            write=self.write,
            label=rd.label,
            agreement=self.agreement,
        )
        start = self._restore_or_start(rd, checkpointer)
        metrics_path = paths.metrics_file(rd.rdir)
        kept = files.truncate_jsonl(metrics_path, start) if self.write else []
        clock = _Clock(offset=kept[-1]["wall_seconds"] if kept else 0.0)
        recorder = self._rewind_recorder(rd, start)
        self._train(rd, start, checkpointer, recorder, clock)
        return self._finish(rd, checkpointer, clock)

    def _refuse_if_stopping(self, rd: _Round) -> None:
        stopping = StopRequest.signal_name is not None
        if self.agreement is not None:  # a peer's signal stops every worker here
            stopping = self.agreement.any(stopping)
        if stopping:
            reason = StopRequest.signal_name or "another worker's stop request"
            raise Interrupted(
                f"Stopped by {reason} before round {rd.r} ({rd.branch}); every "
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
        # Also after a stop between the two files: sparsity.json follows from the masks.
        sparsity_path = paths.sparsity_file(rd.rdir)
        if self.write and not files.exists(sparsity_path):
            files.write_json(sparsity_path, masks.report(rd.start.masks))

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
        if self.write and rd.r == 0:
            # Round 0's start is W_0, a file others refer to: it holds all its arrays.
            files.write_npz(paths.checkpoint_file(rd.rdir, "start"), masked, compress=False)
        elif self.write:
            # A pruned round reads where its weights are from its masks.npz and, when it
            # starts from W_k under its masks (IMP, random_prune), their values from W_k.
            w_k = _w_k_file(paths.round_dir(self.run_dir, 0), self.schedule.rewind)
            files.write_npz(
                paths.checkpoint_file(rd.rdir, "start"),
                masked,
                base=w_k if files.exists(w_k) else None,
                masks=paths.masks_file(rd.rdir),
            )
        return rd.start.step

    def _rewind_recorder(self, rd: _Round, start: int):
        """Round 0's callback that saves W_k, or None when there is nothing to record."""
        if not rd.record_rewind:
            return None
        at = self.schedule.rewind
        path = paths.checkpoint_file(rd.rdir, "rewind")
        targets = {}  # step -> file, for the steps still ahead of `start`
        if at == 0:
            pass  # W_0 is the round's start.npz, written before it trains: not twice
        elif start > at:
            if not files.exists(path):
                raise CorruptRunError(
                    f"{path} is missing but round 0 resumed past step {at}. "
                    f"Delete {rd.rdir} to retrain the dense network."
                )
            # else: recorded before the checkpoint we resumed from
        else:
            # (Re)record W_k in this very trajectory, even if a file exists from an
            # attempt that was killed before its first checkpoint.
            targets[at] = path
        for k in self.rewind_points:
            if k == 0:
                continue  # W_0: start.npz
            if k != at and k >= start:
                targets[k] = paths.rewind_file(rd.rdir, k)
            elif k != at and not self._recorded(k):
                self.log(f"   W_{k} cannot be recorded: round 0 resumed at step {start} past it")
        if not targets:
            return None

        def save(step):
            if self.write:
                weights = sparsity.get_weights(self.model)
                files.write_npz(targets[step], weights, compress=False)

        return RecordWeights(sorted(targets), save)

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
                agree=None if self.agreement is None else self.agreement.any,
            ),
        ]
        if recorder is not None:
            callbacks.insert(0, recorder)  # W_k is recorded before a checkpoint at k
        carry = checkpointing.resumed_period(
            self.checkpoint, checkpointer, start, self.schedule.eval_every
        )
        if carry is not None:
            callbacks.insert(0, carry)
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
        summary = self._summary(rd, test, files.read_jsonl(paths.metrics_file(rd.rdir)), clock())
        if self.write:
            files.write_npz(
                paths.checkpoint_file(rd.rdir, "final"), final, masks=paths.masks_file(rd.rdir)
            )
        if self.agreement is not None:
            # Every worker has its final.npz before any writes summary.json: a round
            # finished on one worker can be completed on the others (finished_only_on).
            self.agreement.any(False)
        if self.write:
            files.write_json(paths.summary_file(rd.rdir), summary)  # last: the round is done
        checkpointer.discard()
        self._say_finished(rd, summary)
        return summary

    def _summary(self, rd: _Round, test: dict, metrics: list, seconds: float) -> dict:
        return _summary(
            rd.r,
            rd.branch,
            masks.density(rd.start.masks),
            rd.start.step,
            self.schedule.total,
            test,
            metrics,
            seconds,
        )

    def _say_finished(self, rd: _Round, summary: dict) -> None:
        self.log(
            f"   {rd.label}: test accuracy {summary['test_accuracy']:.4f}, "
            f"best validation {summary['best_validation_accuracy']:.4f} at step "
            f"{summary['best_validation_step']}, {summary['wall_seconds']:.0f}s"
        )

    def _complete(self, rd: _Round, finished_on: list[str]) -> dict:
        """Completes a round finished on `finished_on` only, on every worker, without training.

        Every worker (finished or not: the test set is evaluated collectively) puts
        its final.npz back and tests it; a worker without summary.json writes it from
        its metrics.jsonl, complete since the last period ended; one with it keeps it.
        """
        self.log(
            f"   {rd.label} was finished on {', '.join(finished_on)} only: completing it "
            "from final.npz"
        )
        sparsity.set_masks(self.model, rd.start.masks)
        sparsity.set_weights(self.model, self.final_weights(rd.rdir))
        test = train.evaluate(self.model, self.data, "test", train.eval_batch_size(self.config))
        summary_path = paths.summary_file(rd.rdir)
        if files.exists(summary_path):
            summary = files.read_json(summary_path)
        else:
            metrics = files.read_jsonl(paths.metrics_file(rd.rdir))
            seconds = metrics[-1]["wall_seconds"] if metrics else 0.0
            summary = self._summary(rd, test, metrics, seconds)
            if self.write:
                files.write_json(summary_path, summary)
            self._say_finished(rd, summary)
        checkpointing.RoundCheckpointer(
            self.checkpoint, paths.resume_dir(rd.rdir), write=self.write
        ).discard()
        return summary


def finished_only_on(agreement, rdir: str, label: str) -> list[str] | None:
    """The workers that finished the round in `rdir` when some did but not all (a collective).

    None when every worker or none did: each then knows it from its own
    summary.json. Some only: a worker was killed between the workers' writes of
    summary.json, after every worker wrote final.npz (Experiment._finish).

    Raises:
      CorruptRunError: some worker finished the round but a worker has no final.npz
        (a run written by an older lth_tf, or damaged); on every worker alike.
    """
    summary = files.exists(paths.summary_file(rdir))
    final = files.exists(paths.checkpoint_file(rdir, "final"))
    states = agreement.by_worker(2 * summary + final)  # 3: finished; 1: final.npz only
    finished = [w for w, state in states.items() if state >= 2]
    if not finished or len(finished) == len(states):
        return None
    lacking = [w for w, state in states.items() if not state & 1]
    if lacking:
        raise CorruptRunError(
            f"{label} is finished on {', '.join(finished)} but {', '.join(lacking)} has no "
            f"final.npz to complete it from: the workers' copies of the run disagree. Nothing "
            f"was changed. Delete the round's directory on every worker ({rdir} here, and its "
            "counterpart in each worker's run directory) and rerun the same command to train "
            "the round again."
        )
    return finished


def _w_k_file(r0: str, k: int) -> str:
    """The file of round 0 (directory r0) that holds W_k for the run's own k."""
    return paths.checkpoint_file(r0, "start" if k == 0 else "rewind")


def resolve_rewind_points(points, config: RunConfig, schedule) -> tuple:
    """Durations or steps of rewind points -> sorted steps, checked against the schedule.

    Raises:
      ValueError: a point is not a duration, lies outside [0, T), or cannot be
        recorded with the config's steps_per_execution (train.check_reachable).
    """
    out = set()
    for point in points:
        k = steps.rewind_point(
            point, schedule.steps_per_epoch, schedule.total, config.training_steps, "rewind_steps"
        )
        train.check_reachable(k, schedule.eval_every, config.steps_per_execution)
        out.add(k)
    return tuple(sorted(out))


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
        # +0.0 where pruned, as sparsity.get_weights reads them (not -0.0: files store a
        # pruned kernel by its non-zero bits).
        value = weights[key]
        out[key] = np.where(mask != 0, value, np.zeros((), value.dtype)).astype(value.dtype)
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
