"""Weight files of pruned rounds are stored sparse and read back bit for bit.

lth_tf.files.write_npz stores a float array that is mostly zeros as its
non-zero entries and a packed bitmap of where they are (compressed), so a
round's files shrink with its density; read_npz returns exactly the arrays
written, whatever they hold, and still reads files written dense.
"""

import io
import os

import numpy as np
import pytest

from lth_tf import files

RNG = np.random.default_rng(0)


def _masked(shape, density, dtype):
    weights = RNG.normal(0, 0.05, size=shape).astype(dtype)
    keep = RNG.random(shape) < density
    return np.where(keep, weights, np.zeros((), dtype))


def _assert_bit_exact(read, written):
    assert set(read) == set(written)
    for key, value in written.items():
        assert read[key].dtype == value.dtype and read[key].shape == value.shape, key
        assert read[key].tobytes() == np.ascontiguousarray(value).tobytes(), key


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.float64])
@pytest.mark.parametrize("density", [0.0, 0.001, 0.035, 0.2, 0.5, 0.9, 1.0])
def test_masked_weights_round_trip_bit_exact(tmp_path, dtype, density):
    arrays = {
        "conv/kernel": _masked((3, 3, 4, 8), density, dtype),
        "fc/kernel": _masked((101, 7), density, dtype),
        "fc/bias": RNG.normal(size=7).astype(dtype),
        "bn/gamma": np.ones(8, dtype),
        "scalar": np.asarray(3.0, dtype),
        "empty": np.zeros((0, 4), dtype),
        "steps": np.arange(5, dtype=np.int64),
    }
    path = str(tmp_path / "final.npz")
    files.write_npz(path, arrays, compress=False)
    _assert_bit_exact(files.read_npz(path), arrays)


def test_any_values_at_pruned_places_are_kept(tmp_path):
    # Storage does not trust a mask: a non-zero where a weight was pruned, a -0.0, a
    # denormal and the extremes all come back as written.
    kernel = _masked((300, 100), 0.03, np.float32)
    kernel[0, :4] = [np.float32(-0.0), np.float32(1e-45), np.finfo(np.float32).max, 7.0]
    path = str(tmp_path / "w.npz")
    files.write_npz(path, {"k": kernel}, compress=False)
    read = files.read_npz(path)
    _assert_bit_exact(read, {"k": kernel})
    assert np.signbit(read["k"][0, 0]) and read["k"][0, 1] > 0


def test_a_pruned_kernel_stores_in_a_fraction_of_its_dense_bytes(tmp_path):
    # LeNet-300-100's kernels at 3.5% density (the default run's last round).
    arrays = {
        "fc1/kernel": _masked((784, 300), 0.035, np.float32),
        "fc2/kernel": _masked((300, 100), 0.035, np.float32),
        "output/kernel": _masked((100, 10), 0.2, np.float32),
        "fc1/bias": RNG.normal(size=300).astype(np.float32),
    }
    dense = str(tmp_path / "dense.npz")
    with open(dense, "wb") as f:
        np.savez(f, **arrays)
    path = str(tmp_path / "sparse.npz")
    files.write_npz(path, arrays, compress=False)
    assert os.path.getsize(path) < 0.1 * os.path.getsize(dense)
    # Size follows density: a 20% kernel stores in well under its dense bytes too.
    half = {"k": _masked((784, 300), 0.2, np.float32)}
    files.write_npz(path, half, compress=False)
    assert os.path.getsize(path) < 0.3 * half["k"].nbytes
    # A dense kernel (round 0) stays dense and uncompressed.
    full = {"k": RNG.normal(size=(784, 300)).astype(np.float32)}
    files.write_npz(path, full, compress=False)
    assert full["k"].nbytes < os.path.getsize(path) < full["k"].nbytes + 2000


