"""Branches of a run: experiments that share its dense round 0 (`python -m lth_tf.branch`).

The comparisons of the papers are made on one dense network: which rewind
point k makes IMP work, weight rewinding against learning-rate rewinding and
fine-tuning (Renda, Frankle & Carbin, ICLR 2020), one-shot against iterative
pruning. A branch reuses the run's finished round 0 (its final weights and the
W_k it recorded) and trains only its own rounds, into

    <run>/branches/<name>/branch.json     its kind and parameters
    <run>/branches/<name>/round_NN/       rounds as the run's (lth_tf/paths.py)

Each round is trained by `rounds.Experiment.train_branch`: idempotent (a round
with a summary.json is skipped) and resumable from its mid-round checkpoint.
The name says what the branch is, so that it is its series' label in reports:

    rewind_<k>it            IMP with weight rewinding to another step k: its own
                            masks (round r prunes its round r-1; round 1 prunes
                            the run's round 0), each round restarts from W_k.
    lr_rewind_<k>it         learning-rate rewinding: round r prunes its round r-1
                            and keeps that round's final weights (masked); the
                            data order and learning rate replay the schedule from
                            k to T.
    finetune_lr<lr>_<n>it   fine-tuning: as lr_rewind, but n steps at the
                            constant learning rate lr.
    oneshot_<k>it_d<D>      one round: round 0's final weights pruned straight to
                            overall density D % (the density reached, to a weight),
                            each layer at the density IMP at the run's
                            --prune_fraction and per-layer rates has there
                            (masks.prune_to_density: one-shot matched to IMP layer
                            by layer), retrained from W_k. One branch per density
                            asked for. (Branches named oneshot_<k>it, one round per
                            density, were written before: they open and report as
                            they are.)

The kinds are records in lth_tf.branch_kinds (how the masks are found, how
each round starts, which parameters, the name): a new kind is one more record
there; this module resolves and trains any of them.
"""

import dataclasses
import math

import numpy as np

from lth_tf import branch_kinds, files, masks, paths, rounds, steps, train
from lth_tf.branch_kinds import KINDS
from lth_tf.config import NON_IDENTITY_FIELDS, RunConfig
from lth_tf.keras import tf

# What a branch may set differently from its run: everything else would need
# another round 0 (another arch, dataset, batch, seed, schedule, pruning rule).
BRANCH_FIELDS = ("rewind_step", "rounds")
# Config fields a branch's command may set for itself: they change nothing computed.
PROCESS_FIELDS = (
    "data_dir",
    "verbose",
    "test_every_period",
    "jit_compile",
    "steps_per_execution",
)


class BranchError(ValueError):
    """A branch that cannot be made from this run, or that contradicts one already there."""


@dataclasses.dataclass(frozen=True)
class Spec:
    """A branch, resolved to steps against its run's schedule."""

    kind: str
    rewind_step: int  # k: W_k and the first step (weight rewinding); where lr_rewind replays from
    rounds: int = 0  # iterative kinds
    densities: tuple[float, ...] = ()  # oneshot: the density asked for
    finetune_lr: float | None = None
    finetune_steps: int | None = None
    # oneshot: the density reached, IMP's rounds it matches, the name's decimals (in %)
    reached: float | None = None
    imp_rounds: float | None = None
    decimals: int = 2

    @property
    def name(self) -> str:
        """Its directory under <run>/branches/ and its label in reports.

        Distinct parameters give distinct names: the learning rate is written in
        full (its shortest exact decimal), as e.g. 0.0001 where that is exact.
        """
        return KINDS[self.kind].label(self)

    @property
    def legacy_name(self) -> str | None:
        """The name an older lth_tf gave this branch, where it differs (6 significant digits)."""
        if self.finetune_lr is not None:
            old = f"finetune_lr{self.finetune_lr:g}_{self.finetune_steps}it"
            return old if old != self.name else None
        return None

    def description(self) -> dict:
        """branch.json: what the branch is (rounds are not part of it: they extend)."""
        kind = KINDS[self.kind]
        return {
            "name": self.name,
            "kind": self.kind,
            "masks": kind.masks,
            "retraining": kind.retraining,
            "rewind_step": self.rewind_step,
            "densities": list(self.densities),
            "finetune_lr": self.finetune_lr,
            "finetune_steps": self.finetune_steps,
        } | (
            {"density_reached": self.reached, "imp_rounds": self.imp_rounds}
            if KINDS[self.kind].masks == branch_kinds.ONESHOT
            else {}
        )


