"""Linear mode connectivity: instability and weight distances of a run's rounds.

For a run's round r (0: the dense network) and each rewind point k:
  - two copies start from W_k (times round r's mask) and train to the end with
    different data orders and augmentation draws; the test and train error are
    evaluated at `num_alphas` evenly spaced points alpha*W1 + (1 - alpha)*W2;
    the error barrier (instability) is max error - mean of the two ends' errors
    (1912.05671); "stable" means a barrier under 2 points. Repeats with other
    seed pairs (3 by default, as the LMC paper) give mean, sample standard
    deviation (ddof=1, as the replicate tables; None for one repeat) and n.
  - the L2 distance between the two copies (stability to data order), and, for
    r >= 1, between the subnetwork trained from W_k on the run's data order
    (IMP round r) and the full network trained on the same data order (round 0),
    over round r's surviving weights (stability to pruning, 1903.01611).
BatchNorm: the interpolated network uses the interpolated running statistics
unless recompute_bn, which re-estimates them on training batches. What the LMC
paper did with them could not be established (the parts of its text consulted
do not say; the authors' public framework, open_lth, has no interpolation
code), so interpolation stays the default (README, "Stability analyses").
Which mask at round r >= 1: the LMC paper runs IMP separately for each k, so
sweep() analyses each k with the round r mask of IMP rewound to that k: the
run's own rounds for the run's k, else the `rewind` branch rewind_<k>it
(lth_tf.branching; trained here when missing, its rounds 1..r). Round 1 of such
a branch prunes the run's round 0, so its masks equal the run's round 1 masks;
they differ from round 2 on. `shared_mask=True` uses the run's round r mask for
every k instead.
Only finished rounds are analysed (as lth_tf.sparse_export refuses them). A
point's results record its inputs (digests of its masks, start weights, the
run's config and the summaries of the rounds it compares, and the analysis
settings): a rerun reuses them while the inputs are the same, recomputes them
when they changed (saying why), and retrains the copies only when what they
were trained from changed.
Outputs: <run_dir>/stability/round_NN/k_XXXXXXX/{interpolation.json, path.png,
inputs.json (what its copies were trained from)}, <run_dir>/stability/round_NN/
sweep.json and barrier_vs_k.png (sweep_shared_mask.json and
barrier_vs_k_shared_mask.png for the shared-mask variant). Every trained
copy is a resumable round directory, trained like the run's rounds: under the
given strategy, with the run's mixed precision (its config). Under
multi-worker training only the chief writes into the run; other workers write
their copies to their scratch directory (distribute.worker_run_dir).
Which subnetwork (`subnetwork`, `branch` of point() and sweep()): round r's
IMP mask of the run or of a branch of it (lth_tf.branching, e.g. IMP rewound
to its own k: the LMC paper runs IMP separately per k), or a control at the
same density: random_prune (a random mask with the IMP mask's per-layer
densities, from W_k) or random_reinit (the IMP mask, weights drawn afresh);
they are written under stability/<series>/round_NN/ (`series_name`). `python -m lth_tf.stability` is the
command line; lth_tf/reporting.py formats the results.
"""

import dataclasses
import hashlib
import json

import numpy as np

from lth_tf import (
    branching,
    distribute,
    files,
    masks,
    paths,
    plots,
    reporting,
    rounds,
    rundir,
    sparse_export,
    sparsity,
    subnetworks,
)
from lth_tf.keras import keras, tf

STABLE_BARRIER = 0.02
DEFAULT_REPEATS = 3  # pairs of copies per point, as the LMC paper (--repeats' default)
# The inputs a point's trained copies depend on; other inputs only re-evaluate the path.
TRAINING_INPUTS = ("config", "subnetwork", "masks", "start")
SUBNETWORKS = subnetworks.SUBNETWORKS


def series_name(subnetwork: str = "imp", branch: str | None = None) -> str | None:
    """The directory under stability/ of a subnetwork's points; None: the run's IMP rounds."""
    if subnetwork not in SUBNETWORKS:
        raise ValueError(
            f"Unknown subnetwork {subnetwork!r}. Known subnetworks: {', '.join(SUBNETWORKS)}."
        )
    if branch is None:
        return None if subnetwork == "imp" else subnetwork
    return branch if subnetwork == "imp" else f"{branch}.{subnetwork}"


