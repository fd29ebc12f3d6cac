"""Contracts of lth_tf.masks: magnitude pruning rules on plain numpy arrays."""

import numpy as np
import pytest

from lth_tf import masks

SHAPES = {"fc1": (20, 30), "fc2": (30, 10), "output": (10, 4)}


def _weights(seed=0, scales=None):
    rng = np.random.default_rng(seed)
    scales = scales or {}
    return {
        n: (rng.standard_normal(s) * scales.get(n, 1.0)).astype(np.float32)
        for n, s in SHAPES.items()
    }


def _ones():
    return {n: np.ones(s, np.float32) for n, s in SHAPES.items()}


def _alive(m):
    return int(sum(v.sum() for v in m.values()))


def test_global_prune_removes_round_p_times_survivors_over_the_pool():
    w, m = _weights(), _ones()
    new = masks.prune(w, m, 0.2, "global")
    total = _alive(m)
    assert _alive(new) == total - int(np.round(0.2 * total))
    # Once more from a partly pruned mask: the fraction is of the survivors.
    again = masks.prune(w, new, 0.2, "global")
    assert _alive(again) == _alive(new) - int(np.round(0.2 * _alive(new)))


def test_global_prune_keeps_every_survivor_above_every_pruned_weight_across_layers():
    # Layers on disjoint magnitude ranges: one global threshold prunes the small layer first.
    rng = np.random.default_rng(0)
    bands = {"fc1": 0.001, "fc2": 1.0, "output": 100.0}
    w = {
        n: (rng.uniform(1, 2, s) * rng.choice([-1, 1], s) * bands[n]).astype(np.float32)
        for n, s in SHAPES.items()
    }
    new = masks.prune(w, _ones(), 0.5, "global")
    survivors = np.concatenate([np.abs(w[n][new[n] == 1]) for n in SHAPES])
    pruned = np.concatenate([np.abs(w[n][new[n] == 0]) for n in SHAPES])
    assert survivors.min() >= pruned.max()
    assert pruned.size == int(np.round(0.5 * 940))
    # All 470 pruned weights come from the 600 of the smallest layer.
    assert new["fc1"].sum() == 600 - 470
    assert new["fc2"].all() and new["output"].all()


@pytest.mark.parametrize("scope", ["global", "layerwise"])
def test_ties_at_the_threshold_still_remove_exactly_round_p_times_survivors(scope):
    # Every magnitude equal (e.g. a layer of constant weights): counts stay exact.
    w = {n: np.full(s, 0.5, np.float32) for n, s in SHAPES.items()}
    new = masks.prune(w, _ones(), 0.2, scope)
    if scope == "global":
        assert _alive(new) == 940 - int(np.round(0.2 * 940))
    else:
        for n, s in SHAPES.items():
            assert new[n].sum() == np.prod(s) - int(np.round(0.2 * np.prod(s))), n


def test_layerwise_prune_gives_each_layer_its_own_fraction():
    w = _weights(scales={"fc1": 0.01, "fc2": 1.0, "output": 100.0})
    new = masks.prune(w, _ones(), 0.2, "layerwise")
    for n, shape in SHAPES.items():
        size = int(np.prod(shape))
        assert new[n].sum() == size - int(np.round(0.2 * size)), n
        assert np.abs(w[n][new[n] == 1]).min() >= np.abs(w[n][new[n] == 0]).max(), n


@pytest.mark.parametrize("scope", ["global", "layerwise"])
def test_rate_0_layer_is_untouched_and_rate_0_5_layer_is_pruned_at_half_rate(scope):
    w = _weights()
    m = _ones()
    m["fc2"].ravel()[:7] = 0  # an already-pruned rate-0 layer keeps its mask as is
    rates = {"fc2": 0.0, "output": 0.5}
    new = masks.prune(w, m, 0.2, scope, rates)
    np.testing.assert_array_equal(new["fc2"], m["fc2"])
    out_size = int(np.prod(SHAPES["output"]))
    assert new["output"].sum() == out_size - int(np.round(0.1 * out_size))
    # The half-rate layer is pruned by its own magnitudes.
    o = w["output"]
    assert np.abs(o[new["output"] == 1]).min() >= np.abs(o[new["output"] == 0]).max()
    # fc1 (rate 1) alone forms the pool, pruned at the full rate.
    fc1_size = int(np.prod(SHAPES["fc1"]))
    assert new["fc1"].sum() == fc1_size - int(np.round(0.2 * fc1_size))


