"""Contracts of the flagfiles and of a run's identity across machines.

Every flags/*.cfg is a valid imp command that names (in its first comment lines)
its paper, figure or table and deviations, and sets its architecture's recipe
(lth_tf/presets.py) except the deviations it names; the TPU file is one command on a TPU
VM; the GPU and TPU ResNet-50 files name the same experiment. Settings that
change only the speed (steps_per_execution, jit_compile) do not change a run's
identity, so a run started with one value resumes with another; settings that
change results (batch size, precision) are refused on resume.
"""

import dataclasses
import glob
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from absl import flags

from lth_tf import config as config_lib
from lth_tf import files, masks, paths, presets, rounds, rundir, train
from lth_tf.callbacks import Interrupted, StopRequest
from lth_tf.keras import keras

FLAGS = flags.FLAGS
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGFILES = sorted(glob.glob(os.path.join(ROOT, "flags", "*.cfg")))
TPU_FILE = os.path.join(ROOT, "flags", "resnet50_imagenet_tpu.cfg")
GPU_FILE = os.path.join(ROOT, "flags", "resnet50_imagenet_gpu.cfg")
LENET_FILE = os.path.join(ROOT, "flags", "lenet300_mnist.cfg")


def _quiet(*args):
    pass


def test_there_are_flagfiles():
    names = {os.path.basename(p) for p in FLAGFILES}
    assert {"resnet50_imagenet_tpu.cfg", "resnet50_imagenet_gpu.cfg"} <= names


@pytest.mark.parametrize("path", FLAGFILES, ids=os.path.basename)
def test_every_flagfile_parses_into_a_valid_config(parse, path):
    c = parse(f"--flagfile={path}")
    assert isinstance(c, config_lib.RunConfig)
    assert config_lib.RunConfig.from_json(c.to_json()) == c
    # The rewind step can be recorded with the file's own steps_per_execution for
    # the dataset sizes the recipes are written for.
    spe = {"mnist": 916, "cifar10": 390, "imagenet2012": 1251}[c.dataset]
    train.resolve(c, steps_per_epoch=spe)


def test_the_tpu_flagfile_is_one_command_for_a_tpu_vm(parse):
    c = parse(f"--flagfile={TPU_FILE}")
    assert (FLAGS.strategy, FLAGS.tpu) == ("tpu", "local")
    assert c.mixed_precision == "bfloat16"
    assert c.steps_per_execution > 1
    assert (c.arch, c.dataset, c.batch_size) == ("resnet50", "imagenet2012", 1024)


def test_the_gpu_and_tpu_flagfiles_name_the_same_experiment(parse):
    tpu = parse(f"--flagfile={TPU_FILE}")
    gpu = parse(f"--flagfile={GPU_FILE}")
    assert FLAGS.strategy == "mirrored"
    assert tpu.steps_per_execution != gpu.steps_per_execution  # speed settings differ ...
    assert tpu.differences(gpu) == {}  # ... but not what the run computes
    assert paths.run_name(tpu) == paths.run_name(gpu)