def interpolate(a: dict, b: dict, alpha: float) -> dict:
    """alpha * a + (1 - alpha) * b over every weight (BatchNorm statistics included)."""
    return {k: (alpha * a[k] + (1.0 - alpha) * b[k]).astype(a[k].dtype) for k in a}


def l2_distance(a: dict, b: dict, keys, weights=None) -> float:
    """L2 distance over `keys`, restricted to entries where `weights[key]` is nonzero."""
    total = 0.0
    for key in keys:
        diff = a[key].astype(np.float64) - b[key].astype(np.float64)
        if weights is not None:
            diff = diff * (weights[key] != 0)
        total += float(np.sum(diff**2))
    return total**0.5


def _norm(a, keys, weights=None):
    return l2_distance(a, {k: np.zeros_like(a[k]) for k in keys}, keys, weights)


def recompute_batchnorm(model, data, batch_size, num_batches=50, data_seed=0):
    """Replaces BatchNorm running statistics by their average over training batches."""
    bns = [
        layer for layer in model.submodules if isinstance(layer, keras.layers.BatchNormalization)
    ]
    if not bns:
        return
    saved = [bn.momentum for bn in bns]
    for bn in bns:
        bn.moving_mean.assign(tf.zeros_like(bn.moving_mean))
        bn.moving_variance.assign(tf.ones_like(bn.moving_variance))
    for i, (x, _) in enumerate(data.train(batch_size, data_seed).take(num_batches)):
        for bn in bns:  # a cumulative average: batch i gets weight 1 / (i + 1)
            bn.momentum = 1.0 - 1.0 / (i + 1)
        model(x, training=True)
    for bn, momentum in zip(bns, saved, strict=True):
        bn.momentum = momentum


