"""Reliability contracts: kills, signals, damaged files, bad input, full disks.

Every scenario runs the real `python -m lth_tf.imp` (or its main function) on a
tiny LeNet and checks that (a) the message says what is wrong and what to do,
and (b) nothing that existed before is changed.
"""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import conftest
import numpy as np
import pytest
from absl import app, flags
from entry_points import call, snapshot

from lth_tf import files, imp

FLAGS = flags.FLAGS
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONUNBUFFERED": "1"}
TINY = conftest.tiny_flags(
    rounds=2,
    prune_scope=None,
    output_rate=1.0,
    controls="random_prune",
    checkpoint_seconds=0,
) + ["--deterministic"]


def _imp(root, *extra, env=None, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", "lth_tf.imp", *TINY, f"--root_dir={root}", "--run_name=r", *extra],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**ENV, **(env or {})},
    )


def _imp_here(root, *extra):
    """(exit code, stderr) of the same command run in-process (tests/entry_points.py).

    For refusals, whose exit code and message main gives as a process would (a
    traceback fails the test); kills, signals, locks between processes and the runs
    whose results are compared start real processes.
    """
    return call("imp", *TINY, f"--root_dir={root}", "--run_name=r", *extra)


def _results(run_dir) -> dict:
    """Masks, per-layer densities and summaries (minus wall time) of every round and branch."""
    out = {}
    for dirpath, _, names in os.walk(run_dir):
        rel = os.path.relpath(dirpath, run_dir)
        if "masks.npz" in names:
            for k, v in files.read_npz(os.path.join(dirpath, "masks.npz")).items():
                out[f"{rel}/{k}"] = v.tobytes()
            # Every round with masks has its sparsity.json (the report's per-layer rows).
            out[f"{rel}/sparsity"] = json.dumps(
                files.read_json(os.path.join(dirpath, "sparsity.json")), sort_keys=True
            )
        if "summary.json" in names:
            s = files.read_json(os.path.join(dirpath, "summary.json"))
            s.pop("wall_seconds")
            out[f"{rel}/summary"] = json.dumps(s, sort_keys=True)
    return out


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """An uninterrupted tiny run: the reference every interrupted run must equal."""
    root = tmp_path_factory.mktemp("reference")
    result = _imp(root)
    assert result.returncode == 0, result.stderr[-3000:]
    return root


def test_killed_at_every_kind_of_write_and_rerun_ends_as_an_uninterrupted_run(finished, tmp_path):
    # Each run is killed as it is about to write one file (LTH_TF_FAILPOINT), then
    # the next picks up where it stopped: masks, rewind point, final weights, summary.
    moments = [
        "round_00/checkpoints/rewind.npz",
        "round_01/masks.npz",
        "round_01/sparsity.json",  # killed between masks.npz and sparsity.json
        "round_01/checkpoints/final.npz",
        "round_02/summary.json",
        "branches/random_prune/round_02/masks.npz",
    ]
    planted = {}
    for moment in moments:
        killed = _imp(tmp_path, env={"LTH_TF_FAILPOINT": f"kill:{moment}"})
        assert killed.returncode == 137, (moment, killed.stderr[-2000:])
        assert not os.path.exists(tmp_path / "r" / moment)
        # A kill in the middle of a write leaves the temporary file half written.
        tmp = tmp_path / "r" / f"{moment}.tmp-0badf00d"
        tmp.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_bytes(b"half a file")
        planted[os.path.relpath(tmp, tmp_path)] = hashlib.sha256(b"half a file").hexdigest()
    final = _imp(tmp_path)
    assert final.returncode == 0, final.stderr[-3000:]
    assert _results(tmp_path / "r") == _results(finished / "r")
    # The half-written temporary files were never read, nor touched, and no others are left.
    leftovers = {p: h for p, h in snapshot(tmp_path).items() if ".tmp-" in p}
    assert leftovers == planted


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signals_stop_after_a_checkpoint_and_the_rerun_resumes(tmp_path, sig, code):
    # Real signals to a real process. That a resumed run ends with the files of an
    # uninterrupted one, at any step, is tests/test_checkpointing.py's (in-process) test.
    args = ["--training_steps=4000it", "--eval_every=2000it", "--rounds=0"]
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "lth_tf.imp",
            *TINY,
            *args,
            f"--root_dir={tmp_path}",
            "--run_name=r",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
    )
    metrics = tmp_path / "r" / "round_00" / "tb"
    deadline = time.time() + 120
    while not metrics.exists() and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(1.0)  # well inside training
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err[-2000:]
    assert "Rerun the same command" in err
    ckpt = tmp_path / "r" / "round_00" / "ckpt"
    assert (ckpt / "checkpoint").exists()
    assert not (tmp_path / "r" / "round_00" / "summary.json").exists()
    if sig == signal.SIGINT:
        return  # the resume is the same as after SIGTERM
    resumed = _imp(tmp_path, *args)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming round 0 from its checkpoint" in resumed.stdout
    assert (tmp_path / "r" / "round_00" / "summary.json").exists() and not ckpt.exists()


