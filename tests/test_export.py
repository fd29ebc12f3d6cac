"""Contracts of `lth_tf.export`: what a user ships is the network that was trained.

One tiny LeNet run (16x16 random images so the kernels dominate the files,
prune_fraction 0.776 for two rounds: 5% density, the ticket size of the paper's
LeNet figures) is trained and exported once for the module, with all three TFLite
kinds; the SavedModel is then reloaded in a fresh Python that imports only
TensorFlow.
"""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from lth_tf import config as C
from lth_tf import files, paths, rounds, rundir, sparse_export, sparsity, tflite
from lth_tf.keras import tf

ROUND = 2
PRUNE_FRACTION = 0.776  # (1 - 0.776)^2 = 5.0% density after two rounds


def _noop(*args):
    pass


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished run (rounds 0..2), a pristine copy of it, and its export of round 2."""
    cfg = C.make_config(
        "lenet_300_100",
        dataset="synthetic:16x16x1:4",
        batch_size=32,
        training_steps="40it",
        eval_every="20it",
        rewind_step="20it",
        rounds=ROUND,
        prune_fraction=PRUNE_FRACTION,
        verbose=0,
        output_rate=1.0,
    )
    base = tmp_path_factory.mktemp("export")
    run_dir = str(base / "run")
    rundir.open_run_dir(cfg, run_dir)
    rounds.Experiment(cfg, run_dir, checkpoint_seconds=0, log=_noop).run()
    pristine = str(base / "pristine")  # never exported: for the error cases
    shutil.copytree(run_dir, pristine)
    result = sparse_export.export(
        run_dir, round_index=ROUND, tflite=True, tflite_int8=True, log=_noop
    )
    return {"cfg": cfg, "run_dir": run_dir, "pristine": pristine, "result": result}


@pytest.fixture(scope="module")
def trained(run):
    """The in-training (wrapped, masked) model of round 2 and the run's data."""
    experiment = rounds.Experiment(run["cfg"], run["run_dir"], write=False, log=_noop)
    rdir = paths.round_dir(run["run_dir"], ROUND)
    masks = files.read_npz(paths.masks_file(rdir))
    sparsity.set_masks(experiment.model, masks)
    sparsity.set_weights(experiment.model, files.read_npz(paths.checkpoint_file(rdir, "final")))
    return {"model": experiment.model, "data": experiment.data, "masks": masks}


# Runs in a fresh interpreter: TensorFlow only, no lth_tf, tf_keras or tfmot.
_RELOAD = textwrap.dedent(
    """
    import sys
    import numpy as np
    import tensorflow as tf

    saved_model, x_path, out_dir = sys.argv[1:]
    x = np.load(x_path)
    loaded = tf.saved_model.load(saved_model)
    served = loaded.signatures["serving_default"](images=tf.constant(x))
    floats = loaded.signatures["serving_float"](images=tf.constant(x.astype(np.float32)))
    # What a TF Serving client sends: encoded images (PNG: lossless, so the same pixels).
    pngs = tf.stack([tf.io.encode_png(image) for image in x[:16]])
    encoded = loaded.signatures["serving_bytes"](image_bytes=pngs)
    np.save(out_dir + "/uint8.npy", served["probabilities"].numpy())
    np.save(out_dir + "/classes.npy", served["classes"].numpy())
    np.save(out_dir + "/float.npy", floats["probabilities"].numpy())
    np.save(out_dir + "/bytes.npy", encoded["probabilities"].numpy())
    np.save(out_dir + "/bytes_classes.npy", encoded["classes"].numpy())
    np.savez(
        out_dir + "/kernels.npz",
        **{
            v.name.split(":")[0].replace("/", "__"): v.numpy()
            for v in loaded.model_variables
            if v.name.split(":")[0].endswith("kernel")
        },
    )
    banned = ("lth_tf", "tf_keras", "tensorflow_model_optimization")
    print("IMPORTED", sorted(m for m in sys.modules if m.split(".")[0] in banned))
    """
)


