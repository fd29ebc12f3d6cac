"""Contracts of lth_tf.criteria: pruning criteria, by hand and through a run.

The default criterion (magnitude) gives the masks the code gave before criteria
existed, bit for bit, and leaves every run's name as it was; magnitude_increase
and random match a hand computation; a user's `module:function` runs through
the command line.
"""

import glob
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from lth_tf import criteria, files, masks, paths, rundir
from lth_tf.config import RunConfig, make_config

SHAPES = {"fc1": (20, 30), "fc2": (30, 10), "output": (10, 4)}


def _weights(seed, ties=False):
    rng = np.random.default_rng(seed)
    if ties:  # few distinct magnitudes: many ties at every threshold
        return {n: rng.integers(-3, 4, s).astype(np.float32) for n, s in SHAPES.items()}
    return {n: rng.standard_normal(s).astype(np.float32) for n, s in SHAPES.items()}


def _ones():
    return {n: np.ones(s, np.float32) for n, s in SHAPES.items()}


# ---- the pruning code as it was before criteria existed (commit 4c9aadd), verbatim ---------


def _old_drop_smallest(weights, masks_, fraction, k=None):
    alive = [m > 0 for m in masks_]
    magnitudes = [np.abs(w) for w in weights]
    pool = np.concatenate([a[m] for a, m in zip(magnitudes, alive, strict=True)])
    if k is None:
        k = int(np.round(fraction * pool.size))
    if k == 0:
        return [m.astype(np.float32) for m in alive]
    threshold = np.partition(pool, k - 1)[k - 1]
    ties_to_drop = k - int(np.count_nonzero(pool < threshold))
    out = []
    for a, m in zip(magnitudes, alive, strict=True):
        keep = m & (a > threshold)
        ties = np.flatnonzero(m & (a == threshold))
        n_drop = min(ties_to_drop, ties.size)
        keep.ravel()[ties[n_drop:]] = True
        ties_to_drop -= n_drop
        out.append(keep.astype(np.float32))
    return out


def _old_prune(weights, masks_, fraction, scope="global", rates=None):
    rates = rates or {}
    new, pool = {}, []
    for name, mask in masks_.items():
        rate = rates.get(name, 1.0)
        if rate == 0:
            new[name] = mask.astype(np.float32)
        elif rate == 1 and scope == "global":
            pool.append(name)
        else:
            (new[name],) = _old_drop_smallest([weights[name]], [mask], min(rate * fraction, 1.0))
    if pool:
        pooled = _old_drop_smallest([weights[n] for n in pool], [masks_[n] for n in pool], fraction)
        new.update(zip(pool, pooled, strict=True))
    return {name: new[name] for name in masks_}


def _old_prune_to_rounds(weights, masks_, rounds, fraction, scope="global", rates=None):
    rates = rates or {}
    sizes = {n: m.size for n, m in masks_.items()}
    new = {}
    for group, keep in masks.imp_survivors(sizes, fraction, rounds, scope, rates).items():
        current = [masks_[n] for n in group]
        alive = sum(int(np.count_nonzero(m)) for m in current)
        kept = _old_drop_smallest([weights[n] for n in group], current, 0.0, max(alive - keep, 0))
        new.update(zip(group, kept, strict=True))
    return {name: new[name] for name in masks_}


def _same(a, b):
    return set(a) == set(b) and all(
        a[n].dtype == b[n].dtype and np.array_equal(a[n], b[n]) for n in a
    )


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize(
    "scope,rates",
    [("global", None), ("layerwise", None), ("global", {"output": 0.5, "fc1": 0.0})],
)
def test_the_default_criterion_gives_the_masks_of_before_bit_for_bit(ties, scope, rates):
    m_old = m_new = _ones()
    for r in range(6):
        w = _weights(r, ties)
        m_old = _old_prune(w, m_old, 0.2, scope, rates)
        scores = criteria.scores("magnitude", w, None, m_new, seed=r)
        m_new = masks.prune_scores(scores, m_new, 0.2, scope, rates)
        assert _same(m_new, m_old)
        assert _same(
            masks.prune(w, m_new, 0.2, scope, rates), _old_prune(w, m_new, 0.2, scope, rates)
        )
    w = _weights(9, ties)
    assert _same(
        masks.prune_scores_to_rounds(
            criteria.magnitude(w, None, _ones(), 0), _ones(), 3.5, 0.2, scope, rates
        ),
        _old_prune_to_rounds(w, _ones(), 3.5, 0.2, scope, rates),
    )


