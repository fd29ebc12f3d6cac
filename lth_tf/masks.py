"""Magnitude and random pruning on numpy arrays; mask files; density reports.

Other criteria (lth_tf.criteria) rank their scores instead of |w| with the
same rules (`prune_scores`, `prune_scores_to_rounds`).

Masks are {layer name: float32 array of 0/1} with the kernel's shape. Nothing
here touches TensorFlow, so every rule can be tested on plain arrays.

Per-layer rates: each prunable layer has a rate r that multiplies the prune
fraction p. Layers with r == 1 share one global magnitude threshold (global
scope) or get p each (layerwise scope); layers with 0 < r != 1 are pruned
layer-wise at r * p in either scope; r == 0 keeps a layer dense. A layer's rate
follows from its kind (`layer_rates`): conv kernels at `conv_rate`, dense hidden
layers at 1, the output layer at `output_rate`. So the 2019 paper's Conv-2
(layer-wise; conv 10%, dense 20%, output 10% per round) is p = 0.2 with
conv_rate = output_rate = 0.5 and layerwise scope. After r rounds a layer at
rate c has density (1 - c * p)^r.

One-shot pruning matched to IMP (`prune_to_density`): for an overall density d
(of every masked kernel, as `density` counts it), each layer (and the global
pool of rate-1 layers, as one) gets the survivors that IMP at fraction p and
the same rates has when the whole reaches d: after n rounds, n real, solved
for (`imp_survivors`, `matched_rounds`). With rates other than 0 and 1 the
layers do not all reach d: Conv-2 at 10.74% (ten IMP rounds) is conv 34.9%,
fc 10.7%, output 34.9%, and so is its one-shot.
"""

import numpy as np

# Layer kinds, as `lth_tf.sparsity.layer_kinds` reads them from a model.
CONV = "conv"
DENSE = "dense"
OUTPUT = "output"
LAYER_KINDS = (CONV, DENSE, OUTPUT)


def layer_rates(kinds: dict, *, conv_rate: float = 1.0, output_rate: float = 1.0) -> dict:
    """Each prunable layer's rate multiplier of the prune fraction, from its kind.

    Args:
      kinds: {layer name: CONV, DENSE or OUTPUT} (see `lth_tf.sparsity.layer_kinds`).
      conv_rate: the rate of conv kernels.
      output_rate: the rate of the output layer (0 keeps it dense).

    Returns:
      {layer name: rate}, for `prune`'s `rates`: conv layers at `conv_rate`, dense
      hidden layers at 1, the output layer at `output_rate`.

    Raises:
      ValueError: for a kind that is not one of LAYER_KINDS, or a negative rate.
    """
    for name, rate in (("conv_rate", conv_rate), ("output_rate", output_rate)):
        if not rate >= 0:
            raise ValueError(f"{name} must be a multiplier >= 0 of the prune fraction, got {rate}.")
    by_kind = {CONV: float(conv_rate), DENSE: 1.0, OUTPUT: float(output_rate)}
    unknown = {n: k for n, k in kinds.items() if k not in by_kind}
    if unknown:
        raise ValueError(
            f"Unknown layer kinds {unknown}; expected one of {', '.join(LAYER_KINDS)}."
        )
    return {name: by_kind[kind] for name, kind in kinds.items()}


def emptied_layer(
    sizes: dict, rates: dict, fraction: float, rounds: int, scope: str = "global"
) -> tuple | None:
    """The first layer that `rounds` rounds of `prune` at `fraction` leave with no weight.

    Counts only, no weights: a layer pruned on its own (rate != 1, or layerwise
    scope) loses exactly round(rate * fraction * survivors) each round; the
    rate-1 layers of the global scope share one pool, which loses
    round(fraction * survivors). Which layer of the pool keeps its weights
    depends on their magnitudes, so a pool layer counts as emptied when even an
    even spread of the pool's survivors would leave it less than one weight.

    Args:
      sizes: {layer: number of kernel weights}.
      rates: {layer: rate multiplier} (missing layers have rate 1).
      fraction: each round's prune fraction.
      rounds: how many rounds.
      scope: 'global' or 'layerwise'.

    Returns:
      None when every layer keeps a weight, else (layer, round, size, rate).
    """
    alive = dict(sizes)
    pool = [n for n in sizes if rates.get(n, 1.0) == 1 and scope == "global"]
    total = sum(sizes[n] for n in pool)
    pooled = total
    for r in range(1, rounds + 1):
        for name in sizes:
            rate = rates.get(name, 1.0)
            if name in pool or rate == 0:
                continue
            alive[name] -= _count(min(rate * fraction, 1.0), alive[name])
            if alive[name] < 1:
                return name, r, sizes[name], rate
        if pool:
            pooled -= _count(fraction, pooled)
            for name in pool:
                if sizes[name] * pooled / total < 1:
                    return name, r, sizes[name], 1.0
    return None


def _count(fraction: float, surviving: int) -> int:
    return int(np.round(fraction * surviving))


