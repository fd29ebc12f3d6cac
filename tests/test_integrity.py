"""Contracts of the files later steps trust: nothing edited, truncated or non-finite is used.

Every JSON file that a later step reads (config.json, summary.json, sparsity.json,
branch.json, interpolation.json, export.json) is checked against its schema and
carries a sha256 per field; weight files refuse NaN and infinities. The errors
name the file and the field (or array). Files written before the digests existed
still open. No model is built here: every run is a few files written by the test.
"""

import json

import numpy as np
import pytest

from lth_tf import files, paths, reporting, rundir, schemas
from lth_tf.config import make_config

TINY = dict(dataset="synthetic:8x8x1:4", batch_size=32, training_steps="40it", eval_every="20it")


def _summary(r, density, acc):
    return {
        "round": r,
        "branch": "imp",
        "density": density,
        "test_accuracy": acc,
        "best_validation_accuracy": acc,
        "best_validation_step": 20,
        "early_stopping_step": 20,
        "start_step": 0,
        "end_step": 40,
    }


@pytest.fixture()
def run(tmp_path):
    """A run directory as lth_tf writes it: config.json and two finished rounds."""
    config = make_config("lenet_300_100", rounds=1, **TINY)
    run_dir = str(tmp_path / "run")
    rundir.open_run_dir(config, run_dir)
    for r, density, acc in ((0, 1.0, 0.91), (1, 0.8, 0.92)):
        files.write_json(paths.summary_file(paths.round_dir(run_dir, r)), _summary(r, density, acc))
    return config, run_dir


def _edit(path, old, new):
    with open(path) as f:
        text = f.read()
    assert old in text
    with open(path, "w") as f:
        f.write(text.replace(old, new))


def _without_digests(path, **changes):
    """Rewrites path as an older lth_tf wrote it (no digests), with changes (None: removed)."""
    with open(path) as f:
        d = json.load(f)
    d.pop("__sha256__", None)
    for key, value in changes.items():
        if value is None:
            d.pop(key)
        else:
            d[key] = value
    with open(path, "w") as f:
        json.dump(d, f)


# ---- JSON: edits, types, missing fields, truncation ---------------------------------------


def test_an_edited_config_json_is_refused_naming_the_file_and_the_field(run):
    config, run_dir = run
    path = paths.config_file(run_dir)
    _edit(path, '"prune_fraction": 0.2', '"prune_fraction": 0.5')
    for read in (rundir.load_config, rundir.config_json):
        with pytest.raises(files.EditedFileError, match=r"config\.json.*'prune_fraction'") as info:
            read(run_dir)
        assert info.value.field == "prune_fraction"
        assert "Delete" not in str(info.value)
    # imp --prune_fraction=0.5 in this directory: refused too, though the file now says 0.5.
    with pytest.raises(files.EditedFileError, match="prune_fraction"):
        rundir.open_run_dir(
            make_config("lenet_300_100", prune_fraction=0.5, rounds=1, **TINY), run_dir
        )


def test_an_edited_summary_is_not_reported(run):
    _, run_dir = run
    path = paths.summary_file(paths.round_dir(run_dir, 1))
    _edit(path, '"test_accuracy": 0.92', '"test_accuracy": 0.99')
    with pytest.raises(files.EditedFileError, match=r"round_01/summary\.json.*'test_accuracy'"):
        reporting.write_report(run_dir)
    assert not files.exists(paths.report_file(run_dir))


def test_a_missing_field_and_a_wrong_type_name_the_file_and_the_field(run):
    _, run_dir = run
    summary = paths.summary_file(paths.round_dir(run_dir, 1))
    _without_digests(summary, test_accuracy=None)
    with pytest.raises(files.DamagedFileError, match=r"summary\.json.*'test_accuracy' is missing"):
        rundir.finished_rounds(run_dir)
    config = paths.config_file(run_dir)
    _without_digests(config, lr="0.001")
    with pytest.raises(
        files.DamagedFileError, match=r"config\.json.*'lr' is '0\.001' \(a string\)"
    ):
        rundir.load_config(run_dir)
    _without_digests(config, lr=None)
    with pytest.raises(files.DamagedFileError, match=r"config\.json.*'lr' is missing"):
        rundir.load_config(run_dir)


