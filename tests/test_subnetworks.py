"""Contracts of lth_tf.subnetworks: the controls as records, each start on plain arrays.

A fake Experiment (the attributes a start reads) keeps these tests off TensorFlow;
tests/test_imp.py trains the controls for real.
"""

import types

import numpy as np
import pytest

from lth_tf import masks, subnetworks

SHAPES = {"fc1": (6, 5), "fc2": (5, 3)}


def _experiment(seed=0, rewind=7):
    rng = np.random.default_rng(99)
    w_k = {f"{n}/kernel": rng.standard_normal(s) for n, s in SHAPES.items()}
    return types.SimpleNamespace(
        config=types.SimpleNamespace(seed=seed),
        schedule=types.SimpleNamespace(rewind=rewind),
        rewind_weights=lambda: w_k,
        # A "fresh initialisation" that shows which seed it was drawn with.
        fresh_weights=lambda s: {k: np.full_like(v, s) for k, v in w_k.items()},
    )


def _imp_masks():
    rng = np.random.default_rng(1)
    return {n: (rng.random(s) < 0.5).astype(np.float32) for n, s in SHAPES.items()}


def test_imp_starts_from_its_masks_on_w_k_at_k():
    e, m = _experiment(), _imp_masks()
    start = subnetworks.start(e, subnetworks.IMP, 2, m)
    assert start.masks is m and start.weights is e.rewind_weights() and start.step == 7


def test_random_reinit_keeps_imps_masks_with_weights_drawn_from_the_seed_and_round():
    e, m = _experiment(seed=3), _imp_masks()
    start = subnetworks.start(e, "random_reinit", 2, m)
    assert start.masks is m and start.step == 7
    seed = subnetworks.seed_for(3, "reinit", 2)
    assert all((v == seed).all() for v in start.weights.values())
    assert subnetworks.start(e, "random_reinit", 3, m).weights["fc1/kernel"][0, 0] != seed
    assert subnetworks.CONTROLS["random_reinit"].keeps_imp_masks


def test_random_prune_keeps_each_layers_density_on_w_k():
    e, m = _experiment(seed=3), _imp_masks()
    start = subnetworks.start(e, "random_prune", 2, m)
    assert start.weights is e.rewind_weights() and start.step == 7
    for n in SHAPES:
        assert start.masks[n].sum() == m[n].sum() and not np.array_equal(start.masks[n], m[n])
    expected = masks.random_like(m, subnetworks.seed_for(3, "prune", 2))
    assert all(np.array_equal(start.masks[n], expected[n]) for n in SHAPES)
    assert not subnetworks.CONTROLS["random_prune"].keeps_imp_masks


def test_an_unknown_control_lists_the_known_ones():
    with pytest.raises(ValueError, match="Known controls: random_reinit, random_prune"):
        subnetworks.start(_experiment(), "random_grow", 1, _imp_masks())


def test_seeds_are_stable_across_processes():
    # Runs written before depend on these values: a control's masks and weights.
    assert subnetworks.seed_for(0, "prune", 1) == subnetworks.seed_for(0, "prune", 1)
    assert subnetworks.seed_for(0, "prune", 1) != subnetworks.seed_for(0, "prune", 2)
    assert 0 <= subnetworks.seed_for(0, "reinit", 1) < 2**31
