"""Contracts of the papers' protocol in `Experiment`: which batches each round sees, from
which weights and optimizer state; and runs written before data_order, warmup_form and
one spelling of durations existed."""

import json

import numpy as np
import pytest
from absl import flags

from lth_tf import branching, files, flagdefs, imp, masks, paths, rounds, rundir
from lth_tf import config as config_lib
from lth_tf import data as data_lib

FLAGS = flags.FLAGS

# Plain SGD (no momentum: a fresh optimizer has no state but its step count) and a
# prune fraction that removes no weight: round(1e-6 * 49,200) = 0. The learning
# rate drops at step 30: a round rewound to k must continue the schedule from k.
ORACLE = dict(
    optimizer="sgd",
    lr=0.05,
    momentum=0.0,
    weight_decay=0.0,
    lr_drops=("30it",),
    lr_gamma=0.5,
    prune_fraction=1e-6,
    rounds=1,
    controls=("random_reinit",),
)


def _quiet(*args):
    pass


class RecordingData:
    """The tiny dataset, recording the (data seed, first step) of every training pipeline."""

    def __init__(self, inner):
        self.inner = inner
        self.served = []

    def train(self, batch_size, data_seed, start_step=0, input_context=None):
        self.served.append((data_seed, start_step))
        return self.inner.train(batch_size, data_seed, start_step, input_context)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def _run(config, run_dir):
    data = RecordingData(data_lib.load(config.dataset, arch_dataset="mnist"))
    rundir.open_run_dir(config, str(run_dir))
    e = rounds.Experiment(config, str(run_dir), checkpoint_seconds=0, log=_quiet, data=data)
    e.run()
    return e, data


def _final(run_dir, r, branch=None):
    return files.read_npz(paths.checkpoint_file(paths.round_dir(str(run_dir), r, branch), "final"))


def _first_batch(data, config, seed, step):
    x, _ = next(iter(data.inner.train(config.batch_size, seed, start_step=step)))
    return x.numpy()


@pytest.fixture(scope="module")
def oracle_runs(tiny_config, tmp_path_factory):
    """{(data_order, k): (config, run_dir, experiment, data)} of the no-pruning oracle."""
    out = {}
    for order, k in (("replay", "0"), ("replay", "20it"), ("per_round", "20it")):
        config = tiny_config(**ORACLE, data_order=order, rewind_step=k)
        run_dir = tmp_path_factory.mktemp("oracle") / "run"
        e, data = _run(config, run_dir)
        out[order, k] = (config, run_dir, e, data)
    return out


# ---- a rewound round sees the dense run's batches from k with a fresh optimizer ------------


@pytest.mark.parametrize("k", ["0", "20it"])
def test_replay_with_nothing_pruned_retrains_round_0_bit_for_bit(oracle_runs, k):
    # Round 1 starts from W_k at step k with a fresh SGD and sees round 0's batches
    # from k: with nothing pruned it must redo round 0's steps k..T exactly.
    _, run_dir, e, _ = oracle_runs["replay", k]
    one = files.read_npz(paths.masks_file(paths.round_dir(str(run_dir), 1)))
    assert masks.density(one) == 1.0  # the fraction removed no weight
    r0, r1 = _final(run_dir, 0), _final(run_dir, 1)
    assert set(r0) == set(r1)
    for name in r0:
        assert np.array_equal(r0[name], r1[name]), name
    # Not a run that did nothing: training moved the weights away from W_k.
    rewind = e.rewind_weights()  # round 0's rewind.npz, or its start.npz for k = 0
    assert any(not np.array_equal(rewind[n], r0[n]) for n in r0)


def test_per_round_with_nothing_pruned_retrains_with_its_own_batches(oracle_runs):
    _, run_dir, _, _ = oracle_runs["per_round", "20it"]
    _, replay_dir, _, _ = oracle_runs["replay", "20it"]
    r0, r1 = _final(run_dir, 0), _final(run_dir, 1)
    assert any(not np.array_equal(r0[n], r1[n]) for n in r0)
    # Round 0 (and so W_k) is the same under both orders.
    replay_r0 = _final(replay_dir, 0)
    assert all(np.array_equal(r0[n], replay_r0[n]) for n in r0)
    for which in ("rewind", "start"):
        a = files.read_npz(paths.checkpoint_file(paths.round_dir(str(run_dir), 0), which))
        b = files.read_npz(paths.checkpoint_file(paths.round_dir(str(replay_dir), 0), which))
        assert all(np.array_equal(a[n], b[n]) for n in a), which


def test_replay_rounds_and_controls_see_round_0s_batches_from_k(oracle_runs):
    config, _, e, data = oracle_runs["replay", "20it"]
    assert [b for b, _ in e.trained] == ["imp", "imp", "random_reinit"]
    # One pipeline per round: round 0 from step 0, the rewound ones from k = 20.
    assert data.served == [(config.data_seed, 0), (config.data_seed, 20), (config.data_seed, 20)]


