"""Linear mode connectivity: instability and weight distances of a run's rounds.

For a run's round r (0: the dense network) and each rewind point k:
  - two copies start from W_k (times round r's mask) and train to the end with
    different data orders and augmentation draws; the test and train error are
    evaluated at `num_alphas` evenly spaced points alpha*W1 + (1 - alpha)*W2;
    the error barrier (instability) is max error - mean of the two ends' errors
    (1912.05671); "stable" means a barrier under 2 points. Repeats with other
    seed pairs give mean and spread.
  - the L2 distance between the two copies (stability to data order), and, for
    r >= 1, between the subnetwork trained from W_k on the run's data order
    (IMP round r) and the full network trained on the same data order (round 0),
    over round r's surviving weights (stability to pruning, 1903.01611).
BatchNorm: the interpolated network uses the interpolated running statistics
unless recompute_bn, which re-estimates them on training batches.
Outputs: <run_dir>/stability/round_NN/k_XXXXXXX/{interpolation.json, path.png},
<run_dir>/stability/round_NN/sweep.json and barrier_vs_k.png. Every trained
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

import numpy as np

from lth_tf import distribute, files, masks, paths, plots, rounds, rundir, sparsity, train
from lth_tf.keras import keras, tf

STABLE_BARRIER = 0.02
SUBNETWORKS = ("imp", *rounds.CONTROLS)  # = lth_tf.flagdefs.SUBNETWORKS


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


class Stability:
    """The analyses on one run; every trained piece is idempotent and resumable.

    Args:
      run_dir: the run to analyse (read; the chief writes its results there).
      strategy: the tf.distribute strategy the copies train under (default: the
        default strategy); their mixed precision is the run's config's.
      num_alphas: points on each interpolation path.
      repeats: pairs of copies per point.
      recompute_bn: re-estimate BatchNorm statistics at each point of the path.
      eval_examples: cap on the examples evaluated per point and split.
      log: a print-like function for progress lines.
      data: the dataset the run was trained with, when the config alone does not
        rebuild it (e.g. ImageNet at another image size; as rounds.Experiment).
    """

    def __init__(
        self,
        run_dir: str,
        *,
        strategy=None,
        num_alphas=30,
        repeats=1,
        recompute_bn=False,
        eval_examples=None,
        log=print,
        data=None,
    ):
        self.run_dir = run_dir
        self.config = rundir.load_config(run_dir)
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
        # The controls' own rules (lth_tf.rounds.STARTS): the run's control branches
        # got the same masks and weights.
        start = rounds.STARTS[subnetwork](self.experiment, r, imp_masks)
        if subnetwork == "random_prune":
            return start.masks, self.weights_at(k)
        return imp_masks, start.weights

    def weights_at(self, k: int) -> dict:
        """Dense W_k: recorded by round 0 where possible, else trained from W_0 to k."""
        if not 0 <= k < self.schedule.total:
            raise ValueError(f"Rewind step {k} is outside the schedule [0, {self.schedule.total}).")
        r0 = paths.round_dir(self.run_dir, 0)
        if k == self.schedule.rewind and files.exists(paths.checkpoint_file(r0, "rewind")):
            return files.read_npz(paths.checkpoint_file(r0, "rewind"))
        if files.exists(paths.rewind_file(r0, k)):  # recorded by round 0 (imp --rewind_steps)
            return files.read_npz(paths.rewind_file(r0, k))
        start = paths.checkpoint_file(r0, "start")
        if k == 0 and files.exists(start):
            return files.read_npz(start)
        path = paths.rewind_point_file(self.out_dir, k)
        if files.exists(path):
            return files.read_npz(path)
        self.log(f"== training the dense network to step {k} (rewind point)")
        e = self.experiment
        init = files.read_npz(start) if files.exists(start) else e.initial_weights
        sparsity.set_masks(e.model, masks.ones_like({n: init[f"{n}/kernel"] for n in e.layers}))
        sparsity.set_weights(e.model, init)
        train.reset_optimizer(e.model, 0)
        if k > 0:
            train.fit_segment(e.model, e.data, e.config, self.schedule, 0, k)
        weights = sparsity.get_weights(e.model)
        files.write_npz(path, weights)
        return weights

    def point(self, r: int, k: int, *, subnetwork: str = "imp", branch: str | None = None) -> dict:
        """Instability and distances of round r's network rewound to step k.

        Args:
          r: the round (0: the dense network).
          k: the rewind step.
          subnetwork: imp, random_prune or random_reinit (module doc).
          branch: a branch of the run whose round r mask is used (default: the run's).
        """
        series = series_name(subnetwork, branch)
        out_path = paths.join(
            paths.stability_point_dir(self.out_dir, r, k, series), "interpolation.json"
        )
        settings = {
            "batchnorm": "recomputed" if self.recompute_bn else "interpolated",
            "num_alphas": self.num_alphas,
            "eval_examples": self.eval_examples,
        }
        if files.exists(out_path):
            done = files.read_json(out_path)
            # Other analysis settings re-evaluate the path; trained copies are reused.
            if len(done["repeats"]) == self.repeats and all(
                done.get(key) == value for key, value in settings.items()
            ):
                return done
        round_masks, start = self.subnetwork(r, k, subnetwork, branch)
        kernels = [f"{n}/kernel" for n in round_masks]
        repeats = []
        accuracies = []  # test accuracy of every trained copy (accuracy against k)
        for j in range(self.repeats):
            repeat, copy_accuracies = self._repeat(r, k, j, series, round_masks, start, kernels)
            repeats.append(repeat)
            accuracies.extend(copy_accuracies)
        result = {
            "round": r,
            "rewind_step": k,
            "subnetwork": subnetwork,
            "branch": branch,
            "density": masks.density(round_masks),
            **settings,
            "repeats": repeats,
            "stable_bound": STABLE_BARRIER,
        }
        for key in ("test_barrier", "train_barrier", "data_order_distance"):
            values = [rep[key] for rep in repeats]
            result[f"{key}_mean"] = float(np.mean(values))
            result[f"{key}_std"] = float(np.std(values))
        result["stable"] = result["test_barrier_mean"] < STABLE_BARRIER
        result["test_accuracy_mean"] = float(np.mean(accuracies))
        result["test_accuracy_std"] = float(np.std(accuracies))
        result.update(self._pruning_distance(r, k, subnetwork, branch, kernels))
        files.write_json(out_path, result)
        files.write_bytes(
            paths.join(paths.stability_point_dir(self.out_dir, r, k, series), "path.png"),
            plots.interpolation_path(result),
        )
        return result

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

    def sweep(self, r: int, ks, *, subnetwork: str = "imp", branch: str | None = None) -> list:
        """point() for each k; writes sweep.json and barrier_vs_k.png of the series."""
        results = [self.point(r, k, subnetwork=subnetwork, branch=branch) for k in ks]
        directory = paths.stability_dir(self.out_dir, r, series_name(subnetwork, branch))
        files.write_json(paths.join(directory, "sweep.json"), results)
        files.write_bytes(
            paths.join(directory, "barrier_vs_k.png"), plots.barrier_vs_k(results, STABLE_BARRIER)
        )
        return results