# OSError(ENOSPC) as the os module raises it, tf.errors.ResourceExhaustedError as gfile does.
@pytest.mark.parametrize("failpoint", ["enospc", "enospc_tf"])
def test_a_full_disk_is_reported_and_leaves_no_partial_file(
    finished, tmp_path, monkeypatch, failpoint
):
    import shutil

    shutil.copytree(finished / "r", tmp_path / "r")
    for rdir in ("round_02", "branches/random_prune/round_02"):
        shutil.rmtree(tmp_path / "r" / rdir)
    before = snapshot(tmp_path)
    monkeypatch.setenv("LTH_TF_FAILPOINT", f"{failpoint}:round_02/masks.npz")
    code, err = _imp_here(tmp_path)
    monkeypatch.delenv("LTH_TF_FAILPOINT")
    assert code == 2 and "disk is full" in err, err[-2000:]
    assert snapshot(tmp_path) == before  # finished rounds as they were, no partial file
    if failpoint == "enospc":
        assert _imp(tmp_path).returncode == 0  # space back: the run completes
        assert _results(tmp_path / "r") == _results(finished / "r")


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_a_damaged_checkpoint_is_named_in_the_error(finished, tmp_path, damage):
    import shutil

    shutil.copytree(finished / "r", tmp_path / "r")
    target = tmp_path / "r" / "round_02" / "checkpoints" / "final.npz"
    blob = target.read_bytes()
    if damage == "truncate":
        target.write_bytes(blob[: len(blob) // 2])
    else:
        # A bit inside the stored (compressed) values of the pruned fc1 kernel.
        array_start = blob.index(b"__sparse__/fc1/kernel/planes") + 200
        target.write_bytes(
            blob[:array_start] + bytes([blob[array_start] ^ 0x01]) + blob[array_start + 1 :]
        )
    before = snapshot(tmp_path)
    code, err = _imp_here(tmp_path, "--rounds=3")  # round 3 needs round 2's final weights
    assert code == 2, err[-2000:]
    assert str(target) in err and "damaged" in err
    assert snapshot(tmp_path) == before


def test_masks_that_do_not_follow_from_the_previous_round_are_refused(finished, tmp_path):
    import shutil

    shutil.copytree(finished / "r", tmp_path / "r")
    rdir = tmp_path / "r" / "round_02"
    os.remove(rdir / "summary.json")
    masks = files.read_npz(str(rdir / "masks.npz"))
    masks["fc1"] = np.ones_like(masks["fc1"])  # a valid file with the wrong content
    files.write_npz(str(rdir / "masks.npz"), masks)
    before = snapshot(tmp_path)
    code, err = _imp_here(tmp_path)
    assert code == 2 and "does not match the masks" in err, err[-2000:]
    assert snapshot(tmp_path) == before


def test_damaged_files_are_detected_on_read(tmp_path):
    path = str(tmp_path / "m.npz")
    files.write_npz(path, {"a": np.arange(10.0)})
    np.testing.assert_array_equal(files.read_npz(path)["a"], np.arange(10.0))
    with open(path, "rb") as f:
        blob = f.read()
    with open(path, "wb") as f:
        f.write(blob[:-20])
    with pytest.raises(files.DamagedFileError, match="m.npz"):
        files.read_npz(path)
    np.savez(path, a=np.zeros(3))  # not written by lth_tf: no checksum
    with pytest.raises(files.DamagedFileError, match="checksum"):
        files.read_npz(path)
    (tmp_path / "s.json").write_text("{not json")
    with pytest.raises(files.DamagedFileError, match="s.json"):
        files.read_json(str(tmp_path / "s.json"))


@pytest.fixture()
def main_with(finished):
    """Runs imp.main in-process with the tiny flags plus `extra` against the finished run's root."""
    imp.define_flags()

    def run(*extra):
        FLAGS.unparse_flags()
        FLAGS(["imp", *TINY, f"--root_dir={finished}", "--run_name=r", *extra])
        return imp.main(["imp"])

    yield run
    FLAGS.unparse_flags()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--arch=alexnet"], "Known architectures"),
        (["--dataset=svhn"], "Known datasets"),
        (["--prune_fraction=1.0"], "prune_fraction"),
        (["--prune_fraction=-0.1"], "prune_fraction"),
        (["--target_density=0"], "target_density"),
        (["--target_density=1.5"], "target_density"),
        (["--rewind_step=5 epochs"], "rewind_step"),
        (["--rounds=-1"], "rounds"),
    ],
)
def test_bad_values_are_refused_before_anything_is_written(main_with, finished, extra, message):
    before = snapshot(finished)
    with pytest.raises((app.UsageError, flags.Error), match=message):
        main_with(*extra)
    assert snapshot(finished) == before


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--rewind_step=40it"], "rewind_step=40it"),  # at the end of training
        (["--lr=0.5"], "different configuration"),  # another config, same run directory
        (["--strategy=tpu"], "needs --tpu"),
        (
            ["--dataset=cifar10", "--allow_any_dataset", "--data_dir=/nonexistent/tfds"],
            "tfds build cifar10",
        ),
    ],
)
def test_runtime_refusals_leave_the_run_untouched(main_with, finished, capsys, extra, message):
    before = snapshot(finished)
    assert main_with(*extra) == 2
    assert message in capsys.readouterr().err
    assert snapshot(finished) == before


