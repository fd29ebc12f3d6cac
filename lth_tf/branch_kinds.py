"""The kinds of branch of a run (`python -m lth_tf.branch --kind=...`), as records.

One registry (`KINDS`), the only definition of the branch kinds: lth_tf.branching
resolves and trains them, the --kind flag (lth_tf.flagdefs) lists them.
Nothing here imports TensorFlow, so flag definitions can use it.

A kind is a record: its name, how its masks are found (ITERATIVE: round r
prunes the branch's round r-1, round 1 the run's round 0; ONESHOT: one round,
round 0 pruned straight to a density), how each round starts (`start`), which
parameters it takes, and how a branch of it is named. A new kind is one more
record here (and its test in tests/test_branch_kinds.py); lth_tf.branching,
lth_tf.branch and the reports then know it.
"""

import dataclasses
from collections.abc import Callable

from lth_tf.subnetworks import Start

ITERATIVE = "iterative"
ONESHOT = "oneshot"

# How a kind takes --rewind_step: OTHER_K: required and not the run's own k (the
# run's own k is its IMP rounds); OPTIONAL: default the run's k; NONE: refused.
OTHER_K, OPTIONAL, NONE = "other_k", "optional", "none"

# The parameters of a kind besides --rewind_step (lth_tf.branching.make_spec's
# arguments): rounds (iterative kinds), densities (one-shot), the fine-tuning rate
# and steps.
PARAMETERS = ("rounds", "densities", "finetune_lr", "finetune_steps")


@dataclasses.dataclass(frozen=True)
class BranchKind:
    """One kind of branch.

    Attributes:
      name: its --kind.
      masks: ITERATIVE or ONESHOT.
      retraining: the name of its retraining mode (branch.json's "retraining").
      start: start(branch, round_masks, prev_rdir) -> Start: how each round
        starts, from lth_tf.branching.Branch (its experiment and spec), the
        round's masks and the round they were pruned from.
      params: which of PARAMETERS it takes.
      rewind_step: OTHER_K, OPTIONAL or NONE.
      label: label(spec) -> its directory name under branches/ (a report's series).
      own_schedule: trains with a schedule of its own (a constant rate for its own
        steps) instead of the run's.
    """

    name: str
    masks: str
    retraining: str
    start: Callable
    params: frozenset
    rewind_step: str
    label: Callable
    own_schedule: bool = False
    help: str = ""


def _weight_rewind(b, round_masks: dict, prev_rdir: str) -> Start:
    k = b.spec.rewind_step
    return Start(round_masks, b.experiment.dense_weights_at(k), k)


def _lr_rewind(b, round_masks: dict, prev_rdir: str) -> Start:
    # Renda et al.: the previous round's final weights, the schedule replayed from k.
    return Start(round_masks, b.experiment.final_weights(prev_rdir), b.spec.rewind_step)


def _finetune(b, round_masks: dict, prev_rdir: str) -> Start:
    # Step 0 of the fine-tuning schedule (a constant rate; lth_tf.branching.Branch.trainer).
    return Start(round_masks, b.experiment.final_weights(prev_rdir), 0)


def exact_decimal(x: float) -> str:
    """x as the shortest decimal that reads back as x ('1e-05', '0.0001', '0.123456789').

    Branch names of older lth_tf wrote 6 significant digits; they are kept wherever
    they are exact, so those names do not change.
    """
    short = f"{x:g}"
    return short if float(short) == x else repr(float(x))


KINDS = {
    kind.name: kind
    for kind in (
        BranchKind(
            "rewind",
            ITERATIVE,
            "weight_rewind",
            _weight_rewind,
            frozenset({"rounds"}),
            OTHER_K,
            lambda s: f"rewind_{s.rewind_step}it",
            help="IMP rewound to another k",
        ),
        BranchKind(
            "lr_rewind",
            ITERATIVE,
            "lr_rewind",
            _lr_rewind,
            frozenset({"rounds"}),
            OPTIONAL,
            lambda s: f"lr_rewind_{s.rewind_step}it",
            help="learning-rate rewinding (Renda et al. 2020)",
        ),
        BranchKind(
            "finetune",
            ITERATIVE,
            "finetune",
            _finetune,
            frozenset({"rounds", "finetune_lr", "finetune_steps"}),
            NONE,
            lambda s: f"finetune_lr{exact_decimal(s.finetune_lr)}_{s.finetune_steps}it",
            own_schedule=True,
            help="fine-tuning at a constant rate",
        ),
        BranchKind(
            "oneshot",
            ONESHOT,
            "weight_rewind",
            _weight_rewind,
            frozenset({"densities"}),
            OPTIONAL,
            lambda s: f"oneshot_{s.rewind_step}it_d{100 * s.reached:.{s.decimals}f}",
            help="one-shot pruning to each density, matched to IMP",
        ),
    )
}
NAMES = tuple(KINDS)


def taking(param: str) -> list:
    """The names of the kinds that take `param` (one of PARAMETERS, or 'rewind_step')."""
    if param == "rewind_step":
        return [k.name for k in KINDS.values() if k.rewind_step != NONE]
    return [k.name for k in KINDS.values() if param in k.params]
