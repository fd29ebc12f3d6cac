"""Contracts under tf.distribute, on this CPU machine.

MirroredStrategy runs on two logical CPU devices; multi-worker runs are two
processes on 127.0.0.1. Each scenario runs in a subprocess, because logical
devices must be configured before TensorFlow starts and a cluster cannot be
left half-built in the test process.
"""

import json
import os
import socket
import subprocess
import sys
import textwrap

import conftest
import numpy as np
import pytest

from lth_tf import config as config_lib
from lth_tf import distribute, files, paths

ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONUNBUFFERED": "1"}
TINY = {**conftest.TINY, "rounds": 2, "output_rate": 1.0}

MIRRORED = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    from lth_tf.keras import tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    from lth_tf import config, distribute, rounds, rundir, sparsity
    cfg = config.make_config("lenet_300_100", **json.loads(sys.argv[1]))
    strategy = {"one": distribute.get_strategy("default"),
                "two": distribute.get_strategy("mirrored", devices=["/cpu:0", "/cpu:1"])}[sys.argv[3]]
    rundir.open_run_dir(cfg, sys.argv[2])
    e = rounds.Experiment(cfg, sys.argv[2], strategy=strategy, checkpoint_seconds=0,
                          log=lambda *a: None)
    e.run()
    # Pruned weights are exactly zero on every replica.
    bad = 0
    for name, wrapper in sparsity.wrappers(e.model).items():
        kernel, mask = wrapper.pruning_vars[0][0], wrapper.pruning_vars[0][1]
        replicas = getattr(kernel, "values", (kernel,))
        masks = getattr(mask, "values", (mask,))
        for k, m in zip(replicas, masks):
            bad += int(np.count_nonzero(k.numpy()[m.numpy() == 0]))
    print(json.dumps({"replicas": strategy.num_replicas_in_sync, "nonzero_pruned": bad}))
    """
)


def _run_mirrored(tmp_path, which):
    script = tmp_path / "mirrored.py"
    script.write_text(MIRRORED)
    run_dir = tmp_path / which
    out = subprocess.run(
        [sys.executable, str(script), json.dumps(TINY), str(run_dir), which],
        capture_output=True,
        text=True,
        timeout=600,
        env=ENV,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return run_dir, json.loads(out.stdout.strip().splitlines()[-1])


def test_mirrored_on_two_devices_gives_the_same_masks_as_one_device(tmp_path):
    one_dir, one = _run_mirrored(tmp_path, "one")
    two_dir, two = _run_mirrored(tmp_path, "two")
    assert (one["replicas"], two["replicas"]) == (1, 2)
    assert two["nonzero_pruned"] == 0 and one["nonzero_pruned"] == 0
    for r in (1, 2):
        a = files.read_npz(paths.masks_file(paths.round_dir(str(one_dir), r)))
        b = files.read_npz(paths.masks_file(paths.round_dir(str(two_dir), r)))
        assert set(a) == set(b)
        for name in a:
            np.testing.assert_array_equal(a[name], b[name])


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_multi_worker_run_agrees_on_masks_and_only_the_chief_writes(tmp_path):
    ports = [_free_port(), _free_port()]
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    argv = [f"--{k}={v}" for k, v in TINY.items()] + [
        "--arch=lenet_300_100",
        "--strategy=multi_worker",
        f"--root_dir={tmp_path}/runs",
        "--run_name=mw",
        "--checkpoint_seconds=0",
    ]
    procs = []
    for index in (0, 1):
        env = {
            **ENV,
            "TF_CONFIG": json.dumps(
                {"cluster": cluster, "task": {"type": "worker", "index": index}}
            ),
        }
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "lth_tf.imp", *argv],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    outputs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err[-3000:]
    chief = tmp_path / "runs" / "mw"
    worker = tmp_path / "runs" / "mw.worker_1"
    assert (chief / "round_02" / "summary.json").exists()
    assert (chief / "report.md").exists() and not (worker / "report.md").exists()
    assert "Report:" in outputs[0][0] and "Report:" not in outputs[1][0]
    for r in (1, 2):
        a = files.read_npz(paths.masks_file(paths.round_dir(str(chief), r)))
        b = files.read_npz(paths.masks_file(paths.round_dir(str(worker), r)))
        for name in a:
            np.testing.assert_array_equal(a[name], b[name])


def test_strategy_errors_are_clear(monkeypatch):
    with pytest.raises(distribute.StrategyError, match="Known strategies"):
        distribute.get_strategy("horovod")
    with pytest.raises(distribute.StrategyError, match="needs --tpu"):
        distribute.get_strategy("tpu")
    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(distribute.StrategyError, match="TF_CONFIG"):
        distribute.get_strategy("multi_worker")
    with pytest.raises(distribute.StrategyError, match="only 0 GPU"):
        distribute.get_strategy("mirrored", num_gpus=4)


def test_unreachable_tpu_fails_fast_with_advice():
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            "from lth_tf import distribute; distribute.get_strategy('tpu', tpu='local')",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=ENV,
    )
    assert out.returncode != 0
    assert "TPU" in out.stderr and "tensorflow-tpu" in out.stderr


def test_mixed_precision_config_is_checked():
    config_lib.make_config("resnet50", mixed_precision="bfloat16")
    with pytest.raises(ValueError, match="mixed_precision"):
        config_lib.make_config("resnet50", mixed_precision="int8")


# ResNet-50 under MirroredStrategy on the fake ImageNet (wrapped, trained, zeros on every
# replica) is tests/test_export_imagenet.py's, whose run trains that way once for all
# of its contracts.


@pytest.mark.parametrize("precision", ["bfloat16", "float16"])
def test_mixed_precision_keeps_float32_masks_and_exact_zeros(tmp_path, tiny_config, precision):
    from lth_tf import rounds, rundir, sparsity
    from lth_tf.keras import keras, tf

    cfg = tiny_config(mixed_precision=precision, rounds=1, output_rate=1.0)
    rundir.open_run_dir(cfg, str(tmp_path))
    e = rounds.Experiment(cfg, str(tmp_path), checkpoint_seconds=0, log=lambda *a: None)
    try:
        summaries = e.run()
        assert keras.mixed_precision.global_policy().name == "float32"  # restored after the build
        assert e.model.output.dtype == tf.float32
        for wrapper in sparsity.wrappers(e.model).values():
            kernel, mask, _ = wrapper.pruning_vars[0]
            assert wrapper.compute_dtype == (
                precision if wrapper.layer.name != "output" else "float32"
            )
            assert mask.dtype == tf.float32 and kernel.dtype == tf.float32
            assert np.count_nonzero(kernel.numpy()[mask.numpy() == 0]) == 0
        assert abs(summaries[1]["density"] - 0.8) < 1e-3
        if precision == "float16":  # the loss scale survives the optimizer reset between rounds
            assert float(e.model.optimizer.loss_scale) > 1.0
    finally:
        keras.mixed_precision.set_global_policy("float32")