def test_magnitude_increase_matches_a_hand_computation():
    # |W_f| - |W_k|: 0.1, 0.5, -0.7, 0.0, 2.0, -0.05 (one pruned already).
    final = {"a": np.array([[0.5, -1.0, 0.1]]), "b": np.array([[-0.2, 3.0, 0.05]])}
    rewind = {"a": np.array([[0.4, 0.5, -0.8]]), "b": np.array([[0.2, 1.0, 0.1]])}
    current = {"a": np.ones((1, 3), np.float32), "b": np.array([[1, 1, 0]], np.float32)}
    scores = criteria.scores("magnitude_increase", final, rewind, current, seed=0)
    np.testing.assert_allclose(scores["a"], [[0.1, 0.5, -0.7]])
    np.testing.assert_allclose(scores["b"], [[0.0, 2.0, -0.05]])
    # Global: round(0.4 * 5 survivors) = 2 go: the lowest increases, -0.7 and 0.0.
    new = masks.prune_scores(scores, current, 0.4, "global")
    np.testing.assert_array_equal(new["a"], [[1, 1, 0]])
    np.testing.assert_array_equal(new["b"], [[0, 1, 0]])
    # Here magnitude agrees (its two smallest |W_f|, 0.1 and 0.2, are the same weights).
    by_magnitude = masks.prune(final, current, 0.4, "global")
    np.testing.assert_array_equal(by_magnitude["a"], [[1, 1, 0]])
    np.testing.assert_array_equal(by_magnitude["b"], [[0, 1, 0]])
    # Layer-wise at 1/3: one of each layer's survivors, its lowest increase.
    new = masks.prune_scores(scores, current, 1 / 3, "layerwise")
    np.testing.assert_array_equal(new["a"], [[1, 1, 0]])
    np.testing.assert_array_equal(new["b"], [[0, 1, 0]])
    # Where the two criteria disagree: a weight that shrank is pruned though it is large.
    final = {"a": np.array([[0.9, 0.3]])}
    rewind = {"a": np.array([[1.5, 0.1]])}
    one = {"a": np.ones((1, 2), np.float32)}
    assert masks.prune_scores(criteria.magnitude_increase(final, rewind, one, 0), one, 0.5)[
        "a"
    ].tolist() == [[0, 1]]
    assert masks.prune(final, one, 0.5)["a"].tolist() == [[1, 0]]


def test_random_criterion_matches_a_hand_computation_and_follows_its_seed():
    current = _ones()
    current["fc2"][0, :5] = 0  # already pruned: never chosen again
    scores = criteria.scores("random", _weights(0), None, current, seed=7)
    rng = np.random.default_rng(7)
    by_hand = {n: rng.random(SHAPES[n]) for n in sorted(SHAPES)}
    assert all(np.array_equal(scores[n], by_hand[n]) for n in SHAPES)
    new = masks.prune_scores(scores, current, 0.2, "layerwise")
    for n in SHAPES:
        alive = np.flatnonzero(current[n].ravel())
        k = int(np.round(0.2 * alive.size))
        dropped = alive[np.argsort(by_hand[n].ravel()[alive], kind="stable")[:k]]
        expected = current[n].copy().ravel()
        expected[dropped] = 0
        np.testing.assert_array_equal(new[n].ravel(), expected)
    other = masks.prune_scores(criteria.random(None, None, current, 8), current, 0.2, "layerwise")
    assert not _same(new, other)
    # Independent of the weights: random pruning.
    again = criteria.scores("random", _weights(5), None, current, seed=7)
    assert _same(masks.prune_scores(again, current, 0.2, "layerwise"), new)


def test_the_criterion_is_part_of_a_runs_identity_only_when_not_the_default():
    # The hashes of these configs before the field existed (commit 4c9aadd).
    assert make_config("lenet_300_100").hash8() == "3dbf93b6"
    assert make_config("conv2", rounds=3, prune_scope="layerwise").hash8() == "43d6d8cb"
    assert make_config("resnet20").hash8() == "3d184bf8"
    c = make_config("lenet_300_100")
    assert c.prune_criterion == "magnitude" and "prune_criterion" not in c.identity()
    for other in ("magnitude_increase", "random", "my_pkg.scores:score"):
        changed = make_config("lenet_300_100", prune_criterion=other)
        assert changed.identity()["prune_criterion"] == other
        assert changed.hash8() != c.hash8()
        assert RunConfig.from_json(changed.to_json()) == changed
    # A config.json written before the field existed reads as magnitude.
    import json

    old = json.loads(c.to_json())
    del old["prune_criterion"]
    assert RunConfig.from_json(json.dumps(old)).prune_criterion == "magnitude"


@pytest.mark.parametrize("bad", ["magnitudes", "my_pkg.scores", "a b:c", ":score", "m:"])
def test_a_criterion_that_is_neither_built_in_nor_module_function_is_refused(bad):
    with pytest.raises(ValueError, match="prune_criterion"):
        make_config("lenet_300_100", prune_criterion=bad)