def test_per_round_rounds_and_controls_draw_their_own_orders(oracle_runs):
    config, _, e, data = oracle_runs["per_round", "20it"]
    (s0, start0), (s1, start1), (s2, start2) = data.served
    assert (s0, start0, start1, start2) == (config.data_seed, 0, 20, 20)  # round 0: the data seed
    assert len({s0, s1, s2}) == 3  # IMP round 1 and its control: orders of their own
    assert (s1, s2) == (e.round_data_seed(1), e.round_data_seed(1, "random_reinit"))
    # The batches differ: round 0's batch at step 20 is neither round's first batch.
    batches = [_first_batch(data, config, s, 20) for s in (s0, s1, s2)]
    for i in range(3):
        for j in range(i + 1, 3):
            assert not np.array_equal(batches[i], batches[j]), (i, j)


def test_branch_rounds_draw_their_own_order_under_per_round(oracle_runs):
    for order in ("per_round", "replay"):
        config, _, e, _ = oracle_runs[order, "20it"]
        seeds = {e.round_data_seed(1, name) for name in ("imp", "rewind_10it", "lr_rewind_20it")}
        assert len(seeds) == (3 if order == "per_round" else 1)
        assert e.round_data_seed(0) == config.data_seed


# ---- durations: one spelling, one run, one branch -------------------------------------------


def test_one_branch_name_for_both_spellings_of_k(oracle_runs):
    _, _, e, _ = oracle_runs["replay", "20it"]
    # (oneshot resolves k the same way; its name adds the density reached, and this
    # run's prune fraction, which removes no weight, reaches none: tests/test_branches.py)
    for kind in ("rewind", "lr_rewind"):
        names = set()
        for k in ("10", "10it", 10):
            names.add(branching.make_spec(e, kind, rewind_step=k, num_rounds=1).name)
        assert names == {f"{kind}_10it"}


# The run directories the code before one spelling of durations named these runs
# (rewind_step '20' and '20it' of the tiny config, rounds=1): two runs of one schedule.
OLD_NAME_20 = "lenet_300_100_synthetic-8x8x1-4_5371651f"
OLD_NAME_20IT = "lenet_300_100_synthetic-8x8x1-4_9da29004"
# The tiny config with --warmup=10it and rounds=1, as that code named it.
OLD_NAME_WARMUP = "lenet_300_100_synthetic-8x8x1-4_5c16d36a"

TINY_FLAGS = (
    "--arch=lenet_300_100",
    "--dataset=synthetic:8x8x1:4",
    "--batch_size=32",
    "--training_steps=40it",
    "--eval_every=20it",
    "--rounds=1",
    "--verbose=0",
    # lenet_300_100's pruning rule when these runs were named (the 2019 rule came later)
    "--prune_scope=global",
    "--output_rate=0",
)


def _old_config_json(config) -> str:
    """config.json as lth_tf wrote it before data_order and warmup_form existed."""
    d = json.loads(config.to_json())
    for name in ("data_order", "warmup_form"):
        d.pop(name)
    return json.dumps(d, indent=2, sort_keys=True)


def _write_old_run(root, name, config, **raw):
    run_dir = root / name
    run_dir.mkdir(parents=True)
    d = json.loads(_old_config_json(config))
    d.update(raw)  # fields as the old code recorded them (e.g. an unnormalised duration)
    (run_dir / "config.json").write_text(json.dumps(d, indent=2, sort_keys=True))
    return run_dir


def _imp_run_dir(capsys, root, *argv) -> tuple[str, dict]:
    """The run directory and config `python -m lth_tf.imp --print_config` names."""
    flagdefs.define_imp_flags()
    FLAGS.unparse_flags()
    try:
        FLAGS(["imp", *TINY_FLAGS, f"--root_dir={root}", "--print_config", *argv])
        capsys.readouterr()
        assert imp.main(["imp"]) == 0
    finally:
        FLAGS.unparse_flags()
    out = capsys.readouterr().out
    first, rest = out.split("\n", 1)
    return first.removeprefix("Run directory: "), json.loads(rest)


def test_both_spellings_of_a_duration_name_one_run_directory(capsys, tmp_path):
    a, _ = _imp_run_dir(capsys, tmp_path, "--rewind_step=20")
    b, config = _imp_run_dir(capsys, tmp_path, "--rewind_step=20it")
    assert a == b and config["rewind_step"] == "20it"


