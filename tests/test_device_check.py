"""The device check (benchmarks/device_check.py) runs as a script and reports every check.

On a CPU it runs with --tiny (tiny sizes, float32); on a GPU machine the same
script without --tiny is the device check of BUILD.md.
"""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "device_check.py")
IMP_CHECKS = {
    "imp_model_on_the_device",
    "imp_round1_density_0.8",
    "imp_round2_density_0.64",
    "imp_pruned_weights_stay_pruned",
    "imp_pruned_weights_zero_in_final_weights",
    "imp_pruned_weights_zero_in_model_variables",
    "imp_resume_skips_finished_rounds",
    "imp_resume_produces_round_2",
    "imp_accuracies_finite",
}
ROW_KEYS = {
    "model",
    "input_shape",
    "batch",
    "precision",
    "jit_compile",
    "data_device",
    "steps_per_execution",
    "masked_density",
    "dense_images_per_s",
    "masked_images_per_s",
    "masked_over_dense",
    "masked_pruned_weights_zero",
}


@pytest.fixture(scope="module")
def tiny_result(tmp_path_factory):
    out = tmp_path_factory.mktemp("device_check") / "device_check.json"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])),
    }
    result = subprocess.run(
        [sys.executable, SCRIPT, "--tiny", f"--out={out}"],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=900,
    )
    return result, out


def test_tiny_device_check_passes_every_check(tiny_result):
    result, out = tiny_result
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-3000:])
    report = json.loads(out.read_text())
    failed = [name for name, check in report["checks"].items() if not check["passed"]]
    assert failed == [] and report["all_checks_passed"]
    assert "PASS  imp_resume_produces_round_2" in result.stdout


def test_tiny_device_check_json_has_the_machine_throughput_imp_and_targets(tiny_result):
    _, out = tiny_result
    report = json.loads(out.read_text())
    assert report["tiny"] is True and report["complete"] is True
    machine = report["machine"]
    assert machine["tensorflow"] and machine["date"]
    assert any(name.endswith("CPU:0") for name in machine["logical_devices"])
    assert isinstance(machine["gpus"], list) and isinstance(machine["gpu_details"], list)

    rows = report["throughput"]
    assert {r["model"] for r in rows} == {"resnet50", "resnet20"}
    assert {r["jit_compile"] for r in rows if r["model"] == "resnet20"} == {False, True}
    for row in rows:
        assert set(row) >= ROW_KEYS
        assert row["dense_images_per_s"] > 0 and row["masked_images_per_s"] > 0
        assert row["masked_over_dense"] == pytest.approx(
            row["masked_images_per_s"] / row["dense_images_per_s"]
        )
        assert row["masked_density"] == pytest.approx(0.2, abs=1e-3)
        assert row["masked_pruned_weights_zero"] is True

    assert set(report["checks"]) >= IMP_CHECKS
    assert report["imp"]["densities"] == pytest.approx([0.8, 0.64], abs=1e-3)
    assert len(report["imp"]["test_accuracies"]) == 3  # rounds 0, 1, 2

    targets = report["targets"]
    for name in ("resnet50_masked_images_per_s", "resnet50_masked_within_5_percent_of_dense"):
        assert set(targets[name]) >= {"target", "value", "met"}
        assert targets[name]["met"] is None  # tiny sizes are not judged against the targets
    assert report["wall_seconds"] > 0


def test_the_full_check_refuses_to_run_without_a_gpu(tmp_path):
    from lth_tf.keras import tf

    if tf.config.list_physical_devices("GPU"):
        pytest.skip("a GPU is visible: the full check would run")
    out = tmp_path / "device_check.json"
    result = subprocess.run(
        [sys.executable, SCRIPT, f"--out={out}"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": ROOT},
        cwd=ROOT,
        timeout=300,
    )
    assert result.returncode == 2
    assert "no GPU is visible" in result.stderr and "--tiny" in result.stderr
    assert not out.exists()
