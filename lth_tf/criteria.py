"""Pruning criteria: which surviving weights a round removes.

A criterion scores every weight of every prunable kernel; a round removes the
lowest-scoring survivors, with the thresholding `lth_tf.masks` applies to
scores (one threshold over the global pool of rate-1 layers, layer-wise
counts for the others, per-layer rates, exact counts: entries tied at the
threshold are dropped in flat order, layer by layer). Nothing here touches
TensorFlow.

A criterion is a function

    score(final, rewind, masks, seed) -> {layer: scores}

  final:  {layer: kernel} at the end of the round being pruned;
  rewind: {layer: kernel} of W_k, the weights the rounds rewind to (what
          Zhou et al. 2019 call the initial weights);
  masks:  {layer: 0/1 mask} of that round (only survivors are ranked);
  seed:   an int drawn from the run's seed, the round and the branch, for
          criteria that draw random numbers;
  returns {layer: float array of the kernel's shape}: higher survives.

Built in (`CRITERIA`): magnitude (|W_f|, "large final", the papers' IMP and
the default), magnitude_increase (|W_f| - |W_k|, Zhou et al.'s "magnitude
increase") and random (uniform scores: random pruning at IMP's per-layer
counts). Any other criterion is `package.module:function`, imported when the
run starts (`resolve`).
"""

import numpy as np

from lth_tf import plugins

MAGNITUDE = "magnitude"


def magnitude(final: dict, rewind: dict, masks: dict, seed: int) -> dict:
    """|W_f|: the papers' large-final criterion (the default)."""
    return {name: np.abs(final[name]) for name in masks}


def magnitude_increase(final: dict, rewind: dict, masks: dict, seed: int) -> dict:
    """|W_f| - |W_k|: Zhou et al. 2019's magnitude increase (from the rewind point)."""
    return {
        name: np.abs(final[name]).astype(np.float64) - np.abs(rewind[name]).astype(np.float64)
        for name in masks
    }


def random(final: dict, rewind: dict, masks: dict, seed: int) -> dict:
    """Uniform scores from `seed`, layer by layer in name order."""
    rng = np.random.default_rng(seed)
    return {name: rng.random(masks[name].shape) for name in sorted(masks)}


# The built-in criteria, by --prune_criterion name.
CRITERIA = {
    MAGNITUDE: magnitude,
    "magnitude_increase": magnitude_increase,
    "random": random,
}


def is_valid_name(name) -> bool:
    """A built-in name or the form `package.module:function` (not imported here)."""
    if not isinstance(name, str):
        return False
    if name in CRITERIA:
        return True
    module, sep, function = name.partition(":")
    parts = module.split(".")
    return bool(sep) and all(p.isidentifier() for p in parts) and function.isidentifier()


def expected() -> str:
    """What a criterion's name may be, for error messages."""
    return f"one of {', '.join(CRITERIA)}, or package.module:function (a score function)"


def resolve(name: str):
    """The score function of a criterion name.

    Raises:
      ValueError: not a built-in name nor `package.module:function`, the module
        cannot be imported, or it has no such callable.
    """
    if name in CRITERIA:
        return CRITERIA[name]
    if not is_valid_name(name):
        raise ValueError(f"prune_criterion: got {name!r}; expected {expected()}.")
    return plugins.import_function(name, "prune_criterion")


def scores(criterion, final: dict, rewind: dict, masks: dict, seed: int) -> dict:
    """The criterion's scores, checked: one finite array of each kernel's shape per layer.

    Args:
      criterion: a name (`resolve`) or a score function.

    Raises:
      ValueError: a layer missing, a shape that is not the kernel's, or a NaN.
    """
    fn = resolve(criterion) if isinstance(criterion, str) else criterion
    out = fn(final, rewind, masks, seed)
    label = getattr(fn, "__qualname__", repr(fn))
    if not isinstance(out, dict) or set(out) != set(masks):
        got = sorted(out) if isinstance(out, dict) else type(out).__name__
        raise ValueError(
            f"Pruning criterion {label} returned {got}; expected a dict of scores for exactly "
            f"the layers {sorted(masks)}."
        )
    checked = {}
    for name in masks:
        s = np.asarray(out[name])
        if s.shape != masks[name].shape:
            raise ValueError(
                f"Pruning criterion {label}: layer {name}'s scores have shape {s.shape}; "
                f"expected the kernel's {masks[name].shape}."
            )
        if np.isnan(s).any():
            raise ValueError(f"Pruning criterion {label}: layer {name}'s scores contain NaN.")
        checked[name] = s
    return checked
