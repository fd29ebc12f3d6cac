"""Contracts of preemption under multi-worker training: two `lth_tf.imp` processes on 127.0.0.1.

A signal reaches one worker only (a preempted VM); the workers agree to save
at the same step and both stop; rerun, they resume from that step and end as
an uninterrupted run. The agreement itself (lth_tf.checkpointing.WorkerAgreement)
is also checked on its own, with fake workers.
"""

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time
import types

import conftest
import numpy as np
import pytest

from lth_tf import checkpointing, files, paths, rounds, rundir
from lth_tf.callbacks import Interrupted
from lth_tf.keras import tf
from lth_tf.rundir import CorruptRunError

ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONUNBUFFERED": "1"}
# Round 0 is long enough (4 evaluation periods) to be interrupted mid-way; round 1's
# masks follow from round 0's final weights, so they check the resumed training.
RUN = {
    **conftest.TINY,
    "training_steps": "120it",
    "eval_every": "30it",
    "rewind_step": "30it",
    "rounds": 1,
    "output_rate": 1.0,
}


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# A worker that SIGKILLs itself when it is about to write the file at argv[1] (a round's
# summary.json), then runs lth_tf.imp with the rest of its argv: killed between the
# workers' writes of that round's summary.json.
KILLED_AT = """
import os, runpy, signal, sys
from lth_tf import files
target, write_json = sys.argv.pop(1), files.write_json
def write_json_or_die(path, obj):
    if str(path) == target:
        os.kill(os.getpid(), signal.SIGKILL)
    write_json(path, obj)
files.write_json = write_json_or_die
sys.argv[0] = "lth_tf.imp"
runpy.run_module("lth_tf.imp", run_name="__main__")
"""