def test_a_root_dir_that_is_a_file_or_not_writable_is_refused(tmp_path, monkeypatch):
    a_file = tmp_path / "file"
    a_file.write_text("keep me")
    assert "is a file" in imp._root_dir_problem(str(a_file / "runs"))
    monkeypatch.setattr(os, "access", lambda *a: False)
    assert "not writable" in imp._root_dir_problem(str(tmp_path / "runs"))
    assert a_file.read_text() == "keep me"


def test_a_run_from_another_format_version_is_refused(finished, tmp_path):
    import shutil

    shutil.copytree(finished / "r", tmp_path / "r")
    config = str(tmp_path / "r" / "config.json")
    files.write_json(config, {**files.read_json(config), "format_version": 0})  # as lth_tf 0 wrote
    before = snapshot(tmp_path)
    code, err = _imp_here(tmp_path)
    assert code == 2 and "format version 0" in err, err[-2000:]
    assert snapshot(tmp_path) == before


def test_divergence_stops_with_the_loss_and_step_and_keeps_other_runs(finished, tmp_path):
    before = snapshot(finished)
    code, err = _imp_here(
        tmp_path,
        "--optimizer=sgd",
        "--lr=1e9",
        "--training_steps=200it",
        "--eval_every=100it",
        "--rewind_step=0",
    )
    assert code == 3, err[-2000:]
    assert "diverged" in err and "step" in err and "--lr" in err
    assert not (tmp_path / "r" / "round_00" / "summary.json").exists()
    assert not (tmp_path / "r" / "round_00" / "ckpt").exists()  # no checkpoint of NaN weights
    assert snapshot(finished) == before


def _copy(finished, tmp_path):
    import shutil

    shutil.copytree(finished / "r", tmp_path / "r")
    return tmp_path / "r"


def test_a_hand_edited_config_json_is_refused_and_the_run_kept(finished, tmp_path):
    run_dir = _copy(finished, tmp_path)
    config = run_dir / "config.json"
    config.write_text(config.read_text().replace('"prune_fraction": 0.2', '"prune_fraction": 0.5'))
    before = snapshot(tmp_path)
    code, err = _imp_here(tmp_path, "--prune_fraction=0.5", "--rounds=3")
    assert code == 2, err[-2000:]
    assert str(config) in err and "'prune_fraction' was changed" in err
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize(
    "which", ["round_02/checkpoints/final.npz", "round_00/checkpoints/rewind.npz"]
)
def test_non_finite_weights_with_a_valid_checksum_are_refused(finished, tmp_path, which):
    # final.npz: the next round's masks would silently drop the weight; rewind.npz: the NaN
    # would travel into every later round.
    run_dir = _copy(finished, tmp_path)
    target = str(run_dir / which)
    weights = files.read_npz(target)
    weights["fc1/kernel"][3, 7] = np.nan
    payload = {**weights, "__sha256__": np.frombuffer(files._checksum(weights).encode(), np.uint8)}
    with open(target, "wb") as f:
        np.savez(f, **payload)
    before = snapshot(tmp_path)
    code, err = _imp_here(tmp_path, "--rounds=3")
    assert code == 2, err[-2000:]
    assert target in err and "'fc1/kernel' holds 1 NaN" in err
    if "rewind" in which:  # W_k cannot be recomputed: the advice is not to delete it
        assert "put back a good copy" in err and "Delete" not in err
    assert snapshot(tmp_path) == before