def error_along_path(
    experiment, w1, w2, round_masks, alphas, *, recompute_bn=False, eval_examples=None
):
    """{'alpha', 'test_error', 'train_error'} lists along alpha*W1 + (1-alpha)*W2."""
    model, data, config = experiment.model, experiment.data, experiment.config
    sparsity.set_masks(model, round_masks)
    out = {"alpha": [float(a) for a in alphas], "test_error": [], "train_error": []}
    splits = {"test_error": "test", "train_error": "train"}
    for alpha in alphas:
        sparsity.set_weights(model, interpolate(w1, w2, float(alpha)))
        if recompute_bn:
            recompute_batchnorm(model, data, config.batch_size)
        for key, split in splits.items():
            ds = data.eval(split, config.batch_size)
            if eval_examples:
                ds = ds.take(max(1, eval_examples // config.batch_size))
            result = model.evaluate(ds, verbose=0, return_dict=True)
            out[key].append(1.0 - float(result["accuracy"]))
    return out


def barrier(errors) -> float:
    """max error along the path - mean of the endpoints' errors."""
    return float(max(errors) - (errors[0] + errors[-1]) / 2.0)


def digest(value) -> str:
    """sha256 of arrays ({name: array}, by name, dtype, shape and bytes) or of JSON data."""
    h = hashlib.sha256()
    if isinstance(value, dict) and all(isinstance(v, np.ndarray) for v in value.values()):
        for key in sorted(value):
            array = np.ascontiguousarray(value[key])
            h.update(f"{key}|{array.dtype.str}|{array.shape}|".encode())
            h.update(array.tobytes())
    else:
        h.update(json.dumps(value, sort_keys=True, default=str).encode())
    return h.hexdigest()


def changed_inputs(old: dict | None, new: dict) -> list:
    """What differs between a point's recorded inputs and today's, as readable phrases."""
    if old is None:
        return ["no record of its inputs (an older lth_tf wrote it)"]
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if a == b:
            continue
        digests = isinstance(a, str) and len(a) == 64 or isinstance(b, str) and len(b) == 64
        out.append(key if digests else f"{key} {a} -> {b}")
    return out


class Stability:
    """The analyses on one run; every trained piece is idempotent and resumable.

    Args:
      run_dir: the run to analyse (read; the chief writes its results there).
      strategy: the tf.distribute strategy the copies train under (default: the
        default strategy); their mixed precision is the run's config's.
      num_alphas: points on each interpolation path.
      repeats: pairs of copies per point (the LMC paper: 3).
      recompute_bn: re-estimate BatchNorm statistics at each point of the path.
      eval_examples: cap on the examples evaluated per point and split.
      log: a print-like function for progress lines.
      data: the dataset the run was trained with, when the config alone does not
        rebuild it (e.g. ImageNet at another image size; as rounds.Experiment).
      overrides: config fields set for this analysis over the run's config.json
        (lth_tf.flagdefs.OVERRIDE_FIELDS: data_dir, speed settings).
    """

    def __init__(
        self,
        run_dir: str,
        *,
        strategy=None,
        num_alphas=30,
        repeats=DEFAULT_REPEATS,
        recompute_bn=False,
        eval_examples=None,
        log=print,
        data=None,
        overrides=None,
    ):
        self.run_dir = run_dir
        self.config = dataclasses.replace(rundir.load_config(run_dir), **(overrides or {}))
        self.strategy = strategy or tf.distribute.get_strategy()
        # Where this process writes: the run itself, or a non-chief worker's scratch copy.
        self.out_dir = distribute.worker_run_dir(run_dir, self.strategy)
        self.num_alphas = num_alphas
        self.repeats = repeats
        self.recompute_bn = recompute_bn
        self.eval_examples = eval_examples
        self.log = log
        # Built from the run's config: its model, data and mixed precision.
        self.experiment = rounds.Experiment(
            self.config,
            self.out_dir,
            strategy=self.strategy,
            checkpoint_seconds=300,
            log=log,
            data=data,
        )
        self.schedule = self.experiment.schedule

    def masks_of(self, r: int, branch: str | None = None) -> dict:
        """Round r's masks of the run's IMP rounds, or of one of its branches."""
        if branch is not None and r > 0:
            path = paths.masks_file(paths.round_dir(self.run_dir, r, branch))
            if not files.exists(path):
                raise FileNotFoundError(
                    f"Round {r} of branch {branch} of {self.run_dir} has no masks.npz. Known "
                    f"branches: {', '.join(rundir.branches(self.run_dir)) or 'none'}; run "
                    f"`python -m lth_tf.branch` with --rounds>={r} for it first."
                )
            return files.read_npz(path)
        path = paths.masks_file(paths.round_dir(self.run_dir, r))
        if not files.exists(path):
            raise FileNotFoundError(
                f"Round {r} of {self.run_dir} has no masks.npz: run `python -m lth_tf.imp` with "
                f"--rounds>={r} on this run first."
            )
        return files.read_npz(path)

    def subnetwork(self, r: int, k: int, subnetwork: str = "imp", branch: str | None = None):
        """(masks, start weights) of round r's subnetwork rewound to k (see the module doc)."""
        series_name(subnetwork, branch)  # checks the name
        imp_masks = self.masks_of(r, branch)
        if subnetwork == "imp":
            return imp_masks, self.weights_at(k)
        # The controls' own rules (lth_tf.subnetworks.CONTROLS): the run's control
        # branches got the same masks and weights.
        start = subnetworks.start(self.experiment, subnetwork, r, imp_masks)
        if subnetworks.CONTROLS[subnetwork].keeps_imp_masks:
            return imp_masks, start.weights  # other weights: their own
        return start.masks, self.weights_at(k)  # other masks: on W_k of the k analysed

    def weights_at(self, k: int) -> dict:
        """Dense W_k of the run (rounds.Experiment.dense_weights_at), cached in out_dir."""
        return self.experiment.dense_weights_at(k, source=self.run_dir)

    def check_finished(self, r: int, branch: str | None = None) -> None:
        """Refuses a round that has not finished, as lth_tf.sparse_export does.

        An unfinished round has no final weights (no pruning distance) and may
        still change; round 0 must be finished for every round.

        Raises:
          ValueError: the round (of the run, or of `branch`) is unfinished or missing,
            or a file it needs is gone.
        """
        try:
            sparse_export._finished_round(self.run_dir, r if branch is None else 0)
        except sparse_export.ExportError as e:
            raise ValueError(
                f"{e} The stability analyses use finished rounds only: finish it with "
                "`python -m lth_tf.imp` and the run's flags first."
            ) from None
        if branch is not None and r > 0:
            rdir = paths.round_dir(self.run_dir, r, branch)
            if not files.exists(paths.summary_file(rdir)):
                state = "is unfinished" if tf.io.gfile.isdir(rdir) else "does not exist"
                raise ValueError(
                    f"Round {r} of branch {branch} of {self.run_dir} {state}: the stability "
                    f"analyses use finished rounds only. Run `python -m lth_tf.branch` for it "
                    f"with --rounds>={r} first."
                )

    def own_mask_branch(self, r: int, k: int) -> str | None:
        """The series whose round r mask IMP found with k itself: None (the run) or a branch.

        For another k than the run's, the `rewind` branch rewind_<k>it, whose
        rounds 1..r are trained first when they are not there (lth_tf.branching).
        """
        if r == 0 or k == self.schedule.rewind:
            return None
        name = branching.Spec("rewind", k).name
        if files.exists(paths.summary_file(paths.round_dir(self.run_dir, r, name))):
            return name
        if self.out_dir != self.run_dir or isinstance(
            self.strategy, tf.distribute.MultiWorkerMirroredStrategy
        ):
            raise ValueError(
                f"Round {r} with k={k} needs the masks of IMP rewound to {k} (branch {name}), "
                "which are not there; under multi-worker training lth_tf.stability does not "
                f"train branches. Run `python -m lth_tf.branch --run_dir={self.run_dir} "
                f"--kind=rewind --rewind_step={k}it --rounds={r}` first, or pass --shared_mask "
                "to use the run's mask for every k."
            )
        self.log(f"== round {r} at k={k}: IMP with its own k (branch {name}), as the LMC paper")
        spec = branching.make_spec(self.experiment, "rewind", rewind_step=f"{k}it", num_rounds=r)
        branching.Branch(self.experiment, spec).run()
        return name

    def _mask_rewind_step(self, r: int, branch: str | None):
        """The k with which IMP found round r's mask (None: round 0, or not a rewind mask)."""
        if r == 0:
            return None
        if branch is None:
            return self.schedule.rewind
        described = paths.branch_file(self.run_dir, branch)
        if files.exists(described):
            d = files.read_json(described)
            if d.get("retraining") == "weight_rewind":
                return d["rewind_step"]
        return None

    def _inputs(self, r, k, subnetwork, branch, round_masks, start) -> dict:
        """What a point's results depend on: digests of files' contents and the settings."""

        def summary(rdir):
            path = paths.summary_file(rdir)
            return digest(files.read_json(path)) if files.exists(path) else None

        trained_as = self._trained_as(r, subnetwork, branch)
        return {
            "config": digest(self.config.identity()),
            "subnetwork": subnetwork,
            "masks": digest(round_masks),
            "start": digest(start),
            "round_summary": summary(paths.round_dir(self.run_dir, r, branch if r else None)),
            "dense_summary": summary(paths.round_dir(self.run_dir, 0)),
            "trained_as_summary": summary(trained_as[0]) if trained_as else None,
            "repeats": self.repeats,
            "num_alphas": self.num_alphas,
            "eval_examples": self.eval_examples,
            "batchnorm": "recomputed" if self.recompute_bn else "interpolated",
        }

    def _drop_stale_copies(self, point_dir: str, inputs: dict, label: str) -> None:
        """Deletes the point's trained copies when what they were trained from changed."""
        path = paths.stability_inputs_file(point_dir)
        training = {key: inputs[key] for key in TRAINING_INPUTS}
        if files.exists(path):
            changed = changed_inputs(files.read_json(path), training)
            if changed:
                self.log(
                    f"== {label}: retraining its copies, what they were trained from "
                    f"changed ({', '.join(changed)})"
                )
                for name in tf.io.gfile.listdir(point_dir):
                    if name.rstrip("/").startswith("repeat_"):
                        tf.io.gfile.rmtree(paths.join(point_dir, name.rstrip("/")))
        files.write_json(path, training)

    def point(self, r: int, k: int, *, subnetwork: str = "imp", branch: str | None = None) -> dict:
        """Instability and distances of round r's network rewound to step k.

        Args:
          r: the round (0: the dense network); it must be finished.
          k: the rewind step.
          subnetwork: imp, random_prune or random_reinit (module doc).
          branch: a branch of the run whose round r mask is used (default: the run's).

        Raises:
          ValueError: the round is unfinished (check_finished), or k is outside the schedule.
        """
        series = series_name(subnetwork, branch)
        self.check_finished(r, branch)
        point_dir = paths.stability_point_dir(self.out_dir, r, k, series)
        out_path = paths.interpolation_file(point_dir)
        label = f"stability of round {r} at k={k} ({series or 'imp'})"
        round_masks, start = self.subnetwork(r, k, subnetwork, branch)
        inputs = self._inputs(r, k, subnetwork, branch, round_masks, start)
        done = files.read_json(out_path) if files.exists(out_path) else None
        changed = changed_inputs(done.get("inputs"), inputs) if done is not None else []
        current = done is not None and not changed
        if self._current_everywhere(current):
            return done
        if current:
            # A peer was stopped between the workers' writes of this point: this worker
            # evaluates it again with the others (their collective calls stay in step)
            # and keeps its own file as it is.
            self.log(f"== {label}: finished here but not on every worker: evaluating it with them")
        elif done is not None:
            self.log(f"== {label}: recomputing, its inputs changed ({', '.join(changed)})")
        self._drop_stale_copies(point_dir, inputs, label)
        kernels = [f"{n}/kernel" for n in round_masks]
        repeats = []
        accuracies = []  # test accuracy of every trained copy (accuracy against k)
        for j in range(self.repeats):
            repeat, copy_accuracies = self._repeat(r, k, j, series, round_masks, start, kernels)
            repeats.append(repeat)
            accuracies.extend(copy_accuracies)
        mask_k = self._mask_rewind_step(r, branch)
        result = {
            "round": r,
            "rewind_step": k,
            "subnetwork": subnetwork,
            "branch": branch,
            # The k with which IMP found the mask; shared: another k's mask (shared_mask).
            "mask_rewind_step": mask_k,
            "shared_mask": mask_k is not None and mask_k != k,
            "density": masks.density(round_masks),
            "batchnorm": inputs["batchnorm"],
            "num_alphas": self.num_alphas,
            "eval_examples": self.eval_examples,
            "n": len(repeats),
            "repeats": repeats,
            "stable_bound": STABLE_BARRIER,
            "std": "sample standard deviation (ddof=1) over the repeats; null for one repeat",
        }
        for key in ("test_barrier", "train_barrier", "data_order_distance"):
            st = reporting.stats([rep[key] for rep in repeats])
            result[f"{key}_mean"], result[f"{key}_std"] = st["mean"], st["std"]
        result["stable"] = result["test_barrier_mean"] < STABLE_BARRIER
        st = reporting.stats(accuracies)
        result["test_accuracy_mean"], result["test_accuracy_std"] = st["mean"], st["std"]
        result.update(self._pruning_distance(r, k, subnetwork, branch, kernels))
        result["inputs"] = inputs
        if current:
            return done
        files.write_json(out_path, result)
        files.write_bytes(
            paths.interpolation_plot_file(point_dir), plots.interpolation_path(result)
        )
        return result

    def _current_everywhere(self, current: bool) -> bool:
        """Whether every worker has the point's results, up to date (a collective under
        multi-worker training: all workers skip the point, or all evaluate it)."""
        agreement = self.experiment.agreement
        if agreement is None:
            return current
        return not agreement.any(not current)

    def _repeat(self, r, k, j, series, round_masks, start, kernels) -> tuple:
        """Repeat j: two copies trained from `start` on other data orders, and their path.

        Returns:
          (the repeat's record, the two copies' test accuracies).
        """
        seeds = [self.config.data_seed + 1000 * (j + 1) + c for c in (1, 2)]
        finals, accuracies = [], []
        for c, seed in zip((1, 2), seeds, strict=True):
            rdir = paths.stability_copy_dir(self.out_dir, r, k, j, c, series)
            self.experiment.train_branch(
                rdir, r, f"k{k}_r{j}_c{c}", round_masks, start, k, data_seed=seed
            )
            finals.append(files.read_npz(paths.checkpoint_file(rdir, "final")))
            accuracies.append(files.read_json(paths.summary_file(rdir))["test_accuracy"])
        path = error_along_path(
            self.experiment,
            finals[0],
            finals[1],
            round_masks,
            np.linspace(0.0, 1.0, self.num_alphas),
            recompute_bn=self.recompute_bn,
            eval_examples=self.eval_examples,
        )
        d = l2_distance(finals[0], finals[1], kernels, finals[0])
        repeat = {
            "seeds": seeds,
            "test_accuracies": accuracies,  # the two copies'
            **path,
            "test_barrier": barrier(path["test_error"]),
            "train_barrier": barrier(path["train_error"]),
            "data_order_distance": d,
            "data_order_distance_normalized": d / max(_norm(finals[0], kernels, finals[0]), 1e-12),
        }
        return repeat, accuracies

    def _pruning_distance(self, r, k, subnetwork, branch, kernels) -> dict:
        """Distance of the subnetwork trained by the run from the dense network, at its own k."""
        trained_as = self._trained_as(r, subnetwork, branch)
        if r == 0 or trained_as is None or k != trained_as[1]:
            return {}
        sub = paths.checkpoint_file(trained_as[0], "final")
        full = paths.checkpoint_file(paths.round_dir(self.run_dir, 0), "final")
        if not (files.exists(sub) and files.exists(full)):
            return {}
        a, b = files.read_npz(sub), files.read_npz(full)
        d = l2_distance(a, b, kernels, a)
        return {
            "pruning_distance": d,
            "pruning_distance_normalized": d / max(_norm(b, kernels, a), 1e-12),
        }

    def _trained_as(self, r: int, subnetwork: str, branch: str | None):
        """(round directory, start step) where the run trained this subnetwork, or None."""
        if branch is None and subnetwork == "imp":
            return paths.round_dir(self.run_dir, r), self.schedule.rewind
        if branch is not None and subnetwork != "imp":
            return None  # controls of a branch are only trained here
        rdir = paths.round_dir(self.run_dir, r, branch or subnetwork)
        summary = paths.summary_file(rdir)
        return (rdir, files.read_json(summary)["start_step"]) if files.exists(summary) else None

    def sweep(
        self,
        r: int,
        ks,
        *,
        subnetwork: str = "imp",
        branch: str | None = None,
        shared_mask: bool = False,
    ) -> list:
        """point() for each k; writes the sweep's JSON and barrier_vs_k plot.

        Args:
          r: the round; it must be finished.
          ks: rewind steps.
          subnetwork: imp or a control (module doc).
          branch: a branch whose round r mask is used for every k.
          shared_mask: at r >= 1 without `branch`, use the run's round r mask for
            every k (written as sweep_shared_mask.json) instead of each k's own IMP
            mask (own_mask_branch; sweep.json).
        """
        per_k = r > 0 and branch is None and not shared_mask
        if not per_k or self.schedule.rewind in ks:  # refused before anything is trained
            self.check_finished(r, branch)
        results = []
        for k in ks:
            mask_branch = self.own_mask_branch(r, k) if per_k else branch
            results.append(self.point(r, k, subnetwork=subnetwork, branch=mask_branch))
        directory = paths.stability_dir(self.out_dir, r, series_name(subnetwork, branch))
        shared = r > 0 and branch is None and shared_mask
        files.write_json(paths.sweep_file(directory, shared), results)
        files.write_bytes(
            paths.barrier_plot_file(directory, shared),
            plots.barrier_vs_k(results, STABLE_BARRIER),
        )
        return results