def _same_description(key, ours, theirs) -> bool:
    if key == "finetune_lr" and None not in (ours, theirs):
        # The rate trains as a float32: an older lth_tf recorded the default rate
        # (the schedule's last) at float32's full precision.
        return np.float32(ours) == np.float32(theirs)
    return ours == theirs


def check_shares_round_0(config: RunConfig, requested: dict) -> None:
    """Refuses settings that a branch of this run cannot have.

    Args:
      config: the run's config.
      requested: {config field: value} the user set for the branch (e.g. from a
        flagfile); a branch may set only BRANCH_FIELDS (and fields that change
        nothing computed) differently.

    Raises:
      BranchError: listing each field that differs from the run's.
    """
    identity = config.identity()
    diff = {}
    for key, value in requested.items():
        if key in BRANCH_FIELDS or key in NON_IDENTITY_FIELDS or not hasattr(config, key):
            continue
        # A field left out of the identity at its old value (config.DEFAULT_OMITTED_FIELDS)
        # still differs from another value asked for.
        ours = identity.get(key, getattr(config, key))
        if isinstance(value, list):
            value = tuple(value)
        if isinstance(ours, list):
            ours = tuple(ours)
        if _normalise(key, value) != _normalise(key, ours):
            diff[key] = (ours, value)
    if diff:
        lines = "\n".join(
            f"  {k}: run has {a!r}, you asked for {b!r}" for k, (a, b) in diff.items()
        )
        raise BranchError(
            "A branch shares its run's round 0 (the dense network, its W_k and the pruning rule), "
            f"so it cannot change:\n{lines}\nDrop these flags to branch from this run, or start "
            "a new run with lth_tf.imp for other settings."
        )


def _normalise(key, value):
    duration_fields = ("training_steps", "eval_every", "warmup")
    if key in duration_fields and value is not None:
        return str(steps.parse(value, key))
    if key == "lr_drops":
        return tuple(str(steps.parse(v, key)) for v in value)
    return value


def _final_lr(config: RunConfig, schedule: train.Schedule) -> float:
    lr = train.lr_schedule(config, schedule)(schedule.total - 1)
    # A float32 rate, as its shortest decimal (0.0012, not 0.0012000000569969416): the
    # same float32, and a readable branch name.
    return float(str(np.float32(lr.numpy())))


def make_spec(
    experiment: rounds.Experiment,
    kind: str,
    *,
    rewind_step=None,
    num_rounds: int | None = None,
    densities=(),
    finetune_lr: float | None = None,
    finetune_steps=None,
) -> Spec:
    """Resolves a branch's parameters against its run, with the defaults filled in.

    Args:
      experiment: the run's Experiment.
      kind: one of KINDS.
      rewind_step: a duration or step: k of `rewind` (required, not the run's own),
        where `lr_rewind` replays from and `oneshot` rewinds to (default: the run's k).
      num_rounds: rounds of an iterative kind (default: the run's finished IMP rounds).
      densities: `oneshot`'s target overall density, one in (0, 1) (make_specs: several).
      finetune_lr: `finetune`'s constant rate (default: the schedule's last rate).
      finetune_steps: `finetune`'s steps per round (default: T - k of the run).

    Raises:
      BranchError: a parameter that does not fit the kind or the run.
    """
    if kind not in KINDS:
        raise BranchError(f"Unknown branch kind {kind!r}. Known kinds: {', '.join(KINDS)}.")
    _require_round_0(experiment.run_dir)
    record = KINDS[kind]
    given = {
        "rounds": num_rounds,
        "densities": densities,
        "finetune_lr": finetune_lr,
        "finetune_steps": finetune_steps,
    }
    for param, value in given.items():
        if param not in record.params and value not in (None, (), []):
            raise BranchError(f"--{param} is for {_takers(param)}, not --kind={kind}; drop it.")

    k = _rewind_point(kind, rewind_step, experiment.config, experiment.schedule)
    if record.masks == branch_kinds.ONESHOT:
        checked = _checked_densities(densities)
        if len(checked) > 1:
            raise BranchError(
                f"One density per one-shot branch, got {list(checked)}: make_specs makes one "
                "branch per density."
            )
        return _oneshot_spec(experiment, kind, k, checked[0])
    num_rounds = _branch_rounds(experiment.run_dir, num_rounds)
    _check_keeps_weights(experiment, rounds.round_fraction(experiment.config), num_rounds)
    if record.own_schedule:
        lr, n = _finetune_settings(
            experiment.config, experiment.schedule, finetune_lr, finetune_steps
        )
        # Fine-tuning starts at its own step 0: no k.
        return Spec(kind, 0, rounds=num_rounds, finetune_lr=lr, finetune_steps=n)
    return Spec(kind, k, rounds=num_rounds)