def test_resolve_and_scores_explain_what_is_wrong():
    with pytest.raises(ValueError, match="cannot import module .no_such_pkg_xyz."):
        criteria.resolve("no_such_pkg_xyz.mod:score")
    with pytest.raises(ValueError, match="has no function .nothing."):
        criteria.resolve("numpy:nothing")
    one = {"a": np.ones((2, 2), np.float32)}
    with pytest.raises(ValueError, match="exactly the layers"):
        criteria.scores(lambda f, r, m, s: {}, one, one, one, 0)
    with pytest.raises(ValueError, match="shape"):
        criteria.scores(lambda f, r, m, s: {"a": np.zeros(4)}, one, one, one, 0)
    with pytest.raises(ValueError, match="NaN"):
        criteria.scores(lambda f, r, m, s: {"a": np.full((2, 2), np.nan)}, one, one, one, 0)


# ---- through a run ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fake_round_0(tmp_path_factory, tiny_config):
    """An Experiment per criterion over a hand-written finished round 0 (nothing trained)."""
    from lth_tf import rounds

    run_dir = str(tmp_path_factory.mktemp("criteria_run"))
    base = rounds.Experiment(tiny_config(rounds=1), run_dir, log=lambda *a: None)
    rng = np.random.default_rng(0)
    w_k = {
        k: rng.standard_normal(v.shape).astype(np.float32) for k, v in base.initial_weights.items()
    }
    final = {k: (v + rng.standard_normal(v.shape)).astype(np.float32) for k, v in w_k.items()}
    r0 = paths.round_dir(run_dir, 0)
    files.write_npz(
        paths.masks_file(r0), masks.ones_like({n: w_k[f"{n}/kernel"] for n in base.layers})
    )
    files.write_npz(paths.checkpoint_file(r0, "rewind"), w_k)
    files.write_npz(paths.checkpoint_file(r0, "final"), final)

    def experiment(criterion):
        if criterion == "magnitude":
            return base
        e = rounds.Experiment(
            tiny_config(rounds=1, prune_criterion=criterion), run_dir, log=lambda *a: None
        )
        return e

    return experiment, r0, w_k, final, base.layers, base.rates


def test_a_run_prunes_with_its_criterion(fake_round_0):
    experiment, r0, w_k, final, layers, rates = fake_round_0
    kernels = {n: final[f"{n}/kernel"] for n in layers}
    ones = masks.ones_like(kernels)
    # Default: the masks of before, bit for bit.
    assert _same(
        experiment("magnitude").imp_masks(1), _old_prune(kernels, ones, 0.2, "global", rates)
    )
    # magnitude_increase: |W_f| - |W_k| of the run's W_k, the same thresholding.
    e = experiment("magnitude_increase")
    increase = {
        n: np.abs(kernels[n]).astype(np.float64) - np.abs(w_k[f"{n}/kernel"]) for n in layers
    }
    expected = masks.prune_scores(increase, ones, 0.2, "global", rates)
    assert _same(e.imp_masks(1), expected)
    assert not _same(expected, _old_prune(kernels, ones, 0.2, "global", rates))
    # random: seeded from the run's seed and the round; the same call twice, the same masks.
    e = experiment("random")
    first = e.masks_after(r0, r=1)
    assert _same(first, e.masks_after(r0, r=1))
    assert not _same(first, e.masks_after(r0, r=2))
    assert masks.density(first) == masks.density(expected)


USER_CRITERION = '''
import numpy as np


def smallest_survive(final, rewind, masks, seed):
    """The opposite of magnitude pruning: the largest |W_f| go first."""
    return {name: -np.abs(final[name]) for name in masks}
'''


def test_a_users_criterion_from_a_module_runs_through_the_command_line(tmp_path):
    (tmp_path / "my_criteria").mkdir()
    (tmp_path / "my_criteria" / "__init__.py").write_text("")
    (tmp_path / "my_criteria" / "scores.py").write_text(textwrap.dedent(USER_CRITERION))
    root = tmp_path / "runs"
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), env.get("PYTHONPATH", "")])
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "lth_tf.imp",
            "--arch=lenet_300_100",
            "--dataset=synthetic:8x8x1:4",
            "--batch_size=32",
            "--training_steps=20it",
            "--eval_every=10it",
            "--rounds=1",
            "--verbose=0",
            "--prune_criterion=my_criteria.scores:smallest_survive",
            f"--root_dir={root}",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = glob.glob(str(root / "*"))
    config = rundir.load_config(run_dir)
    assert config.prune_criterion == "my_criteria.scores:smallest_survive"
    final = files.read_npz(paths.checkpoint_file(paths.round_dir(run_dir, 0), "final"))
    new = files.read_npz(paths.masks_file(paths.round_dir(run_dir, 1)))
    for name, mask in new.items():
        if mask.all():
            continue  # a layer the recipe keeps dense
        w = np.abs(final[f"{name}/kernel"])
        assert w[mask == 1].max() <= w[mask == 0].min()  # the small ones survived