def _drop_smallest(scores: list, masks: list, fraction: float, k: int | None = None) -> list:
    """Removes round(fraction * survivors) (or k) of the survivors of all `masks` together.

    The lowest scores go (magnitude pruning: the scores are |w|). One threshold
    over every given tensor: the k-th smallest surviving score, found with a
    partition (O(n), not a sort: ResNet-50's 25M weights take well under a
    second). Entries exactly at the threshold are dropped in order until exactly
    k are gone, so densities are exact even with ties.
    """
    alive = [m > 0 for m in masks]
    pool = np.concatenate([a[m] for a, m in zip(scores, alive, strict=True)])
    if k is None:
        k = _count(fraction, pool.size)
    if k == 0:
        return [m.astype(np.float32) for m in alive]
    threshold = np.partition(pool, k - 1)[k - 1]
    ties_to_drop = k - int(np.count_nonzero(pool < threshold))
    out = []
    for a, m in zip(scores, alive, strict=True):
        keep = m & (a > threshold)
        ties = np.flatnonzero(m & (a == threshold))
        n_drop = min(ties_to_drop, ties.size)
        keep.ravel()[ties[n_drop:]] = True  # ties beyond the k-th survive
        ties_to_drop -= n_drop
        out.append(keep.astype(np.float32))
    return out


def _magnitudes(weights: dict) -> dict:
    return {name: np.abs(w) for name, w in weights.items()}


def prune(weights: dict, masks: dict, fraction: float, scope: str = "global", rates=None) -> dict:
    """One round of magnitude pruning.

    Args:
      weights: {layer: kernel} (trained weights of the previous round).
      masks: {layer: current mask}; pruned entries never come back.
      fraction: fraction p of each pool's surviving weights to remove.
      scope: 'global' (one threshold over all rate-1 layers) or 'layerwise'.
      rates: {layer: rate multiplier}; missing layers have rate 1.

    Returns:
      New masks, a subset of `masks`.
    """
    return prune_scores(_magnitudes(weights), masks, fraction, scope, rates)


def prune_scores(scores: dict, masks: dict, fraction: float, scope="global", rates=None) -> dict:
    """One round of pruning by any criterion: `prune` with the lowest `scores` removed.

    Args:
      scores: {layer: array of the kernel's shape} (lth_tf.criteria); |w| is `prune`.
      masks, fraction, scope, rates: as `prune`'s.
    """
    if not 0 <= fraction < 1:
        raise ValueError(f"Prune fraction must be in [0, 1), got {fraction}.")
    if scope not in ("global", "layerwise"):
        raise ValueError(f"Prune scope must be 'global' or 'layerwise', got {scope!r}.")
    rates = rates or {}
    new = {}
    pool = []
    for name, mask in masks.items():
        rate = rates.get(name, 1.0)
        if rate == 0:
            new[name] = mask.astype(np.float32)
        elif rate == 1 and scope == "global":
            pool.append(name)
        else:
            (new[name],) = _drop_smallest([scores[name]], [mask], min(rate * fraction, 1.0))
    if pool:
        pooled = _drop_smallest([scores[n] for n in pool], [masks[n] for n in pool], fraction)
        new.update(zip(pool, pooled, strict=True))
    return {name: new[name] for name in masks}


def _groups(names, scope: str, rates: dict) -> dict:
    """{tuple of layer names: rate}: the layers `prune` prunes together (the global pool
    of rate-1 layers) as one group, every other layer on its own."""
    pool = tuple(n for n in names if scope == "global" and rates.get(n, 1.0) == 1)
    groups = {(n,): float(rates.get(n, 1.0)) for n in names if n not in pool}
    if pool:
        groups[pool] = 1.0
    return groups


def _after(size: int, rate: float, fraction: float, rounds: float) -> int:
    """Survivors of `size` weights after `rounds` (real, >= 0) IMP rounds at rate * fraction.

    Whole rounds remove round(rate * fraction * survivors) each, as `prune` does; a
    part f of a round keeps round(survivors * (1 - rate * fraction)^f).
    """
    if rate == 0:
        return size
    step = min(rate * fraction, 1.0)
    alive = size
    whole = int(rounds)
    for _ in range(whole):
        alive -= _count(step, alive)
    part = rounds - whole
    if part > 0:
        alive = int(np.round(alive * (1.0 - step) ** part))
    return alive


def imp_survivors(sizes: dict, fraction: float, rounds: float, scope="global", rates=None) -> dict:
    """Survivors after `rounds` rounds of IMP from dense masks, per group `prune` prunes.

    Args:
      sizes: {layer: kernel size}.
      fraction: IMP's prune fraction p per round.
      rounds: n >= 0, real: whole rounds count weights as `prune` does.
      scope, rates: as `prune`'s.

    Returns:
      {tuple of layer names: survivors}: each layer on its own, except with global
      scope the rate-1 layers, one group (their split follows the weights).
    """
    rates = rates or {}
    return {
        group: _after(sum(sizes[n] for n in group), rate, fraction, rounds)
        for group, rate in _groups(sizes, scope, rates).items()
    }