def _start_workers(root, name, killed_at=None):
    """Starts the two workers; killed_at: {worker index: the file at whose write it dies}."""
    cluster = {"worker": [f"127.0.0.1:{_free_port()}" for _ in range(2)]}
    argv = [f"--{k}={v}" for k, v in RUN.items()] + [
        "--arch=lenet_300_100",
        "--strategy=multi_worker",
        "--deterministic",
        f"--root_dir={root}",
        f"--run_name={name}",
        "--checkpoint_seconds=0",
    ]
    procs = []
    for index in (0, 1):
        tf_config = {"cluster": cluster, "task": {"type": "worker", "index": index}}
        command = [sys.executable, "-m", "lth_tf.imp"]
        if killed_at and index in killed_at:
            command = [sys.executable, "-c", KILLED_AT, killed_at[index]]
        procs.append(
            subprocess.Popen(
                [*command, *argv],
                env={**ENV, "TF_CONFIG": json.dumps(tf_config)},
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    return procs


def _finish(procs):
    outputs = [p.communicate(timeout=600) for p in procs]
    return [p.returncode for p in procs], outputs


def _dirs(root, name):
    return root / name, root / f"{name}.worker_1"  # the chief's, worker 1's scratch copy


def _results(run_dir):
    out = {}
    for r in (0, 1):
        rdir = paths.round_dir(str(run_dir), r)
        out[r] = (files.read_npz(paths.masks_file(rdir)), files.read_json(paths.summary_file(rdir)))
    return out


def _metrics(run_dir, r):
    """The round's metrics lines, without wall times."""
    lines = files.read_jsonl(paths.metrics_file(paths.round_dir(str(run_dir), r)))
    return [{k: v for k, v in line.items() if k != "wall_seconds"} for line in lines]


def _assert_as_uninterrupted(result, expected_result, where):
    """A round's (masks, summary) equal the uninterrupted run's: masks exactly, accuracies
    to float rounding."""
    (masks, summary), (expected_masks, expected) = result, expected_result
    assert set(masks) == set(expected_masks)
    for name in masks:
        np.testing.assert_array_equal(masks[name], expected_masks[name])
    for key in ("test_accuracy", "best_validation_accuracy", "train_accuracy"):
        assert summary[key] == pytest.approx(expected[key], abs=1e-6), (where, key)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    root = tmp_path_factory.mktemp("uninterrupted")
    codes, outputs = _finish(_start_workers(root, "run"))
    assert codes == [0, 0], [err[-3000:] for _, err in outputs]
    return {
        **_results(root / "run"),
        "metrics": [_metrics(root / "run", r) for r in (0, 1)],
        "finals": [_final(root / "run", r) for r in (0, 1)],
    }


def _final(run_dir, r):
    return files.read_npz(paths.checkpoint_file(paths.round_dir(str(run_dir), r), "final"))


def test_sigterm_to_one_worker_saves_both_at_one_step_and_the_rerun_ends_as_uninterrupted(
    tmp_path, uninterrupted
):
    chief_dir, worker_dir = _dirs(tmp_path, "run")
    procs = _start_workers(tmp_path, "run")
    # Once the chief logged its first evaluation period, round 0 is well under way.
    metrics = paths.metrics_file(paths.round_dir(str(chief_dir), 0))
    deadline = time.time() + 300
    while time.time() < deadline and not (os.path.exists(metrics) and os.path.getsize(metrics)):
        time.sleep(0.05)
    procs[1].send_signal(signal.SIGTERM)  # the non-chief only: the chief must learn of it
    codes, outputs = _finish(procs)
    assert codes == [143, 143], [err[-3000:] for _, err in outputs]
    assert "another worker's stop request" in outputs[0][1]
    assert "Stopped by SIGTERM" in outputs[1][1]
    steps = []
    for d in (chief_dir, worker_dir):
        rdir = paths.round_dir(str(d), 0)
        assert not os.path.exists(paths.summary_file(rdir))
        saved = checkpointing.RoundCheckpointer(None, paths.resume_dir(rdir)).saved()
        steps.append(int(saved[-1].rsplit("-", 1)[1]))
    assert steps[0] == steps[1] and 30 <= steps[0] < 120, steps

    codes, outputs = _finish(_start_workers(tmp_path, "run"))
    assert codes == [0, 0], [err[-3000:] for _, err in outputs]
    assert f"resuming round 0 from its checkpoint at step {steps[0]}" in outputs[0][0]
    resumed = _results(chief_dir)
    for r in (0, 1):
        _assert_as_uninterrupted(resumed[r], uninterrupted[r], r)
        # Every period's line, the one at the stop included, as in the uninterrupted run.
        lines, expected_lines = _metrics(chief_dir, r), uninterrupted["metrics"][r]
        assert [line["step"] for line in lines] == [line["step"] for line in expected_lines]
        for line, expected_line in zip(lines, expected_lines, strict=True):
            assert line == pytest.approx(expected_line, abs=1e-6), (r, line["step"])
    for r in (0, 1):  # worker 1 computed the same masks
        worker_masks = files.read_npz(paths.masks_file(paths.round_dir(str(worker_dir), r)))
        for name in worker_masks:
            np.testing.assert_array_equal(worker_masks[name], resumed[r][0][name])


def test_the_chief_killed_between_the_workers_summary_writes_completes_the_round_and_all_agree(
    tmp_path, uninterrupted
):
    # The chief (the results' owner) dies at round 0's summary.json, after the peer's
    # final.npz: the peer writes its summary.json, then blocks at its next collective.
    dirs = _dirs(tmp_path, "run")
    target, peer_summary = (paths.summary_file(paths.round_dir(str(d), 0)) for d in dirs)
    procs = _start_workers(tmp_path, "run", killed_at={0: target})
    assert procs[0].wait(timeout=300) == -signal.SIGKILL, procs[0].communicate()[1][-3000:]
    deadline = time.time() + 60
    while time.time() < deadline and not os.path.exists(peer_summary):
        time.sleep(0.05)
    procs[1].kill()  # as a scheduler restarts the whole job
    _finish(procs)
    assert os.path.exists(peer_summary) and not os.path.exists(target)
    assert os.path.exists(paths.checkpoint_file(paths.round_dir(str(dirs[0]), 0), "final"))

    codes, outputs = _finish(_start_workers(tmp_path, "run"))
    assert codes == [0, 0], [err[-3000:] for _, err in outputs]
    completing = "round 0 was finished on worker 1 only: completing it from final.npz"
    assert completing in outputs[0][0]
    for d in dirs:  # each worker's copy: as the uninterrupted run, and no leftover checkpoint
        results = _results(d)
        for r in (0, 1):
            _assert_as_uninterrupted(results[r], uninterrupted[r], (d, r))
            final, expected_final = _final(d, r), uninterrupted["finals"][r]
            assert set(final) == set(expected_final)
            for name in final:
                np.testing.assert_allclose(final[name], expected_final[name], atol=1e-6)
            assert not os.path.exists(paths.resume_dir(paths.round_dir(str(d), r)))


# ---- the agreement, with fake workers -------------------------------------------------------


class FakeAgreement:
    """Two workers: this one, and a peer whose values the test sets."""

    def __init__(self, peer):
        self.peer = peer  # f(value) -> the peer's value for this call
        self.calls = 0

    def gather(self, value):
        self.calls += 1
        return [value, self.peer(value)]

    def any(self, flag):
        return max(self.gather(int(flag))) > 0

    def by_worker(self, value):
        return dict(zip(("worker 0", "worker 1"), self.gather(value), strict=True))


def test_a_peers_stop_request_saves_and_stops_this_worker_at_the_same_step():
    # The workers agree at step 1, then every `agree_every` steps: 11, 21, ...
    saved = []
    agreement = FakeAgreement(lambda value: int(agreement.calls >= 2))  # the peer: from step 11
    policy = checkpointing.CheckpointPolicy(
        saved.append,
        total=100,
        seconds=0.0,
        by_clock=False,
        stop_requested=lambda: None,
        agree=agreement.any,
        agree_every=10,
    )
    policy.start_fit(0, 20)
    policy.on_train_begin()
    policy.on_epoch_begin(0)
    with pytest.raises(Interrupted, match="another worker's stop request.*at step 11"):
        for batch in range(20):
            policy.on_train_batch_end(batch, {"loss": 1.0})
    assert saved == [11] and agreement.calls == 2


def test_without_agreement_a_stop_request_is_read_at_every_batch_end():
    saved = []
    signal_name = {"value": None}
    policy = checkpointing.CheckpointPolicy(
        saved.append, total=100, seconds=0.0, stop_requested=lambda: signal_name["value"]
    )
    policy.start_fit(0, 20)
    policy.on_train_begin()
    policy.on_epoch_begin(0)
    with pytest.raises(Interrupted, match="SIGTERM.*at step 3"):
        for batch in range(20):
            if batch == 2:
                signal_name["value"] = "SIGTERM"
            policy.on_train_batch_end(batch, {"loss": 1.0})
    assert saved == [3]


def _checkpointer(tmp_path, steps, peer_latest, peer_has=True):
    """A checkpointer whose directory lists checkpoints at `steps` (no files needed)."""
    directory = tmp_path / "ckpt"
    directory.mkdir()
    if steps:
        names = [f'"{directory}/ckpt-{s}"' for s in steps]
        (directory / "checkpoint").write_text(
            f"model_checkpoint_path: {names[-1]}\n"
            + "".join(f"all_model_checkpoint_paths: {n}\n" for n in names)
        )
    answers = iter([peer_latest, None])

    def peer(value):
        answer = next(answers)
        return answer if answer is not None else (value if peer_has else -1)

    return checkpointing.RoundCheckpointer(
        None, str(directory), agreement=FakeAgreement(peer), label="round 0"
    )


def test_workers_resume_from_the_newest_step_they_all_have(tmp_path):
    # Killed between the two workers' writes of step 300: this one has it, the peer not.
    c = _checkpointer(tmp_path, [200, 300], peer_latest=200)
    assert c._agreed().endswith("ckpt-200")


def test_workers_all_start_over_when_one_has_no_checkpoint(tmp_path):
    c = _checkpointer(tmp_path, [100], peer_latest=-1)
    assert c._agreed() is None
    assert not (tmp_path / "ckpt").exists()  # no newer state left to resume from later


def test_workers_that_share_no_step_are_refused_with_what_to_delete(tmp_path):
    c = _checkpointer(tmp_path, [500], peer_latest=200, peer_has=False)
    with pytest.raises(checkpointing.CorruptCheckpointError, match="share no step.*Delete"):
        c._agreed()


def test_workers_are_named_alike_on_every_worker_with_this_ones_position():
    cluster = tf.train.ClusterSpec({"chief": ["a:1"], "worker": ["b:1", "c:1"]})
    for task_type, task_id, position in (("chief", 0, 0), ("worker", 1, 2)):
        resolver = tf.distribute.cluster_resolver.SimpleClusterResolver(
            cluster, task_type=task_type, task_id=task_id
        )
        strategy = types.SimpleNamespace(cluster_resolver=resolver)
        assert checkpointing._workers(strategy) == (["chief", "worker 0", "worker 1"], position)


def _round_files(rdir, summary, final):
    os.makedirs(rdir, exist_ok=True)
    if summary:
        files.write_json(paths.summary_file(rdir), {"round": 0})
    if final:
        files.write_npz(paths.checkpoint_file(rdir, "final"), {"w": np.ones(2)})


# This worker's files; the peer's state: 3 finished, 1 final.npz only, 0 neither.
@pytest.mark.parametrize(
    "summary, final, peer, expected",
    [
        (False, True, 3, ["worker 1"]),
        (True, True, 1, ["worker 0"]),
        (True, True, 3, None),
        (False, False, 0, None),
        (False, True, 1, None),
    ],
)
def test_a_round_finished_on_some_workers_only_names_them(tmp_path, summary, final, peer, expected):
    rdir = str(tmp_path / "round_00")
    _round_files(rdir, summary, final)
    agreement = FakeAgreement(lambda value: peer)
    assert rounds.finished_only_on(agreement, rdir, "round 0") == expected
    assert agreement.calls == 1  # one collective, on every worker alike


def test_a_round_finished_on_a_peer_but_without_final_npz_here_is_refused_with_what_to_delete(
    tmp_path,
):
    rdir = str(tmp_path / "round_00")
    _round_files(rdir, summary=False, final=False)
    with pytest.raises(
        CorruptRunError, match="finished on worker 1 but worker 0 has no final.npz.*Delete"
    ):
        rounds.finished_only_on(FakeAgreement(lambda value: 3), rdir, "round 0")


def test_a_round_finished_on_a_peer_only_is_completed_from_final_npz_without_training(
    tiny_config, tmp_path
):
    config = tiny_config()
    rundir.open_run_dir(config, str(tmp_path / "run"))
    lines = []
    e = rounds.Experiment(config, str(tmp_path / "run"), checkpoint_seconds=0, log=lines.append)
    e.agreement = FakeAgreement(lambda value: value)  # a peer in lock step
    trained = e.dense_round()
    rdir = paths.round_dir(e.run_dir, 0)
    # Killed after the workers' final.npz, before this worker's summary.json; the peer wrote its.
    os.remove(paths.summary_file(rdir))
    e.agreement = FakeAgreement(lambda value: 3)
    completed = e.dense_round()
    assert e.trained == [(rounds.IMP, 0)]  # trained once, not again
    assert "   round 0 was finished on worker 1 only: completing it from final.npz" in lines
    assert files.read_json(paths.summary_file(rdir)) == completed
    for key, value in trained.items():
        if key != "wall_seconds":  # up to the last period's end: without the final test pass
            assert completed[key] == pytest.approx(value, abs=1e-6), key
    # The finished worker's summary is kept as it is, while the peer completes the round.
    summary_file = pathlib.Path(paths.summary_file(rdir))
    before = summary_file.read_bytes()
    e.agreement = FakeAgreement(lambda value: 1)
    assert e.dense_round() == completed
    assert summary_file.read_bytes() == before