def _takers(param: str) -> str:
    names = branch_kinds.taking(param)
    if param == "rounds":
        one_shot = [n for n in KINDS if KINDS[n].masks == branch_kinds.ONESHOT]
        return f"the iterative kinds ({' and '.join(one_shot)} has one round per density)"
    return " or ".join(f"--kind={n}" for n in names)


def make_specs(experiment: rounds.Experiment, kind: str, **params) -> list:
    """make_spec's specs: one per density of `oneshot` (densities reaching the same
    masks' density once), else the one spec."""
    oneshot = kind in KINDS and KINDS[kind].masks == branch_kinds.ONESHOT
    if not oneshot or len(params.get("densities") or ()) < 2:
        return [make_spec(experiment, kind, **params)]
    specs = {}
    for d in _checked_densities(params.pop("densities")):
        spec = make_spec(experiment, kind, densities=[d], **params)
        specs.setdefault(spec.name, spec)
    return list(specs.values())


def _oneshot_spec(experiment: rounds.Experiment, kind: str, k: int, density: float) -> Spec:
    """A one-shot branch to `density` overall: IMP's rounds there and the density reached."""
    c, sizes = experiment.config, experiment.kernel_sizes()
    try:
        n = masks.matched_rounds(sizes, density, c.prune_fraction, c.prune_scope, experiment.rates)
    except ValueError as e:
        raise BranchError(f"--densities: {e}") from None
    survivors = masks.imp_survivors(sizes, c.prune_fraction, n, c.prune_scope, experiment.rates)
    total = sum(sizes.values())
    for group, alive in survivors.items():
        # A group of several layers (the global pool) splits its survivors by magnitude:
        # it counts as emptying a layer when even an even split leaves that layer none.
        pool = sum(sizes[name] for name in group)
        for name in group:
            if sizes[name] * alive / pool < 1:
                raise BranchError(
                    f"--densities: {density:g} would leave layer {name} ({sizes[name]} "
                    f"weights) with no weight at IMP's per-layer densities ({n:.2f} IMP rounds "
                    f"at --prune_fraction={c.prune_fraction:g}). Ask for a larger density."
                )
    # Enough decimals (of %) that two different numbers of survivors get two names.
    decimals = max(2, math.ceil(math.log10(total)) - 2)
    reached = sum(survivors.values()) / total
    return Spec(kind, k, densities=(density,), reached=reached, imp_rounds=n, decimals=decimals)


def _require_round_0(run_dir: str) -> None:
    r0 = paths.round_dir(run_dir, 0)
    if not files.exists(paths.summary_file(r0)):
        raise BranchError(
            f"{run_dir} has no finished round 0 ({paths.summary_file(r0)}): a branch "
            "reuses the run's dense network. Run `python -m lth_tf.imp` for this run first."
        )


def _rewind_point(kind: str, rewind_step, config, schedule) -> int:
    """The branch's k: --rewind_step resolved and checked, else the run's own k."""
    k = schedule.rewind
    takes = KINDS[kind].rewind_step
    if rewind_step is not None:
        if takes == branch_kinds.NONE:
            others = ", ".join(branch_kinds.taking("rewind_step"))
            raise BranchError(
                f"--rewind_step is for {others}, not --kind={kind} (it trains for "
                "--finetune_steps at --finetune_lr); drop it."
            )
        try:
            k = steps.rewind_point(
                rewind_step,
                schedule.steps_per_epoch,
                schedule.total,
                config.training_steps,
                "rewind_step",
            )
        except ValueError as e:
            raise BranchError(str(e)) from None
    if takes == branch_kinds.OTHER_K:
        if rewind_step is None:
            raise BranchError(
                f"--kind={kind} needs --rewind_step=K, the other rewind point (e.g. 500it or 2ep)."
            )
        if k == schedule.rewind:
            raise BranchError(
                f"--rewind_step={rewind_step} is the run's own rewind step {k}: its IMP rounds "
                f"are the run's round_NN directories. Choose another k."
            )
    return k