def matched_rounds(sizes: dict, density: float, fraction: float, scope="global", rates=None):
    """The IMP rounds n (real) after which the kernels are closest to `density` overall.

    The overall density is `density`'s (every masked kernel, rate-0 layers dense).
    A whole n where IMP lands exactly on it, else between two rounds.

    Raises:
      ValueError: density is not in (0, 1], or IMP at these rates never gets that low
        (rate-0 layers stay dense; a layer stops where round(rate * p * survivors) is 0).
    """
    if not 0 < density <= 1:
        raise ValueError(f"A density must be in (0, 1], got {density}.")
    total = sum(sizes.values())
    target = int(np.round(density * total))

    def alive(n):
        return sum(imp_survivors(sizes, fraction, n, scope, rates).values())

    m, before = 0, total
    while before > target:
        after = alive(m + 1)
        if after <= target:
            break
        if after == before:
            raise ValueError(
                f"Density {density} cannot be reached: pruning at fraction {fraction} with the "
                f"per-layer rates {rates or {}} stops at {after / total:.6g} (layers at rate 0 "
                "stay dense). Ask for a higher density."
            )
        m, before = m + 1, after
    else:
        return float(m)
    if after == target:
        return float(m + 1)
    lo, hi = 0.0, 1.0  # alive(m + lo) > target >= alive(m + hi)
    for _ in range(60):
        mid = (lo + hi) / 2
        if alive(m + mid) > target:
            lo = mid
        else:
            hi = mid
    closer_lo = alive(m + lo) - target < target - alive(m + hi)
    return m + (lo if closer_lo else hi)


def prune_to_rounds(
    weights: dict, masks: dict, rounds: float, fraction: float, scope="global", rates=None
) -> dict:
    """Magnitude pruning straight to IMP's survivors after `rounds` rounds (one-shot).

    Each group of `imp_survivors` keeps that many of its largest surviving weights
    (the global pool under one threshold), so its survivors are IMP's at `rounds`
    rounds of `fraction` with the same scope and rates. A group already below its
    count (by at most one weight where rounding differs) is left as it is.

    Returns:
      New masks, a subset of `masks`.
    """
    return prune_scores_to_rounds(_magnitudes(weights), masks, rounds, fraction, scope, rates)


def prune_scores_to_rounds(
    scores: dict, masks: dict, rounds: float, fraction: float, scope="global", rates=None
) -> dict:
    """`prune_to_rounds` by any criterion: each group keeps its highest `scores`."""
    rates = rates or {}
    sizes = {n: m.size for n, m in masks.items()}
    new = {}
    for group, keep in imp_survivors(sizes, fraction, rounds, scope, rates).items():
        current = [masks[n] for n in group]
        alive = sum(int(np.count_nonzero(m)) for m in current)
        kept = _drop_smallest([scores[n] for n in group], current, 0.0, max(alive - keep, 0))
        new.update(zip(group, kept, strict=True))
    return {name: new[name] for name in masks}


def prune_to_density(
    weights: dict, masks: dict, density: float, fraction: float, scope="global", rates=None
) -> dict:
    """One-shot magnitude pruning matched to IMP: overall `density`, IMP's layer densities.

    Every layer (the global pool as one) keeps the survivors IMP at `fraction` per
    round with these rates has when the whole is at `density` (`matched_rounds`).
    With every rate 1 that is `density` in every group; a rate-0 layer stays dense.
    """
    sizes = {n: m.size for n, m in masks.items()}
    n = matched_rounds(sizes, density, fraction, scope, rates)
    return prune_to_rounds(weights, masks, n, fraction, scope, rates)


def random_like(masks: dict, seed: int) -> dict:
    """Random masks with exactly the same number of survivors per layer as `masks`."""
    rng = np.random.default_rng(seed)
    out = {}
    for name in sorted(masks):
        mask = masks[name]
        keep = int(mask.sum())
        new = np.zeros(mask.size, dtype=np.float32)
        new[rng.choice(mask.size, size=keep, replace=False)] = 1
        out[name] = new.reshape(mask.shape)
    return out


def ones_like(weights: dict) -> dict:
    return {name: np.ones_like(w, dtype=np.float32) for name, w in weights.items()}


def density(masks: dict) -> float:
    """Fraction of prunable weights remaining."""
    total = sum(m.size for m in masks.values())
    return float(sum(m.sum() for m in masks.values()) / total) if total else 1.0


def report(masks: dict) -> dict:
    """Per-layer and overall sparsity, as written to sparsity.json."""
    layers = {
        name: {"size": int(m.size), "remaining": int(m.sum()), "density": float(m.sum() / m.size)}
        for name, m in masks.items()
    }
    return {
        "density": density(masks),
        "remaining": int(sum(v["remaining"] for v in layers.values())),
        "size": int(sum(v["size"] for v in layers.values())),
        "layers": layers,
    }


def check_subset(new: dict, old: dict) -> None:
    """Raises if a weight pruned in `old` is alive in `new`."""
    for name in old:
        if np.any((new[name] > 0) & (old[name] == 0)):
            raise AssertionError(f"Layer {name}: a pruned weight came back.")