@pytest.mark.parametrize("scope", ["global", "layerwise"])
def test_pruned_weights_never_come_back_even_with_large_magnitudes(scope):
    w, m = _weights(), _ones()
    first = masks.prune(w, m, 0.2, scope)
    # The previously pruned weights now have the largest magnitudes of all.
    grown = {n: np.where(first[n] == 0, 1e6, w[n]).astype(np.float32) for n in SHAPES}
    second = masks.prune(grown, first, 0.2, scope)
    for n in SHAPES:
        assert not np.any((second[n] == 1) & (first[n] == 0)), n
    masks.check_subset(second, first)
    assert _alive(second) < _alive(first)


def test_check_subset_raises_when_a_pruned_weight_comes_back():
    old = _ones()
    old["fc1"][0, 0] = 0
    with pytest.raises(AssertionError, match="fc1"):
        masks.check_subset(_ones(), old)


@pytest.mark.parametrize("scope", ["global", "layerwise"])
def test_density_after_r_rounds_is_0_8_pow_r(scope):
    m = _ones()
    for r in range(1, 7):
        m = masks.prune(_weights(seed=r), m, 0.2, scope)
        assert masks.density(m) == pytest.approx(0.8**r, abs=0.005)
        assert set(np.unique(np.concatenate([v.ravel() for v in m.values()]))) <= {0.0, 1.0}
        assert all(v.dtype == np.float32 and v.shape == SHAPES[n] for n, v in m.items())


def test_layerwise_densities_after_r_rounds_follow_each_layers_rate():
    # The 2019 paper's Conv protocol on kinds: conv at 0.5 * 20%, dense 20%, output 10%.
    kinds = {"fc1": masks.CONV, "fc2": masks.DENSE, "output": masks.OUTPUT}
    rates = masks.layer_rates(kinds, conv_rate=0.5, output_rate=0.5)
    w, m = _weights(), _ones()
    for _ in range(5):
        m = masks.prune(w, m, 0.2, "layerwise", rates)
    for name, per_round in (("fc1", 0.1), ("fc2", 0.2), ("output", 0.1)):
        size = m[name].size
        assert m[name].sum() / size == pytest.approx((1 - per_round) ** 5, abs=2.5 / size)


def test_random_like_keeps_per_layer_counts_exactly_and_differs_from_the_input():
    m = _ones()
    for r in range(3):
        m = masks.prune(_weights(seed=r), m, 0.2, "global")
    rnd = masks.random_like(m, seed=1)
    assert set(rnd) == set(m)
    for n in SHAPES:
        assert rnd[n].shape == m[n].shape and rnd[n].dtype == np.float32
        assert rnd[n].sum() == m[n].sum(), n
        assert not np.array_equal(rnd[n], m[n]), n
    # Seeded: same seed, same masks; another seed, other masks.
    again = masks.random_like(m, seed=1)
    assert all(np.array_equal(again[n], rnd[n]) for n in SHAPES)
    other = masks.random_like(m, seed=2)
    assert any(not np.array_equal(other[n], rnd[n]) for n in SHAPES)


@pytest.mark.parametrize("fraction", [-0.1, 1.0, 1.5])
def test_prune_rejects_a_fraction_outside_0_1(fraction):
    with pytest.raises(ValueError, match=r"fraction.*\[0, 1\)"):
        masks.prune(_weights(), _ones(), fraction)


def test_prune_rejects_an_unknown_scope():
    with pytest.raises(ValueError, match="scope.*'global' or 'layerwise'"):
        masks.prune(_weights(), _ones(), 0.2, "per_channel")


def test_prune_fraction_0_changes_nothing():
    m = _ones()
    new = masks.prune(_weights(), m, 0.0)
    assert all(np.array_equal(new[n], m[n]) for n in SHAPES)


def test_report_counts_per_layer_and_overall():
    m = _ones()
    m["fc1"][:10] = 0
    rep = masks.report(m)
    assert rep["layers"]["fc1"] == {"size": 600, "remaining": 300, "density": 0.5}
    assert rep["size"] == 600 + 300 + 40
    assert rep["remaining"] == 300 + 300 + 40
    assert rep["density"] == pytest.approx(640 / 940)


# ---- one-shot pruning matched to IMP -----------------------------------------------------------


def _imp(w, m, rounds, fraction, scope, rates):
    for _ in range(rounds):
        m = masks.prune(w, m, fraction, scope, rates)
    return m


def test_prune_alone_misses_the_rates_at_one_shot_and_prune_to_density_matches_them():
    # The one line: one round at 0.9 leaves the half-rate layer at 55%, far
    # from where IMP at 20% per round has it when the whole is at the same density.
    w = {"c": _weights()["fc1"], "f": _weights(seed=1)["fc1"]}
    ones = masks.ones_like(w)
    rates = {"c": 0.5, "f": 1.0}
    naive = masks.prune(w, ones, 0.9, "layerwise", rates)
    assert naive["c"].mean() == pytest.approx(0.55) and naive["f"].mean() == pytest.approx(0.1)
    imp = _imp(w, ones, 8, 0.2, "layerwise", rates)
    oneshot = masks.prune_to_density(w, ones, masks.density(imp), 0.2, "layerwise", rates)
    for n in w:
        assert abs(int(oneshot[n].sum()) - int(imp[n].sum())) <= 1, n
    assert oneshot["c"].mean() == pytest.approx(0.9**8, abs=2 / 600)  # not 55%