def _checked_densities(densities) -> tuple:
    """oneshot's densities, each in (0, 1), none repeated (layer sizes: `_oneshot_spec`)."""
    if not densities:
        raise BranchError("--kind=oneshot needs --densities, e.g. --densities=0.2,0.05,0.01.")
    for d in densities:
        if not (isinstance(d, (int, float)) and math.isfinite(d) and 0 < d < 1):
            raise BranchError(f"--densities: {d} is not a density in (0, 1).")
    if len(set(densities)) != len(densities):
        raise BranchError(f"--densities: {list(densities)} repeats a density.")
    return tuple(float(d) for d in densities)


def _check_keeps_weights(
    experiment, fraction: float, num_rounds: int, asked=None, instead="fewer --rounds"
) -> None:
    """Refuses rounds that leave a layer of the run's model with no weight (masks.emptied_layer)."""
    e = experiment
    sizes = {n: e.initial_weights[f"{n}/kernel"].size for n in e.layers}
    emptied = masks.emptied_layer(sizes, e.rates, fraction, num_rounds, e.config.prune_scope)
    if emptied is not None:
        name, r, size, rate = emptied
        asked = asked or f"--rounds={num_rounds} (each pruning {100 * fraction:.3g}%)"
        raise BranchError(
            f"{asked} would leave layer {name} ({size:,} weights, prune rate {rate:g}) with no "
            f"weight by round {r}: the network could only guess. Choose {instead}."
        )


def _branch_rounds(run_dir: str, num_rounds: int | None) -> int:
    """Rounds of an iterative branch: as asked, else as many as the run's IMP has finished."""
    if num_rounds is None:
        num_rounds = max(rounds_finished(run_dir), default=0)
        if num_rounds == 0:
            raise BranchError(
                f"{run_dir} has no pruned rounds to compare with: give the branch --rounds=N."
            )
    if num_rounds < 1:
        raise BranchError(f"--rounds={num_rounds}: a branch needs at least one round.")
    return num_rounds


def _finetune_settings(config, schedule, finetune_lr, finetune_steps) -> tuple:
    """(constant rate, steps per round) of a finetune branch, defaults filled in."""
    lr = _final_lr(config, schedule) if finetune_lr is None else float(finetune_lr)
    if not (math.isfinite(lr) and lr > 0):
        raise BranchError(
            f"--finetune_lr={finetune_lr}: expected a finite, positive learning rate, e.g. 1e-4."
        )
    n = schedule.total - schedule.rewind
    if finetune_steps is not None:
        n = steps.to_steps(finetune_steps, schedule.steps_per_epoch, "finetune_steps")
    if n < 1:
        raise BranchError(f"--finetune_steps={finetune_steps}: expected at least one step.")
    return lr, n


def rounds_finished(run_dir: str) -> list:
    """Indices >= 1 of the run's finished IMP rounds."""
    out = []
    r = 1
    while files.exists(paths.summary_file(paths.round_dir(run_dir, r))):
        out.append(r)
        r += 1
    return out