def test_a_finished_run_whose_rewind_npz_was_deleted_says_so(finished, tmp_path):
    run_dir = _copy(finished, tmp_path)
    rewind = run_dir / "round_00" / "checkpoints" / "rewind.npz"
    os.remove(rewind)
    before = snapshot(tmp_path)
    code, err = _imp_here(tmp_path)
    assert code == 2, err[-2000:]
    assert f"{rewind} is missing, although round 0 is finished" in err
    assert "must finish before pruning" not in err
    assert "Put the file back" in err and "Delete" not in err
    assert snapshot(tmp_path) == before


# ---- one writer per run directory ------------------------------------------------------------

ENTRY_POINTS = {
    "lth_tf.imp": ["--rounds=3"],
    "lth_tf.branch": ["--kind=lr_rewind", "--rounds=1"],
    "lth_tf.stability": ["--round=1", "--num_alphas=3"],
    "lth_tf.export": ["--round=1", "--eval_examples=64"],
}


def _command(module, root, *extra):
    """argv of `python -m module` on the run root/r (imp: by root_dir and run_name)."""
    run = [*TINY, f"--root_dir={root}", "--run_name=r"] if module == "lth_tf.imp" else []
    if module != "lth_tf.imp":
        run = [f"--run_dir={root / 'r'}"]
    return [sys.executable, "-m", module, *run, *ENTRY_POINTS[module], *extra]


def _all_entry_points(root):
    """Runs imp, branch, stability and export on root/r, all four at once; {module: CompletedProcess}."""
    out = {}
    procs = {
        module: subprocess.Popen(
            _command(module, root),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=ENV,
        )
        for module in ENTRY_POINTS
    }
    for module, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=600)
        out[module] = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    return out


def _each_entry_point_here(root):
    """{module: (exit code, stderr)} of the same four commands, one at a time, in-process."""
    return {m: call(m.removeprefix("lth_tf."), *_command(m, root)[3:]) for m in ENTRY_POINTS}


def test_a_second_writer_is_refused_at_once_with_the_holder_named(finished, tmp_path):
    import shutil
    import socket

    from lth_tf import runlock

    shutil.copytree(finished / "r", tmp_path / "r")
    with runlock.hold(str(tmp_path / "r"), "a test holding the run"):
        before = snapshot(tmp_path)
        results = _all_entry_points(tmp_path)
        assert snapshot(tmp_path) == before  # nothing trained, written or deleted
    for module, result in results.items():
        assert result.returncode == 2, (module, result.stderr[-2000:])
        err = result.stderr
        assert "is in use: a test holding the run" in err, (module, err[-2000:])
        assert f"pid {os.getpid()} on host {socket.gethostname()}, since " in err, module
        assert "Traceback" not in err
    assert not (tmp_path / "r" / "lock.json").exists()  # released with the `with`


def test_a_lock_left_by_a_killed_process_is_taken_over(tmp_path):
    from lth_tf import runlock

    run = tmp_path / "r"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\n"
            "from lth_tf import runlock\n"
            "held = runlock.hold(sys.argv[1], 'killed', create=True)\n"
            "held.__enter__()\n"
            "print('held', flush=True)\n"
            "time.sleep(600)\n",
            str(run),
        ],
        stdout=subprocess.PIPE,
        text=True,
        env=ENV,
    )
    assert holder.stdout.readline().strip() == "held"
    with (
        pytest.raises(runlock.RunLockedError, match=f"killed \\(pid {holder.pid} "),
        runlock.hold(str(run), "second"),
    ):
        pass
    holder.kill()
    holder.wait()
    assert json.loads((run / "lock.json").read_text())["pid"] == holder.pid  # left behind
    with runlock.hold(str(run), "after the kill"):
        assert json.loads((run / "lock.json").read_text())["command"] == "after the kill"
    assert not (run / "lock.json").exists()


def test_workers_of_one_run_hold_their_own_directories(tmp_path):
    from lth_tf import runlock

    chief, worker = str(tmp_path / "r"), str(tmp_path / "r.worker_1")  # distribute.worker_run_dir
    with runlock.hold(chief, "chief", create=True), runlock.hold(worker, "worker", create=True):
        pass