@pytest.mark.parametrize("scope", ["global", "layerwise"])
@pytest.mark.parametrize("rounds", [1, 4, 9])
def test_at_imps_overall_density_the_matched_rounds_are_imps(scope, rounds):
    rates = {"fc1": 0.5, "output": 0.0}
    sizes = {n: int(np.prod(s)) for n, s in SHAPES.items()}
    imp = _imp(_weights(), _ones(), rounds, 0.2, scope, rates)
    n = masks.matched_rounds(sizes, masks.density(imp), 0.2, scope, rates)
    assert n == rounds
    survivors = masks.imp_survivors(sizes, 0.2, n, scope, rates)
    assert survivors == {(name,): int(imp[name].sum()) for name in SHAPES}
    assert survivors[("output",)] == sizes["output"]  # rate 0: dense


def test_between_imp_rounds_each_layer_is_between_its_imp_rounds():
    sizes = {n: int(np.prod(s)) for n, s in SHAPES.items()}
    rates = {"fc1": 0.5, "fc2": 1.0, "output": 0.25}
    n = masks.matched_rounds(sizes, 0.5, 0.2, "layerwise", rates)
    assert 5 < n < 6
    at_n = masks.imp_survivors(sizes, 0.2, n, "layerwise", rates)
    assert sum(at_n.values()) == pytest.approx(0.5 * 940, abs=1)
    before = masks.imp_survivors(sizes, 0.2, 5, "layerwise", rates)
    after = masks.imp_survivors(sizes, 0.2, 6, "layerwise", rates)
    for g in at_n:
        assert after[g] <= at_n[g] <= before[g], g
        # The same IMP "time" for every layer: (1 - rate * p)^n of its size.
        rate = rates[g[0]]
        assert at_n[g] == pytest.approx(sizes[g[0]] * (1 - 0.2 * rate) ** n, abs=3), g


def test_global_one_shot_shares_one_threshold_over_the_pool_at_imps_pool_density():
    rates = {"output": 0.5}
    w = _weights(scales={"fc1": 0.01})
    imp = _imp(w, _ones(), 5, 0.2, "global", rates)
    oneshot = masks.prune_to_density(w, _ones(), masks.density(imp), 0.2, "global", rates)
    pool = ("fc1", "fc2")
    assert sum(oneshot[n].sum() for n in pool) == sum(imp[n].sum() for n in pool)
    assert oneshot["output"].sum() == imp["output"].sum()
    survivors = np.concatenate([np.abs(w[n][oneshot[n] == 1]) for n in pool])
    pruned = np.concatenate([np.abs(w[n][oneshot[n] == 0]) for n in pool])
    assert survivors.min() >= pruned.max()


def test_with_every_rate_1_one_shot_prunes_every_layer_to_the_density():
    w = _weights()
    new = masks.prune_to_density(w, _ones(), 0.3, 0.2, "layerwise")
    for n, shape in SHAPES.items():
        assert new[n].sum() == pytest.approx(0.3 * np.prod(shape), abs=1), n


def test_a_density_below_what_the_dense_layers_keep_is_refused():
    sizes = {n: int(np.prod(s)) for n, s in SHAPES.items()}
    with pytest.raises(ValueError, match="cannot be reached.*rate 0"):
        masks.matched_rounds(sizes, 0.01, 0.2, "global", {"output": 0.0})  # output: 40/940
    with pytest.raises(ValueError, match=r"in \(0, 1\]"):
        masks.matched_rounds(sizes, 0.0, 0.2)
    assert masks.matched_rounds(sizes, 1.0, 0.2) == 0


def test_prune_to_rounds_from_a_pruned_mask_keeps_it_a_subset():
    rates = {"fc1": 0.5}
    w = _weights()
    first = masks.prune_to_rounds(w, _ones(), 2.5, 0.2, "layerwise", rates)
    grown = {n: np.where(first[n] == 0, 1e6, w[n]).astype(np.float32) for n in SHAPES}
    second = masks.prune_to_rounds(grown, first, 5.0, 0.2, "layerwise", rates)
    masks.check_subset(second, first)
    sizes = {n: int(np.prod(s)) for n, s in SHAPES.items()}
    expected = masks.imp_survivors(sizes, 0.2, 5.0, "layerwise", rates)
    assert {(n,): int(second[n].sum()) for n in SHAPES} == expected