class Branch:
    """One branch of a run, trained with the run's Experiment (its model, data, round 0).

    Args:
      experiment: the run's rounds.Experiment.
      spec: make_spec()'s result.
    """

    def __init__(self, experiment: rounds.Experiment, spec: Spec):
        self.experiment = experiment
        self.spec = spec
        self.name = self._resolve_name()
        self.kind = KINDS[spec.kind]
        self._trainer = None

    @property
    def trainer(self) -> rounds.Experiment:
        """The Experiment that trains the rounds: the run's, or one with the fine-tuning rate.

        Fine-tuning trains with a constant learning rate for its own budget: a
        schedule of its own, so another compiled model (built once, lazily).
        """
        if not self.kind.own_schedule:
            return self.experiment
        if self._trainer is None:
            e = self.experiment
            config = dataclasses.replace(
                e.config,
                lr=self.spec.finetune_lr,
                warmup="0",
                lr_drops=(),
                training_steps=f"{self.spec.finetune_steps}it",
                rewind_step="0",
                rounds=0,
                controls=(),
                target_density=None,
            )
            self._trainer = rounds.Experiment(
                config,
                e.run_dir,
                strategy=e.strategy,
                checkpoint_seconds=e.checkpoint_seconds,
                write=e.write,
                log=e.log,
                data=e.data,
            )
        return self._trainer

    @property
    def trained(self) -> list:
        """(branch, round) trained by this process: the run's Experiment's, then the trainer's."""
        extra = self._trainer.trained if self._trainer is not None else []
        return list(self.experiment.trained) + list(extra)

    def _resolve_name(self) -> str:
        """spec.name, or the older name of this very branch where an older lth_tf made it."""
        run_dir, legacy = self.experiment.run_dir, self.spec.legacy_name
        if legacy is None or tf.io.gfile.isdir(paths.branch_dir(run_dir, self.spec.name)):
            return self.spec.name
        path = paths.branch_file(run_dir, legacy)
        if files.exists(path) and not self._differences(files.read_json(path), legacy):
            return legacy
        return self.spec.name

    def _differences(self, described: dict, name: str) -> dict:
        """{field: (described, asked)} where branch.json describes another branch than spec."""
        mine = {**self.spec.description(), "name": name}
        # One-shot: another density asked for, or IMP's rounds a hair apart, with the same
        # survivors (the name) is the same branch: the first description stays.
        oneshot = KINDS[self.spec.kind].masks == branch_kinds.ONESHOT
        asked = {"densities", "imp_rounds"} if oneshot else set()
        return {
            k: (described.get(k), mine.get(k))
            for k in sorted(set(described) | set(mine))
            if k not in asked and not _same_description(k, mine.get(k), described.get(k))
        }

    def _described(self) -> dict:
        path = paths.branch_file(self.experiment.run_dir, self.name)
        return files.read_json(path) if files.exists(path) else {}

    def _write_description(self) -> None:
        described = self._described()
        mine = {**self.spec.description(), "name": self.name}
        if described:
            differs = self._differences(described, self.name)
            if differs:
                path = paths.branch_file(self.experiment.run_dir, self.name)
                details = "; ".join(
                    f"{k}: the file has {a!r}, this branch {b!r}" for k, (a, b) in differs.items()
                )
                raise BranchError(
                    f"{path} describes another branch than the one asked for ({details}). "
                    "Nothing was changed: the rounds beside it were trained as that file says "
                    "and are kept. If the file was edited by hand, restore its values; to train "
                    "the branch asked for, its directory must not hold another branch."
                )
            if "finetune_lr" in described:  # the same float32 rate: the file stays as it is
                mine["finetune_lr"] = described["finetune_lr"]
        if self.experiment.write and not described:
            files.write_json(paths.branch_file(self.experiment.run_dir, self.name), mine)

    def run(self) -> list:
        """Trains (or resumes) every round of the branch; returns their summaries."""
        self._write_description()
        e = self.experiment
        e.log(f"== branch {self.name} of {e.run_dir}")
        if self.kind.masks == branch_kinds.ONESHOT:
            plan = [(1, paths.round_dir(e.run_dir, 0), self.spec.imp_rounds)]
        else:
            plan = [
                (r, paths.round_dir(e.run_dir, r - 1, self.name if r > 1 else None), None)
                for r in range(1, self.spec.rounds + 1)
            ]
        summaries = []
        for r, prev, imp_rounds in plan:
            rdir = paths.round_dir(e.run_dir, r, self.name)
            # Under multi-worker training every worker reads the chief's run (lth_tf.branch;
            # lth_tf.stability trains no branch there): they all see the same summary.json.
            if files.exists(paths.summary_file(rdir)):
                summaries.append(files.read_json(paths.summary_file(rdir)))
                continue
            round_masks = e.masks_after(
                prev,
                imp_rounds=imp_rounds,
                r=r,
                branch=self.name,
                rewind_step=self.spec.rewind_step,
            )
            start = self.kind.start(self, round_masks, prev)
            summaries.append(
                self.trainer.train_branch(
                    rdir, r, self.name, start.masks, start.weights, start.step
                )
            )
        return summaries
