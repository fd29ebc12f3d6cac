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

import numpy as np
import pytest
from absl import app, flags

from lth_tf import files, imp

FLAGS = flags.FLAGS
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONUNBUFFERED": "1"}
TINY = [
    "--arch=lenet_300_100",
    "--dataset=synthetic:8x8x1:4",
    "--batch_size=32",
    "--training_steps=40it",
    "--eval_every=20it",
    "--rewind_step=20it",
    "--rounds=2",
    "--output_rate=1.0",
    "--controls=random_prune",
    "--verbose=0",
    "--checkpoint_seconds=0",
    "--deterministic",
]


def _imp(root, *extra, env=None, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", "lth_tf.imp", *TINY, f"--root_dir={root}", "--run_name=r", *extra],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**ENV, **(env or {})},
    )


def _snapshot(root) -> dict:
    out = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
    return out


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
    leftovers = {p: h for p, h in _snapshot(tmp_path).items() if ".tmp-" in p}
    assert leftovers == planted


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signals_stop_after_a_checkpoint_and_the_rerun_resumes(finished, tmp_path, sig, code):
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
    resumed = _imp(tmp_path, *args)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming round 0 from its checkpoint" in resumed.stdout
    assert (tmp_path / "r" / "round_00" / "summary.json").exists() and not ckpt.exists()


def test_a_full_disk_is_reported_and_leaves_no_partial_file(tmp_path):
    full = _imp(tmp_path, env={"LTH_TF_FAILPOINT": "enospc:round_01/masks.npz"})
    assert full.returncode == 2 and "disk is full" in full.stderr
    assert "Traceback" not in full.stderr
    assert (tmp_path / "r" / "round_00" / "summary.json").exists()  # earlier round kept
    assert not [p for p in _snapshot(tmp_path) if p.startswith("r/round_01/masks.npz")]
    assert _imp(tmp_path).returncode == 0  # space back: the run completes


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_a_damaged_checkpoint_is_named_in_the_error(finished, tmp_path, damage):
    import shutil

    shutil.copytree(finished / "r", tmp_path / "r")
    target = tmp_path / "r" / "round_02" / "checkpoints" / "final.npz"
    blob = target.read_bytes()
    if damage == "truncate":
        target.write_bytes(blob[: len(blob) // 2])
    else:
        array_start = blob.index(b"NUMPY", blob.index(b"fc1/kernel")) + 200
        target.write_bytes(
            blob[:array_start] + bytes([blob[array_start] ^ 0x01]) + blob[array_start + 1 :]
        )
    before = _snapshot(tmp_path)
    result = _imp(tmp_path, "--rounds=3")  # round 3 needs round 2's final weights
    assert result.returncode == 2, result.stderr[-2000:]
    assert str(target) in result.stderr and "damaged" in result.stderr
    assert _snapshot(tmp_path) == before


def test_masks_that_do_not_follow_from_the_previous_round_are_refused(finished, tmp_path):
    import shutil

    shutil.copytree(finished / "r", tmp_path / "r")
    rdir = tmp_path / "r" / "round_02"
    os.remove(rdir / "summary.json")
    masks = files.read_npz(str(rdir / "masks.npz"))
    masks["fc1"] = np.ones_like(masks["fc1"])  # a valid file with the wrong content
    files.write_npz(str(rdir / "masks.npz"), masks)
    before = _snapshot(tmp_path)
    result = _imp(tmp_path)
    assert result.returncode == 2 and "does not match the masks" in result.stderr
    assert _snapshot(tmp_path) == before


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
    before = _snapshot(finished)
    with pytest.raises((app.UsageError, flags.Error), match=message):
        main_with(*extra)
    assert _snapshot(finished) == before


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--rewind_step=40it"], "rewind_step=40it"),  # at the end of training
        (["--lr=0.5"], "different configuration"),  # another config, same run directory
        (["--strategy=tpu"], "needs --tpu"),
        (["--dataset=cifar10", "--data_dir=/nonexistent/tfds"], "tfds build cifar10"),
    ],
)
def test_runtime_refusals_leave_the_run_untouched(main_with, finished, capsys, extra, message):
    before = _snapshot(finished)
    assert main_with(*extra) == 2
    assert message in capsys.readouterr().err
    assert _snapshot(finished) == before


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
    before = _snapshot(tmp_path)
    result = _imp(tmp_path)
    assert result.returncode == 2 and "format version 0" in result.stderr
    assert _snapshot(tmp_path) == before


def test_divergence_stops_with_the_loss_and_step_and_keeps_other_runs(finished, tmp_path):
    before = _snapshot(finished)
    result = _imp(
        tmp_path,
        "--optimizer=sgd",
        "--lr=1e9",
        "--training_steps=200it",
        "--eval_every=100it",
        "--rewind_step=0",
    )
    assert result.returncode == 3
    assert "diverged" in result.stderr and "step" in result.stderr and "--lr" in result.stderr
    assert not (tmp_path / "r" / "round_00" / "summary.json").exists()
    assert not (tmp_path / "r" / "round_00" / "ckpt").exists()  # no checkpoint of NaN weights
    assert _snapshot(finished) == before


def _copy(finished, tmp_path):
    import shutil

    shutil.copytree(finished / "r", tmp_path / "r")
    return tmp_path / "r"


def test_a_hand_edited_config_json_is_refused_and_the_run_kept(finished, tmp_path):
    run_dir = _copy(finished, tmp_path)
    config = run_dir / "config.json"
    config.write_text(config.read_text().replace('"prune_fraction": 0.2', '"prune_fraction": 0.5'))
    before = _snapshot(tmp_path)
    result = _imp(tmp_path, "--prune_fraction=0.5", "--rounds=3")
    assert result.returncode == 2, result.stderr[-2000:]
    assert str(config) in result.stderr and "'prune_fraction' was changed" in result.stderr
    assert "Traceback" not in result.stderr
    assert _snapshot(tmp_path) == before


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
    before = _snapshot(tmp_path)
    result = _imp(tmp_path, "--rounds=3")
    assert result.returncode == 2, result.stderr[-2000:]
    assert target in result.stderr and "'fc1/kernel' holds 1 NaN" in result.stderr
    if "rewind" in which:  # W_k cannot be recomputed: the advice is not to delete it
        assert "put back a good copy" in result.stderr and "Delete" not in result.stderr
    assert _snapshot(tmp_path) == before


def test_a_finished_run_whose_rewind_npz_was_deleted_says_so(finished, tmp_path):
    run_dir = _copy(finished, tmp_path)
    rewind = run_dir / "round_00" / "checkpoints" / "rewind.npz"
    os.remove(rewind)
    before = _snapshot(tmp_path)
    result = _imp(tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"{rewind} is missing, although round 0 is finished" in result.stderr
    assert "must finish before pruning" not in result.stderr
    assert "Put the file back" in result.stderr and "Delete" not in result.stderr
    assert _snapshot(tmp_path) == before