def test_a_truncated_json_file_is_an_error_naming_it(run):
    _, run_dir = run
    for path in (paths.config_file(run_dir), paths.summary_file(paths.round_dir(run_dir, 0))):
        with open(path) as f:
            text = f.read()
        with open(path, "w") as f:
            f.write(text[: len(text) // 2])
    with pytest.raises(files.DamagedFileError, match=r"config\.json is not valid JSON") as info:
        rundir.load_config(run_dir)
    assert "Delete" not in str(info.value)  # a run's settings cannot be recomputed
    with pytest.raises(files.DamagedFileError, match=r"round_00/summary\.json is not valid JSON"):
        rundir.finished_rounds(run_dir)


def test_files_written_before_the_digests_still_open_and_are_still_checked(run):
    config, run_dir = run
    for path in (paths.config_file(run_dir), paths.summary_file(paths.round_dir(run_dir, 1))):
        _without_digests(path)
    with open(paths.config_file(run_dir), "w") as f:
        f.write(config.to_json())  # exactly as an older lth_tf wrote it
    assert rundir.load_config(run_dir) == config
    rundir.open_run_dir(config, run_dir)
    assert rundir.finished_rounds(run_dir)["imp"][1]["test_accuracy"] == 0.92
    _without_digests(paths.summary_file(paths.round_dir(run_dir, 1)), density="80%")
    with pytest.raises(files.DamagedFileError, match="'density' is '80%'"):
        rundir.finished_rounds(run_dir)


def test_the_digests_are_not_part_of_what_is_read(run):
    config, run_dir = run
    assert "__sha256__" not in rundir.config_json(run_dir)
    assert rundir.finished_rounds(run_dir)["imp"][0] == _summary(0, 1.0, 0.91)
    with open(paths.config_file(run_dir)) as f:
        assert "__sha256__" in json.load(f)


def test_config_json_schema_follows_the_run_config_fields():
    import dataclasses

    from lth_tf.config import RunConfig

    schema = schemas.config_schema()
    fields = {f.name for f in dataclasses.fields(RunConfig)}
    assert set(schema.required) | set(schema.optional) == fields | {"format_version"}
    assert {"arch", "lr", "batch_size"} <= set(schema.required)  # no default
    assert "conv_rate" in schema.optional  # added later, with a default


def test_other_json_files_are_not_given_digests(tmp_path):
    path = str(tmp_path / "report.json")
    files.write_json(path, {"a": 1})
    assert files.read_json(path) == {"a": 1}
    with open(path) as f:
        assert json.load(f) == {"a": 1}


# ---- weights: NaN and infinity ---------------------------------------------------------------


def _write_with_valid_checksum(path, arrays):
    # What a damaged or foreign writer could leave: non-finite values, a matching checksum.
    payload = {**arrays, "__sha256__": np.frombuffer(files._checksum(arrays).encode(), np.uint8)}
    with open(path, "wb") as f:
        np.savez(f, **payload)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_weights_are_refused_on_read_naming_the_file_and_the_array(tmp_path, bad):
    path = str(tmp_path / "final.npz")
    kernel = np.ones((3, 2), np.float32)
    kernel[1, 0] = bad
    _write_with_valid_checksum(path, {"fc1/bias": np.zeros(2, np.float32), "fc1/kernel": kernel})
    with pytest.raises(files.NonFiniteError, match=r"final\.npz.*'fc1/kernel' holds 1 NaN"):
        files.read_npz(path)


def test_non_finite_weights_are_refused_on_write_and_nothing_is_written(tmp_path):
    path = str(tmp_path / "final.npz")
    with pytest.raises(files.NonFiniteError, match=r"final\.npz was not written.*'fc1/kernel'"):
        files.write_npz(path, {"fc1/kernel": np.array([1.0, np.nan], np.float32)})
    assert not files.exists(path)
    files.write_npz(path, {"fc1/kernel": np.array([1.0, 0.0], np.float32), "n": np.arange(3)})
    assert files.read_npz(path)["fc1/kernel"].tolist() == [1.0, 0.0]