def test_files_written_dense_before_still_read(tmp_path):
    # The format of earlier versions: every array as it is, and the checksum over them.
    arrays = {"fc/kernel": _masked((50, 20), 0.1, np.float32), "fc/bias": np.zeros(20, np.float32)}
    payload = {**arrays, "__sha256__": np.frombuffer(files._checksum(arrays).encode(), np.uint8)}
    path = str(tmp_path / "final.npz")
    with open(path, "wb") as f:
        np.savez(f, **payload)
    _assert_bit_exact(files.read_npz(path), arrays)


def _rewrite(path, change):
    with np.load(path) as data:
        stored = {k: data[k] for k in data.files}
    change(stored)
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **stored)
    with open(path, "wb") as f:
        f.write(buffer.getvalue())


@pytest.mark.parametrize(
    "change",
    [
        lambda s: s.__setitem__("__sparse__/k/values", s["__sparse__/k/values"] * 2),
        lambda s: s.__setitem__("__sparse__/k/values", s["__sparse__/k/values"][1:]),
        lambda s: s.__setitem__("__sparse__/k/where", s["__sparse__/k/where"][::-1].copy()),
        lambda s: s.__setitem__("__sparse__/k/shape", np.asarray([10**12, 10**6])),
        lambda s: s.pop("__sparse__/k/where"),
    ],
    ids=["values_changed", "values_cut", "where_changed", "shape_changed", "part_missing"],
)
def test_a_changed_sparse_array_is_refused(tmp_path, change):
    path = str(tmp_path / "final.npz")
    files.write_npz(path, {"k": _masked((64, 32), 0.1, np.float32)})
    _rewrite(path, change)
    with pytest.raises(files.DamagedFileError, match="final.npz"):
        files.read_npz(path)


def test_nan_in_a_sparse_array_is_refused_on_write(tmp_path):
    kernel = _masked((64, 32), 0.1, np.float32)
    kernel[np.nonzero(kernel)[0][0], np.nonzero(kernel)[1][0]] = np.nan
    with pytest.raises(files.NonFiniteError, match="'k' holds 1 NaN"):
        files.write_npz(str(tmp_path / "w.npz"), {"k": kernel})
    assert not os.listdir(tmp_path)


def test_a_masked_copy_of_a_base_file_stores_only_where_and_reads_back(tmp_path):
    # A pruned round's start.npz is W_k under its masks: its values are read from W_k.
    w_k = {"fc/kernel": RNG.normal(size=(400, 300)).astype(np.float32), "fc/bias": np.ones(300)}
    base = str(tmp_path / "round_00" / "checkpoints" / "start.npz")
    files.write_npz(base, w_k, compress=False)
    keep = RNG.random((400, 300)) < 0.2
    start = {
        "fc/kernel": np.where(keep, w_k["fc/kernel"], np.float32(0)),
        "fc/bias": w_k["fc/bias"],
    }
    other = {"fc/kernel": _masked((400, 300), 0.2, np.float32), "fc/bias": w_k["fc/bias"]}
    path = str(tmp_path / "branches" / "x" / "round_03" / "checkpoints" / "start.npz")
    files.write_npz(path, start, compress=False, base=base)
    alone = str(tmp_path / "alone.npz")
    files.write_npz(alone, start, compress=False)
    assert os.path.getsize(path) < 0.3 * os.path.getsize(alone)
    _assert_bit_exact(files.read_npz(path), start)
    # Weights that are not the base's (a reinitialised control) keep their values.
    files.write_npz(path, other, compress=False, base=base)
    _assert_bit_exact(files.read_npz(path), other)
    # A base that changed or is gone: the file is refused, naming both.
    files.write_npz(path, start, compress=False, base=base)
    changed = w_k["fc/kernel"].copy()
    changed[keep] += 1
    files.write_npz(base, {**w_k, "fc/kernel": changed}, compress=False)
    with pytest.raises(files.DamagedFileError, match="fails its sha256"):
        files.read_npz(path)
    os.remove(base)
    with pytest.raises(files.DamagedFileError, match=f"{path} stores .* {base}, which cannot"):
        files.read_npz(path)