def test_on_a_file_system_without_flock_the_lock_file_alone_refuses_and_ages(tmp_path):
    import socket

    from lth_tf import paths, runlock

    run = f"ram://{tmp_path.name}/r"  # not a local path: the gs:// code path
    first = runlock.hold(run, "first", create=True)
    first.__enter__()
    with pytest.raises(runlock.RunLockedError, match="first"), runlock.hold(run, "second"):
        pass
    first.__exit__(None, None, None)
    assert not files.exists(paths.lock_file(run))
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True
    )
    files.write_json(paths.lock_file(run), {"pid": int(dead.stdout), "host": socket.gethostname()})
    with runlock.hold(run, "after a killed holder"):  # same host, pid gone: stale
        pass
    files.write_json(paths.lock_file(run), {"pid": 1, "host": "another-host", "command": "x"})
    with (
        pytest.raises(runlock.RunLockedError, match=f"another-host.*gsutil rm {run}/lock.json"),
        runlock.hold(run, "third"),
    ):
        pass


# ---- links ---------------------------------------------------------------------------------


def test_a_symlink_in_the_run_is_refused_and_nothing_outside_is_deleted(finished, tmp_path):
    import shutil

    shutil.copytree(finished / "r", tmp_path / "r")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("keep me")
    os.remove(tmp_path / "r" / "round_02" / "summary.json")
    os.symlink(elsewhere, tmp_path / "r" / "round_02" / "ckpt")
    before = snapshot(tmp_path)
    result = _imp(tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"{tmp_path / 'r' / 'round_02' / 'ckpt'} -> {elsewhere}" in result.stderr
    assert (elsewhere / "keep.txt").read_text() == "keep me"
    assert snapshot(tmp_path) == before


def test_deleting_a_tree_never_follows_a_link(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("keep me")
    tree = tmp_path / "tree"
    tree.mkdir()
    os.symlink(outside, tree / "link")
    with pytest.raises(files.LinkError, match="link"):
        files.remove_tree(str(tree / "link"))
    files.remove_tree(str(tree))  # the link inside is removed, not followed
    assert not tree.exists() and (outside / "keep.txt").read_text() == "keep me"


# ---- full disks --------------------------------------------------------------------------------


def test_a_full_disk_is_recognised_whatever_raised_it():
    import errno

    from lth_tf import cli
    from lth_tf.keras import tf

    assert "No space left" in cli.disk_full(OSError(errno.ENOSPC, "x", "/a/b.npz"))
    assert "quota" in cli.disk_full(OSError(errno.EDQUOT, "x", "/a/b.npz")).lower()
    gfile = tf.errors.ResourceExhaustedError(None, None, "/a/b.npz; No space left on device")
    assert "/a/b.npz" in cli.disk_full(gfile)
    try:
        try:
            raise gfile
        except tf.errors.ResourceExhaustedError as e:
            raise ValueError("a checkpoint could not be written") from e
    except ValueError as wrapped:
        assert cli.disk_full(wrapped)
    oom = tf.errors.ResourceExhaustedError(None, None, "OOM when allocating tensor")
    assert cli.disk_full(oom) is None and cli.disk_full(OSError(errno.EACCES, "x")) is None


@pytest.fixture()
def small_disk(tmp_path):
    """A real 16 MB file system (tmpfs), or a skip where mounting is not permitted."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount)], capture_output=True
    )
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=True)


def _fill(mount, leave: int):
    """Fills the file system but `leave` bytes; returns the filler's path."""
    stat = os.statvfs(mount)
    filler = mount / "filler"
    with open(filler, "wb") as f:
        f.write(b"\0" * max(stat.f_bavail * stat.f_frsize - leave, 0))
    return filler


def test_a_real_full_disk_is_a_message_from_every_entry_point(finished, small_disk):
    import shutil

    run = small_disk / "r"
    shutil.copytree(finished / "r", run)
    for rdir in ("round_02", "branches/random_prune/round_02"):  # imp has a round to train
        shutil.rmtree(run / rdir)
    before = snapshot(run)
    filler = _fill(small_disk, leave=96 * 1024)  # JSON fits, weights do not
    results = _each_entry_point_here(small_disk)
    for module, (code, err) in results.items():
        assert code == 2, (module, err[-3000:])
        assert "disk is full" in err, module
    after = snapshot(run)
    assert {p: after.get(p) for p in before} == before  # every finished file as it was
    os.remove(filler)  # space back: the run completes as if nothing happened
    resumed = _imp(small_disk)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    reference, results = _results(finished / "r"), _results(run)
    assert {k: results.get(k) for k in reference} == reference  # (branch, stability began too)
