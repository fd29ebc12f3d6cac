"""The subnetworks of a pruned round: IMP's, and the controls at its density, as records.

One registry (`CONTROLS`), the only definition of the controls' names: the
config (`--controls`), the rounds (lth_tf.rounds), the stability analyses
(`--subnetwork`, lth_tf.linear_mode) and the flags read them here. Nothing here
imports TensorFlow, so flag definitions and reports can use it.

A control is a record: its name, its mask rule and how its round starts: a
function `start(experiment, r, imp_masks) -> Start` of the run's
rounds.Experiment, round r and IMP's masks of that round. A new control is
one more record in `CONTROLS` (and its test in tests/test_subnetworks.py); a
run then trains it with `--controls=NAME` and lth_tf.stability analyses it
with `--subnetwork=NAME`.
"""

import dataclasses
import hashlib
from collections.abc import Callable

from lth_tf import masks

# The name of the IMP rounds: a run's own series (its round_NN directories), the
# branch "imp" of lth_tf.rundir.finished_rounds, the subnetwork "imp" of stability.
IMP = "imp"


def seed_for(*parts) -> int:
    """A seed in [0, 2^31) drawn from `parts` (e.g. the run's seed, a purpose, a round)."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:4], "little") % (2**31)


@dataclasses.dataclass(frozen=True)
class Start:
    """How a round starts: its masks, its (unmasked) weights and its first global step."""

    masks: dict
    weights: dict
    step: int


@dataclasses.dataclass(frozen=True)
class Control:
    """A control: a subnetwork at IMP's density that tests what IMP's ticket owes to what.

    Attributes:
      name: its --controls / --subnetwork name and its directory under branches/.
      mask_rule: the rule of its masks, in words (reports, --help).
      start: start(experiment, r, imp_masks) -> Start of round r >= 1.
      keeps_imp_masks: True when its masks are IMP's (only the weights differ).
    """

    name: str
    mask_rule: str
    start: Callable
    keeps_imp_masks: bool


def imp_start(e, r: int, imp_masks: dict) -> Start:
    """IMP: the round's masks on W_k, from step k."""
    return Start(imp_masks, e.rewind_weights(), e.schedule.rewind)


def _random_reinit_start(e, r: int, imp_masks: dict) -> Start:
    # Same mask, weights drawn afresh from the initialiser.
    return Start(
        imp_masks, e.fresh_weights(seed_for(e.config.seed, "reinit", r)), e.schedule.rewind
    )


def _random_prune_start(e, r: int, imp_masks: dict) -> Start:
    # A random mask with the IMP mask's per-layer densities, from the same W_k.
    random_masks = masks.random_like(imp_masks, seed_for(e.config.seed, "prune", r))
    return Start(random_masks, e.rewind_weights(), e.schedule.rewind)


CONTROLS = {
    c.name: c
    for c in (
        Control(
            "random_reinit",
            "IMP's masks, the weights drawn afresh from the initialiser",
            _random_reinit_start,
            keeps_imp_masks=True,
        ),
        Control(
            "random_prune",
            "random masks with IMP's per-layer densities, on W_k",
            _random_prune_start,
            keeps_imp_masks=False,
        ),
    )
}
CONTROL_NAMES = tuple(CONTROLS)
# What lth_tf.stability analyses (--subnetwork): IMP's subnetwork or a control's.
SUBNETWORKS = (IMP, *CONTROL_NAMES)


def start(e, name: str, r: int, imp_masks: dict) -> Start:
    """How round r of IMP (name IMP) or of a control starts."""
    if name == IMP:
        return imp_start(e, r, imp_masks)
    if name not in CONTROLS:
        raise ValueError(f"Unknown control {name!r}. Known controls: {', '.join(CONTROL_NAMES)}.")
    return CONTROLS[name].start(e, r, imp_masks)