def test_print_config_of_the_tpu_flagfile_needs_no_tpu(tmp_path, parse):
    """The exact command of BUILD.md's TPU runbook resolves here, without a TPU."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "lth_tf.imp",
            f"--flagfile={TPU_FILE}",
            f"--root_dir={tmp_path}",
            "--print_config",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    gpu = parse(f"--flagfile={GPU_FILE}")
    assert f"Run directory: {paths.join(str(tmp_path), paths.run_name(gpu))}" in result.stdout
    assert '"mixed_precision": "bfloat16"' in result.stdout
    assert not list(tmp_path.iterdir())  # nothing written


# ---- identity: speed settings are not part of a run -------------------------------------


def test_speed_settings_do_not_change_the_identity_but_results_settings_do():
    base = config_lib.make_config("resnet50")
    fast = dataclasses.replace(base, steps_per_execution=100, jit_compile=True, verbose=2)
    assert base.hash8() == fast.hash8() and base.differences(fast) == {}
    for field, value in [("batch_size", 512), ("mixed_precision", "bfloat16")]:
        other = dataclasses.replace(base, **{field: value})
        assert other.hash8() != base.hash8()
        assert set(base.differences(other)) == {field}


@pytest.mark.parametrize("first, then", [(1, 10), (10, 1)])
def test_a_run_dir_accepts_another_steps_per_execution(tiny_config, tmp_path, first, then):
    run_dir = str(tmp_path / "run")
    rundir.open_run_dir(tiny_config(steps_per_execution=first), run_dir)
    rundir.open_run_dir(tiny_config(steps_per_execution=then, jit_compile=True), run_dir)
    # config.json keeps the values of the invocation that created the run.
    saved = rundir.load_config(run_dir)
    assert saved.steps_per_execution == first


@pytest.mark.parametrize(
    "field, value", [("batch_size", 16), ("mixed_precision", "bfloat16"), ("seed", 1)]
)
def test_a_run_dir_refuses_settings_that_change_results(tiny_config, tmp_path, field, value):
    run_dir = str(tmp_path / "run")
    rundir.open_run_dir(tiny_config(), run_dir)
    before = Path(paths.config_file(run_dir)).read_text()
    with pytest.raises(rundir.RunDirError, match=field):
        rundir.open_run_dir(tiny_config(**{field: value}), run_dir)
    assert Path(paths.config_file(run_dir)).read_text() == before


def test_the_rewind_step_is_checked_against_the_current_steps_per_execution(tiny_config, tmp_path):
    """A run created with steps_per_execution=1 cannot go on with a value that skips step k."""
    run_dir = str(tmp_path / "run")
    # Rewind step 10 is 10 steps into a 20-step evaluation period.
    created = tiny_config(rewind_step="10it", steps_per_execution=1)
    rundir.open_run_dir(created, run_dir)
    rounds.Experiment(created, run_dir, checkpoint_seconds=0, log=_quiet)
    resumed = tiny_config(rewind_step="10it", steps_per_execution=4)
    rundir.open_run_dir(resumed, run_dir)  # the same run ...
    with pytest.raises(ValueError, match="steps_per_execution=4"):  # ... but k is unreachable
        rounds.Experiment(resumed, run_dir, checkpoint_seconds=0, log=_quiet)
    rounds.Experiment(tiny_config(rewind_step="10it", steps_per_execution=5), run_dir, log=_quiet)


def test_a_run_started_with_one_steps_per_execution_resumes_with_another(tiny_config, tmp_path):
    run_dir = str(tmp_path / "run")
    first = tiny_config(rounds=0, steps_per_execution=1)
    rundir.open_run_dir(first, run_dir)
    rounds.Experiment(first, run_dir, checkpoint_seconds=0, log=_quiet).run()
    rewind = files.read_npz(paths.checkpoint_file(paths.round_dir(run_dir, 0), "rewind"))

    then = tiny_config(rounds=1, steps_per_execution=10, jit_compile=True)
    rundir.open_run_dir(then, run_dir)
    experiment = rounds.Experiment(then, run_dir, checkpoint_seconds=0, log=_quiet)
    summaries = experiment.run()
    assert experiment.trained == [("imp", 1)]  # round 0 was skipped, not retrained
    assert [s["round"] for s in summaries] == [0, 1]
    assert summaries[1]["density"] == pytest.approx(0.8, abs=1e-3)
    start = files.read_npz(paths.checkpoint_file(paths.round_dir(run_dir, 1), "start"))
    kernel = next(k for k in rewind if k.endswith("/kernel"))
    survivors = start[kernel] != 0
    assert (start[kernel][survivors] == rewind[kernel][survivors]).all()  # rewound to W_k


class _StopAt(keras.callbacks.Callback):
    """Requests a stop (as SIGTERM does) once `step` steps are done."""

    def __init__(self, step):
        super().__init__()
        self.step = step

    def on_train_batch_end(self, batch, logs=None):
        if train.global_step(self.model) == self.step:
            StopRequest.signal_name = "SIGTERM"


def test_resuming_off_the_execution_grid_still_records_the_rewind_step(
    tiny_config, tmp_path, monkeypatch
):
    """Stopped at step 7 with steps_per_execution=1, resumed with 10: W_20 is still recorded.

    From step 7, executions of 10 steps end at 17, 27, ...: the resumed segment
    must run shorter executions up to the rewind step instead of missing it.
    """
    settings = dict(rounds=0, eval_every="40it", rewind_step="20it")
    # An explicit steps_per_execution=1 turns the automatic choice off: one step per call.
    reference = str(tmp_path / "uninterrupted")
    config = tiny_config(steps_per_execution=1, **settings)
    rounds.Experiment(config, reference, checkpoint_seconds=0, log=_quiet).run()

    run_dir = str(tmp_path / "run")
    fit_segment = train.fit_segment

    def stopping_fit_segment(*args, callbacks=(), **kwargs):
        return fit_segment(*args, callbacks=[_StopAt(7), *callbacks], **kwargs)

    # Registered before the stop, so teardown restores "no signal" for later tests.
    monkeypatch.setattr(StopRequest, "signal_name", None)
    monkeypatch.setattr(train, "fit_segment", stopping_fit_segment)
    with pytest.raises(Interrupted, match="at step 7"):
        rounds.Experiment(config, run_dir, checkpoint_seconds=1e9, log=_quiet).run()
    monkeypatch.setattr(train, "fit_segment", fit_segment)
    StopRequest.signal_name = None

    resumed = tiny_config(steps_per_execution=10, **settings)
    rounds.Experiment(resumed, run_dir, checkpoint_seconds=0, log=_quiet).run()
    rdir, ref_rdir = paths.round_dir(run_dir, 0), paths.round_dir(reference, 0)
    rewind = files.read_npz(paths.checkpoint_file(rdir, "rewind"))
    expected = files.read_npz(paths.checkpoint_file(ref_rdir, "rewind"))
    for key in expected:
        np.testing.assert_allclose(rewind[key], expected[key], rtol=1e-5, atol=1e-6)


# ---- each flagfile says which paper it follows, and is its recipe ---------------------------

# Recipe fields a flagfile sets otherwise, on purpose (its "# Deviations:" line says so).
RECIPE_DEVIATIONS = {
    "lenet300_mnist_open_lth.cfg": {"prune_scope": "global", "output_rate": 0.0},
}


def _header(path) -> str:
    lines = Path(path).read_text().splitlines()
    return "\n".join(
        line for line in lines[: next(i for i, x in enumerate(lines) if not x.startswith("#"))]
    )


@pytest.mark.parametrize("path", FLAGFILES, ids=os.path.basename)
def test_every_flagfile_names_its_paper_figure_and_deviations(path):
    header = _header(path)
    for key in ("# Paper: ", "# Figure/table: ", "# Deviations: "):
        assert key in header, (os.path.basename(path), key)
    assert header.startswith("# Paper: ")


@pytest.mark.parametrize("path", FLAGFILES, ids=os.path.basename)
def test_every_flagfile_is_its_recipe(parse, path):
    c = parse(f"--flagfile={path}")
    deviations = RECIPE_DEVIATIONS.get(os.path.basename(path), {})
    expected = config_lib.make_config(c.arch, **deviations)
    for field in presets.recipe(c.arch):
        assert getattr(c, field) == getattr(expected, field), (os.path.basename(path), field)
    for field, value in deviations.items():
        assert getattr(c, field) == value != presets.recipe(c.arch)[field]


def test_lenet_recipe_and_flagfile_follow_the_2019_paper(parse):
    """Layer-wise, hidden layers 20% and the output 10% per round: the paper's Figure 3
    densities (51.3, 21.1, 13.5, 3.6, 1.9, 1.2 % of the weights) at rounds 3 ... 20."""
    for c in (config_lib.make_config("lenet_300_100"), parse(f"--flagfile={LENET_FILE}")):
        assert (c.prune_scope, c.prune_fraction, c.output_rate) == ("layerwise", 0.2, 0.5)
    assert c.rounds == 20
    sizes = {"fc1": 784 * 300, "fc2": 300 * 100, "output": 100 * 10}
    rates = {"fc1": 1.0, "fc2": 1.0, "output": c.output_rate}
    for r, paper in ((3, 51.3), (7, 21.1), (9, 13.5), (15, 3.6), (18, 1.9), (20, 1.2)):
        alive = sum(masks.imp_survivors(sizes, 0.2, r, "layerwise", rates).values())
        assert 100 * alive / sum(sizes.values()) == pytest.approx(paper, abs=0.06), r
    # The authors' framework's rule stays one flagfile away; the no-flag demo keeps it.
    framework = parse(f"--flagfile={ROOT}/flags/lenet300_mnist_open_lth.cfg")
    assert (framework.prune_scope, framework.output_rate) == ("global", 0.0)
    demo = parse()
    assert (demo.prune_scope, demo.output_rate) == ("global", 0.0)