@pytest.fixture(scope="module")
def reloaded(run, trained, tmp_path_factory):
    """Outputs and kernels of the exported SavedModel as a fresh `import tensorflow` sees them."""
    out = tmp_path_factory.mktemp("reloaded")
    x = trained["data"].arrays.x_test
    assert x.dtype == np.uint8
    np.save(out / "x.npy", x)
    script = out / "reload.py"
    script.write_text(_RELOAD)
    env = {k: v for k, v in os.environ.items() if k != "TF_USE_LEGACY_KERAS"}
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    proc = subprocess.run(
        [
            sys.executable,
            str(script),
            run["result"]["sparse"]["path"],
            str(out / "x.npy"),
            str(out),
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=str(out),  # not the repository: `import lth_tf` must not be what loads it
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    kernels = dict(np.load(out / "kernels.npz"))
    return {
        "x": x,
        "uint8": np.load(out / "uint8.npy"),
        "float": np.load(out / "float.npy"),
        "classes": np.load(out / "classes.npy"),
        "bytes": np.load(out / "bytes.npy"),
        "bytes_classes": np.load(out / "bytes_classes.npy"),
        "kernels": {k.replace("__", "/"): v for k, v in kernels.items()},
        "stdout": proc.stdout,
    }


def _kernel_for(layer: str, kernels: dict) -> np.ndarray:
    # Exported variable names carry the wrapper's scope, e.g. 'masked_layer_fc1/kernel'.
    found = [k for k in kernels if k == f"{layer}/kernel" or k.endswith(f"_{layer}/kernel")]
    assert len(found) == 1, (layer, sorted(kernels))
    return kernels[found[0]]


def test_savedmodel_loads_in_plain_tensorflow_and_matches_the_trained_model(reloaded, trained):
    assert "IMPORTED []" in reloaded["stdout"], reloaded["stdout"]
    data = trained["data"]
    x = (reloaded["x"].astype(np.float32) / 255.0 - data.mean) / data.std
    expected = tf.nn.softmax(trained["model"](x, training=False), axis=-1).numpy()
    assert reloaded["uint8"].shape == (len(x), data.num_classes)
    np.testing.assert_allclose(reloaded["uint8"], expected, rtol=1e-5, atol=1e-6)
    # serving_float takes the same pixels as floats in [0, 255].
    np.testing.assert_allclose(reloaded["float"], reloaded["uint8"], rtol=1e-6, atol=1e-7)
    # Every signature also answers the class.
    np.testing.assert_array_equal(reloaded["classes"], reloaded["uint8"].argmax(-1))
    # serving_bytes decodes PNG strings (grayscale, 1 channel) to the same answer.
    np.testing.assert_allclose(reloaded["bytes"], reloaded["uint8"][:16], rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(reloaded["bytes_classes"], reloaded["classes"][:16])


def test_exported_kernels_are_zero_exactly_where_the_mask_is(run, reloaded, trained):
    layers = run["result"]["layers"]
    assert len(layers) == len(trained["masks"]) == len(reloaded["kernels"])
    for name, mask in trained["masks"].items():
        kernel = _kernel_for(name, reloaded["kernels"])
        assert kernel.shape == mask.shape
        np.testing.assert_array_equal(kernel == 0, mask == 0, err_msg=name)
        # export.json's per-layer counts, measured from the reloaded model, agree.
        entry = layers[f"{name}/kernel"]  # keyed by the layer's own name
        assert entry["size"] - entry["nonzero"] == int(np.sum(mask == 0))
        assert entry["nonzero"] == int(np.sum(mask != 0))
    summary = files.read_json(paths.summary_file(paths.round_dir(run["run_dir"], ROUND)))
    assert run["result"]["density_all_kernels"] == pytest.approx(summary["density"], abs=1e-6)


def test_exported_accuracy_is_the_recorded_one(run, reloaded, trained):
    summary = files.read_json(paths.summary_file(paths.round_dir(run["run_dir"], ROUND)))
    result = run["result"]
    assert result["recorded_test_accuracy"] == summary["test_accuracy"]
    assert result["exported_test_accuracy"] == pytest.approx(summary["test_accuracy"], abs=1e-6)
    # And independently, from the fresh process's probabilities on the whole test split.
    y = trained["data"].arrays.y_test
    assert np.mean(reloaded["uint8"].argmax(-1) == y) == pytest.approx(
        summary["test_accuracy"], abs=1e-6
    )
    on_disk = files.read_json(paths.export_report_file(run["run_dir"], ROUND))
    assert on_disk["exported_test_accuracy"] == result["exported_test_accuracy"]


def test_sparse_export_compresses_by_about_its_density(run):
    result = run["result"]
    density = result["density_all_kernels"]
    ratio = result["zip_ratio_sparse_over_dense"]
    assert density == pytest.approx((1 - PRUNE_FRACTION) ** ROUND, abs=0.005)
    assert result["sparse"]["zip_bytes"] < result["dense"]["zip_bytes"]
    # The surviving float32 weights are high-entropy and barely compress, the zeros
    # compress to almost nothing, and the graph (saved_model.pb) is the same in both:
    # so the ratio is the density plus a little (the graph, the mask's positions).
    # Measured: 0.153 at 5.0% density. Below the density would mean surviving weights went missing;
    # more than density + 0.2 would mean the zeros are not stored as zeros.
    assert density < ratio < density + 0.2, (ratio, density)
    # Without compression a SavedModel stores every weight, zero or not.
    assert result["raw_ratio_sparse_over_dense"] == pytest.approx(1.0, abs=0.01)


def test_tflite_files_are_written_and_the_sparse_one_scales_with_density(run):
    result = run["result"]
    tfl = result["tflite"]
    assert sorted(tfl) == ["dense", "sparse", "sparse_int8"]
    for kind, entry in tfl.items():
        assert entry["path"] == paths.tflite_file(run["run_dir"], ROUND, kind)
        assert entry["path"].endswith(f"model_{kind}.tflite")
        assert os.path.getsize(entry["path"]) == entry["bytes"]
        assert entry["size_ratio_vs_dense"] == pytest.approx(entry["bytes"] / tfl["dense"]["bytes"])
    # The ordinary TFLite file stores every zero; the sparse format stores the
    # surviving weights and their positions. Measured at 5.0% density: dense 434,044 B,
    # sparse 36,604 B (0.084; 64,044 B, 0.148, before tflite.compact rewrote the 1x4
    # blocks of fc1 weight by weight), sparse int8 weights 31,168 B (0.072; 30,832 B
    # before tflite.dequantize_densified added its ops).
    assert tfl["sparse"]["bytes"] <= 0.15 * tfl["dense"]["bytes"], tfl
    assert tfl["sparse_int8"]["bytes"] < tfl["sparse"]["bytes"], tfl


def test_tflite_accuracy_is_the_savedmodel_accuracy(run):
    result = run["result"]
    n = result["eval_examples"]
    assert n == 512  # the whole synthetic test split
    for kind, entry in result["tflite"].items():
        assert entry["examples"] == n, kind
        assert entry["test_accuracy"] == pytest.approx(
            result["exported_test_accuracy"], abs=0.01
        ), (
            kind,
            entry,
        )


def test_every_tflite_file_loads_in_the_default_interpreter(run):
    for kind, entry in run["result"]["tflite"].items():
        assert entry["loads_by_default"] and entry["resolver"] == "xnnpack", (kind, entry)
        assert "needs" not in entry and entry["notes"] == [], (kind, entry)
        assert entry["runtime"] == tflite.runtime().name


@pytest.mark.parametrize("kind", ["dense", "sparse", "sparse_int8"])
def test_tflite_runs_in_litert_and_agrees_with_the_savedmodel(run, reloaded, kind):
    # As a user loads the file: LiteRT's Interpreter, default options (XNNPACK).
    litert = pytest.importorskip("ai_edge_litert.interpreter")
    interpreter = litert.Interpreter(model_path=run["result"]["tflite"][kind]["path"])
    runner = interpreter.get_signature_runner("serving_default")
    x = reloaded["x"][:64]  # raw uint8 images: the preprocessing is in the file
    out = runner(images=x)
    if kind == "sparse_int8":
        # int8 weights: the probabilities move by the weights' rounding (measured:
        # at most 0.0004, all 64 classes the same), the class only where the top two
        # are that close.
        np.testing.assert_allclose(out["probabilities"], reloaded["uint8"][:64], atol=0.005)
        assert np.mean(out["classes"] == reloaded["classes"][:64]) >= 0.95
    else:
        np.testing.assert_array_equal(out["classes"], reloaded["classes"][:64])
        np.testing.assert_allclose(out["probabilities"], reloaded["uint8"][:64], atol=1e-5)


def test_a_file_the_default_interpreter_refuses_is_reported_with_the_option_it_needs(
    run, tmp_path, monkeypatch
):
    # A flatbuffer schema tflite's rewrites do not know: each file is the converter's
    # own, and its sparse int8 file is refused by XNNPACK. The export says both.
    run_dir = _copy(run, tmp_path)
    monkeypatch.setattr(tflite, "SCHEMA_MODULES", ("lth_tf_no_such_schema",))
    lines = []
    result = sparse_export.export(
        run_dir, round_index=ROUND, tflite_int8=True, eval_examples=32, log=lines.append
    )
    int8 = result["tflite"]["sparse_int8"]
    assert not int8["loads_by_default"] and int8["resolver"] == "builtin", int8
    assert int8["needs"] == tflite.BUILTIN_OPTION
    assert int8["examples"] == 32  # still evaluated, with the builtin kernels
    for kind in ("sparse", "sparse_int8"):
        assert len(result["tflite"][kind]["notes"]) == 1, kind
        assert "lth_tf_no_such_schema" in result["tflite"][kind]["notes"][0]
    assert result["tflite"]["dense"]["notes"] == []
    text = "\n".join(lines)
    assert f"does not load in {tflite.runtime().name}'s default interpreter" in text, text
    assert tflite.BUILTIN_OPTION in text
    assert text.count("the file is the converter's own") == 2, text
    on_disk = files.read_json(paths.export_report_file(run_dir, ROUND))
    assert on_disk["tflite"]["sparse_int8"]["needs"] == tflite.BUILTIN_OPTION


def test_report_gets_an_export_line(run):
    with open(paths.report_file(run["run_dir"])) as f:
        text = f.read()
    assert "## Sparse exports" in text
    section = text.split("## Sparse exports")[1].split("##")[0]
    result = run["result"]
    density = f"{100 * result['density_all_kernels']:.2f}"
    rows = [line for line in section.splitlines() if line.startswith(f"| {ROUND} | {density} |")]
    assert len(rows) == 1, section
    tfl = result["tflite"]
    assert rows[0].endswith(
        f"| {result['zip_ratio_sparse_over_dense']:.3f} | {tfl['dense']['bytes']:,} | "
        f"{tfl['sparse']['bytes']:,} | {tfl['sparse']['size_ratio_vs_dense']:.3f} | "
        f"{tfl['sparse_int8']['bytes']:,} |"
    )


# ---- the default round --------------------------------------------------------------------


def _fake_run(root, rounds_, branches=None) -> str:
    """A run layout with only round_NN/summary.json files (all choose_round reads)."""
    run_dir = str(root)
    for r, (density, acc) in rounds_.items():
        files.write_json(
            paths.summary_file(paths.round_dir(run_dir, r)),
            {"round": r, "density": density, "test_accuracy": acc},
        )
    for branch, items in (branches or {}).items():
        for r, (density, acc) in items.items():
            files.write_json(
                paths.summary_file(paths.round_dir(run_dir, r, branch)),
                {"round": r, "density": density, "test_accuracy": acc},
            )
    return run_dir


def test_choose_round_takes_the_sparsest_round_within_0_2_points(tmp_path):
    run_dir = _fake_run(
        tmp_path / "a",
        {
            0: (1.0, 0.9800),
            1: (0.8, 0.9790),  # 0.1 points below: matching
            2: (0.64, 0.9850),  # above dense: matching
            3: (0.512, 0.9770),  # 0.3 points below: not matching
            4: (0.41, 0.9785),  # 0.15 below: matching, and the sparsest
            5: (0.328, 0.9700),  # sparser, 1 point below
        },
        branches={"random_reinit": {4: (0.41, 0.99), 6: (0.2, 0.99)}},  # not IMP: ignored
    )
    os.makedirs(paths.round_dir(run_dir, 7))  # unfinished (no summary.json): ignored
    best, why = rundir.choose_round(run_dir)
    assert best == 4
    assert "round 4" in why and "41.00%" in why and "98.00%" in why


def test_choose_round_falls_back_to_dense_when_nothing_matches(tmp_path):
    run_dir = _fake_run(tmp_path / "b", {0: (1.0, 0.90), 1: (0.8, 0.89), 2: (0.64, 0.85)})
    assert rundir.choose_round(run_dir)[0] == 0


def test_choose_round_needs_a_finished_dense_round(tmp_path):
    run_dir = _fake_run(tmp_path / "c", {1: (0.8, 0.9)})
    with pytest.raises(rundir.RunDirError, match="no finished dense round"):
        rundir.choose_round(run_dir)


# ---- errors ---------------------------------------------------------------------------


def _copy(run, tmp_path) -> str:
    run_dir = str(tmp_path / "run")
    shutil.copytree(run["pristine"], run_dir)
    return run_dir


def test_export_of_a_missing_round_is_a_clear_error(run, tmp_path):
    run_dir = _copy(run, tmp_path)
    with pytest.raises(sparse_export.ExportError, match=r"Round 9 .* does not exist.*\[0, 1, 2\]"):
        sparse_export.export(run_dir, round_index=9, log=_noop)
    assert not os.path.exists(os.path.join(run_dir, "export"))


def test_export_of_an_unfinished_round_is_a_clear_error(run, tmp_path):
    run_dir = _copy(run, tmp_path)
    rdir = paths.round_dir(run_dir, 3)
    os.makedirs(rdir)
    shutil.copy(paths.masks_file(paths.round_dir(run_dir, 2)), paths.masks_file(rdir))
    with pytest.raises(sparse_export.ExportError, match=r"Round 3 .* is unfinished.*\[0, 1, 2\]"):
        sparse_export.export(run_dir, round_index=3, log=_noop)
    # A round whose summary.json is gone (killed before writing it) is unfinished too.
    os.remove(paths.summary_file(paths.round_dir(run_dir, 2)))
    with pytest.raises(sparse_export.ExportError, match=r"Round 2 .* is unfinished.*\[0, 1\]"):
        sparse_export.export(run_dir, round_index=2, log=_noop)
    assert not os.path.exists(os.path.join(run_dir, "export"))


@pytest.mark.parametrize("kind", ["empty", "missing", "other"])
def test_export_of_something_that_is_not_a_run_is_a_clear_error(tmp_path, kind):
    target = tmp_path / "target"
    if kind == "empty":
        target.mkdir()
    elif kind == "other":
        target.mkdir()
        (target / "notes.txt").write_text("hello")
        os.makedirs(paths.round_dir(str(target), 0))
    with pytest.raises(rundir.RunDirError, match="is not an lth_tf run directory"):
        sparse_export.export(str(target), round_index=0, log=_noop)
    with pytest.raises(rundir.RunDirError, match="is not an lth_tf run directory"):
        sparse_export.export(str(target), log=_noop)  # the default round too
    assert not os.path.exists(target / "export")


def test_export_json_is_valid_and_complete(run):
    with open(paths.export_report_file(run["run_dir"], ROUND)) as f:
        on_disk = json.load(f)
    for key in (
        "round",
        "layers",
        "density_all_kernels",
        "density_prunable",
        "exported_test_accuracy",
        "recorded_test_accuracy",
        "dense",
        "sparse",
        "tflite",
        "zip_ratio_sparse_over_dense",
        "eval_split",
        "eval_examples",
        "signatures",
    ):
        assert key in on_disk, key
    assert on_disk["round"] == ROUND


def test_command_line_export_caps_the_evaluation_with_eval_examples(run, tmp_path):
    run_dir = _copy(run, tmp_path)
    env = {k: v for k, v in os.environ.items()}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [os.getcwd(), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "lth_tf.export",
            f"--run_dir={run_dir}",
            f"--round={ROUND}",
            "--eval_examples=100",
            "--tflite",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "first 100 examples of the test split" in proc.stdout, proc.stdout
    on_disk = files.read_json(paths.export_report_file(run_dir, ROUND))
    assert on_disk["eval_examples"] == 100
    assert sorted(on_disk["tflite"]) == ["dense", "sparse"]  # int8 only with --tflite_int8
    assert all(t["examples"] == 100 for t in on_disk["tflite"].values())
    assert not os.path.exists(paths.tflite_file(run_dir, ROUND, "sparse_int8"))


def test_eval_examples_must_be_positive(run, tmp_path):
    with pytest.raises(ValueError, match="eval_examples=0"):
        sparse_export.export(_copy(run, tmp_path), round_index=ROUND, eval_examples=0, log=_noop)