@pytest.mark.parametrize("spelling", ["20", "20it"])
def test_a_run_named_with_the_other_spelling_is_found_by_either(capsys, tmp_path, spelling):
    old = config_lib.make_config("lenet_300_100", **_tiny(rewind_step="20it", data_order="replay"))
    run_dir = _write_old_run(tmp_path, OLD_NAME_20, old, rewind_step="20")
    found, _ = _imp_run_dir(capsys, tmp_path, f"--rewind_step={spelling}", "--data_order=replay")
    assert found == str(run_dir)
    # And it resumes: the config the flags give is the run's (no difference refused).
    mine = config_lib.make_config(
        "lenet_300_100", **_tiny(rewind_step=spelling, data_order="replay")
    )
    rundir.open_run_dir(mine, str(run_dir))
    assert rundir.load_config(str(run_dir)) == rundir.resumed_config(mine, str(run_dir))


def test_a_run_made_with_300it_resumes_with_300(tiny_config, tmp_path):
    run_dir = tmp_path / "run"
    made = tiny_config(training_steps="300it", eval_every="100it", rewind_step="0")
    rundir.open_run_dir(made, str(run_dir))
    rundir.open_run_dir(
        tiny_config(training_steps="300", eval_every="100", rewind_step="0it"), str(run_dir)
    )
    # Even as a config.json of before recorded it.
    d = json.loads((run_dir / "config.json").read_text())
    d.update(training_steps="300", eval_every="100")
    d.pop("__sha256__", None)  # nor the digests (lth_tf.files), which came later still
    (run_dir / "config.json").write_text(json.dumps(d))
    rundir.open_run_dir(made, str(run_dir))


def test_the_canonical_directory_wins_over_an_old_spelling(capsys, tmp_path):
    old = config_lib.make_config("lenet_300_100", **_tiny(data_order="replay"))
    _write_old_run(tmp_path, OLD_NAME_20, old, rewind_step="20")
    canonical = _write_old_run(tmp_path, OLD_NAME_20IT, old)
    found, _ = _imp_run_dir(capsys, tmp_path, "--rewind_step=20", "--data_order=replay")
    assert found == str(canonical)


def _tiny(**overrides):
    base = dict(
        dataset="synthetic:8x8x1:4",
        batch_size=32,
        training_steps="40it",
        eval_every="20it",
        rewind_step="20it",
        rounds=1,
        verbose=0,
        prune_scope="global",
        output_rate=0.0,
    )
    return {**base, **overrides}


# ---- a run directory written before data_order and warmup_form ------------------------------


def test_an_old_run_directory_opens_resumes_and_reads_as_replay_with_its_warmup(capsys, tmp_path):
    old = config_lib.make_config(
        "lenet_300_100", **_tiny(warmup="10it"), **config_lib.DEFAULT_OMITTED_FIELDS
    )
    run_dir = _write_old_run(tmp_path, OLD_NAME_WARMUP, old)
    written = (run_dir / "config.json").read_text()
    # Read as the code that wrote it computed: replay, (s + 1) / W; the same name.
    read = rundir.load_config(str(run_dir))
    assert (read.data_order, read.warmup_form) == ("replay", "step+1")
    assert paths.run_name(read) == OLD_NAME_WARMUP
    # The command that made it (plus --data_order=replay) finds it and takes its warm-up.
    found, config = _imp_run_dir(
        capsys, tmp_path, "--warmup=10it", "--rewind_step=20it", "--data_order=replay"
    )
    assert found == str(run_dir)
    assert (config["data_order"], config["warmup_form"]) == ("replay", "step+1")
    # The papers' protocol is a new run: another directory.
    new, config = _imp_run_dir(capsys, tmp_path, "--warmup=10it", "--rewind_step=20it")
    assert new != str(run_dir) and config["data_order"] == "per_round"
    assert config["warmup_form"] == "step"
    # It resumes as it was: every round on round 0's order, the old warm-up.
    mine = rundir.resumed_config(
        config_lib.make_config("lenet_300_100", **_tiny(warmup="10it", data_order="replay")),
        str(run_dir),
    )
    assert mine == read
    e, data = _run(mine, run_dir)
    schedule = e.model.optimizer.get_config()["learning_rate"]["config"]["schedule"]
    assert schedule["warmup_form"] == "step+1"
    assert [seed for seed, _ in data.served] == [read.data_seed] * 2
    assert (run_dir / "config.json").read_text() == written  # untouched
    assert files.exists(paths.summary_file(paths.round_dir(str(run_dir), 1)))


def test_a_branch_of_a_replay_run_cannot_ask_for_another_data_order():
    old = config_lib.RunConfig.from_json(
        _old_config_json(config_lib.make_config("lenet_300_100", **_tiny()))
    )
    assert old.data_order == "replay" and "data_order" not in old.identity()
    with pytest.raises(branching.BranchError, match="data_order: run has 'replay'"):
        branching.check_shares_round_0(old, {"data_order": "per_round"})
    branching.check_shares_round_0(old, {"data_order": "replay", "rewind_step": "10"})
    new = config_lib.make_config("lenet_300_100", **_tiny())
    with pytest.raises(branching.BranchError, match="data_order: run has 'per_round'"):
        branching.check_shares_round_0(new, {"data_order": "replay"})
