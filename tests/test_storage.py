"""Weight files of pruned rounds are stored sparse and read back bit for bit.

lth_tf.files.write_npz stores a float array that is mostly zeros as its
non-zero entries and a packed bitmap of where they are (compressed), so a
round's files shrink with its density; a round's start.npz and final.npz take
that bitmap from its masks.npz, and a pruned start.npz its values from W_k.
read_npz returns exactly the arrays written, whatever they hold, and still
reads the files of earlier versions (dense, or sparse with their own bitmap).
"""

import io
import os

import numpy as np
import pytest

from lth_tf import files, masks, models, paths, presets, sparsity
from lth_tf.config import make_config
from lth_tf.data.arrays import SYNTHETIC_SHAPES

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
        lambda s: s.__setitem__("__sparse__/k/planes", s["__sparse__/k/planes"] * 2),
        lambda s: s.__setitem__("__sparse__/k/planes", s["__sparse__/k/planes"][4:]),
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


# ---- a round's files: the bitmap once, in masks.npz -------------------------------------

LENET = {"fc1": (784, 300), "fc2": (300, 100), "output": (100, 10)}


def _lenet_round(density):
    """W_k, a round's masks at `density` (output layer dense), its start and a final."""
    w_k = {}
    for name, shape in LENET.items():
        w_k[f"{name}/kernel"] = RNG.normal(0, 0.05, size=shape).astype(np.float32)
        w_k[f"{name}/bias"] = np.zeros(shape[1], np.float32)
    round_masks = {
        n: (RNG.random(s) < density).astype(np.float32) for n, s in LENET.items() if n != "output"
    }
    return w_k, round_masks, _under(w_k, round_masks), _under(_trained(w_k), round_masks)


def _trained(weights):
    return {k: v + RNG.normal(0, 0.01, size=v.shape).astype(v.dtype) for k, v in weights.items()}


def _under(weights, round_masks):
    """`weights` with +0.0 where `round_masks` prune (as lth_tf.rounds applies masks)."""
    out = dict(weights)
    for name, mask in round_masks.items():
        kernel = weights[f"{name}/kernel"]
        out[f"{name}/kernel"] = np.where(mask != 0, kernel, np.zeros((), kernel.dtype))
    return out


def _write_round(rdir, round_masks, start, final, base=None):
    """A pruned round's files, with the references lth_tf.rounds writes them with."""
    masks_path = paths.masks_file(rdir)
    files.write_npz(masks_path, round_masks)
    files.write_npz(paths.checkpoint_file(rdir, "start"), start, base=base, masks=masks_path)
    files.write_npz(paths.checkpoint_file(rdir, "final"), final, masks=masks_path)


def _stored(path):
    with np.load(path) as data:
        return set(data.files)


def test_a_rounds_start_and_final_take_where_from_its_masks_and_read_back_bit_exact(tmp_path):
    w_k, round_masks, start, final = _lenet_round(0.2)
    place = tuple(np.argwhere(round_masks["fc1"] != 0)[0])
    final["fc1/kernel"][place] = np.float32(-0.0)  # a surviving weight that is exactly zero
    base = str(tmp_path / "round_00" / "checkpoints" / "start.npz")
    files.write_npz(base, w_k, compress=False)
    rdir = str(tmp_path / "round_03")
    _write_round(rdir, round_masks, start, final, base=base)
    start_path, final_path = (paths.checkpoint_file(rdir, w) for w in ("start", "final"))
    _assert_bit_exact(files.read_npz(start_path), start)
    _assert_bit_exact(files.read_npz(final_path), final)
    assert np.signbit(files.read_npz(final_path)["fc1/kernel"][place])
    for name in round_masks:  # no bitmap but masks.npz's; start.npz holds no values either
        assert f"__sparse__/{name}/kernel/where" not in _stored(start_path) | _stored(final_path)
        assert f"__sparse__/{name}/kernel/planes" not in _stored(start_path)
    # What the reference saves: about masks.npz's bitmap, in each of the two files.
    alone = str(tmp_path / "alone.npz")
    files.write_npz(alone, final)
    saved = os.path.getsize(alone) - os.path.getsize(final_path)
    assert saved > 0.8 * os.path.getsize(paths.masks_file(rdir))


def test_a_kernel_not_zero_where_its_mask_is_keeps_its_own_bitmap(tmp_path):
    # Storage does not trust the masks: a weight at a pruned place (or a -0.0 there)
    # is kept, with a bitmap of the kernel's own.
    _, round_masks, _, final = _lenet_round(0.05)
    pruned = np.argwhere(round_masks["fc1"] == 0)
    final["fc1/kernel"][tuple(pruned[0])] = 3.0
    final["fc2/kernel"][tuple(np.argwhere(round_masks["fc2"] == 0)[0])] = np.float32(-0.0)
    rdir = str(tmp_path / "round_05")
    _write_round(rdir, round_masks, final, final)
    path = paths.checkpoint_file(rdir, "final")
    _assert_bit_exact(files.read_npz(path), final)
    assert {"__sparse__/fc1/kernel/where", "__sparse__/fc2/kernel/where"} <= _stored(path)


def _earlier_sparse_file(path, arrays, base=None):
    """A file as the earlier sparse format stored it: values as they are, its own bitmap;
    with `base`, a kernel's values left out and read from the base (`__base__`)."""
    stored = {}
    for key, value in arrays.items():
        flat = value.reshape(-1)
        where = flat.view(np.uint32) != 0
        if not key.endswith("/kernel"):
            stored[key] = value
            continue
        stored[f"__sparse__/{key}/where"] = np.packbits(where)
        stored[f"__sparse__/{key}/shape"] = np.asarray(value.shape, np.int64)
        if base is None:
            stored[f"__sparse__/{key}/values"] = flat[where]
    if base is not None:
        relative = os.path.relpath(base, os.path.dirname(path))
        stored["__base__"] = np.frombuffer(relative.encode(), np.uint8)
    checksum = np.frombuffer(files._checksum(arrays).encode(), np.uint8)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        np.savez_compressed(f, **stored, __sha256__=checksum)


def test_sparse_files_of_earlier_versions_still_read(tmp_path):
    w_k, round_masks, start, final = _lenet_round(0.1)
    base = str(tmp_path / "round_00" / "checkpoints" / "start.npz")
    files.write_npz(base, w_k, compress=False)
    rdir = str(tmp_path / "round_02")
    files.write_npz(paths.masks_file(rdir), round_masks)
    _earlier_sparse_file(paths.checkpoint_file(rdir, "start"), start, base=base)
    _earlier_sparse_file(paths.checkpoint_file(rdir, "final"), final)
    _assert_bit_exact(files.read_npz(paths.checkpoint_file(rdir, "start")), start)
    _assert_bit_exact(files.read_npz(paths.checkpoint_file(rdir, "final")), final)


def test_a_missing_damaged_or_changed_masks_file_is_named_with_what_to_do(tmp_path):
    _, round_masks, start, final = _lenet_round(0.2)
    rdir = str(tmp_path / "round_01")
    _write_round(rdir, round_masks, start, final)
    masks_path, final_path = paths.masks_file(rdir), paths.checkpoint_file(rdir, "final")
    with open(masks_path, "rb") as f:
        blob = f.read()
    with open(masks_path, "wb") as f:
        f.write(blob[:-30])
    with pytest.raises(files.MissingBaseError, match=f"{final_path} stores where .* {masks_path}"):
        files.read_npz(final_path)
    os.remove(masks_path)
    with pytest.raises(files.MissingBaseError, match="which cannot be read .* Delete it"):
        files.read_npz(final_path)
    # A valid masks file with other masks: the file read through it says which may have
    # changed, whether the masks keep another number of weights or the same.
    swapped = round_masks["fc2"].copy()
    swapped.flat[[np.argmax(swapped == 0), np.argmax(swapped != 0)]] = [1, 0]
    changed = f"it reads part of its arrays from {masks_path}, which may have changed instead"
    for other in (np.ones_like(swapped), swapped):
        files.write_npz(masks_path, {**round_masks, "fc2": other})
        with pytest.raises(files.DamagedFileError, match=changed):
            files.read_npz(final_path)


def test_a_file_others_refer_to_holds_all_its_arrays(tmp_path):
    _, round_masks, start, final = _lenet_round(0.2)
    rdir = str(tmp_path / "round_01")
    _write_round(rdir, round_masks, start, final)
    final_path = paths.checkpoint_file(rdir, "final")
    with pytest.raises(files.DamagedFileError, match="refers to"):
        files.write_npz(str(tmp_path / "w.npz"), start, base=final_path)


def test_a_rounds_files_shrink_with_its_density(tmp_path):
    # masks.npz: the bitmap (at most 1 bit a weight); final.npz: the values kept plus
    # the dense arrays (biases, the dense output layer); start.npz: nearly nothing.
    kernels = sum(np.prod(s) for n, s in LENET.items() if n != "output")
    dense = 4 * sum(s[0] * s[1] + s[1] for s in LENET.values()) - 4 * kernels
    sizes = {}
    for density in (1.0, 0.2, 0.05, 0.01):
        w_k, round_masks, start, final = _lenet_round(density)
        base = str(tmp_path / f"{density}" / "w_k.npz")
        files.write_npz(base, w_k, compress=False)
        rdir = str(tmp_path / f"{density}" / "round")
        _write_round(rdir, round_masks, start, final, base=base)
        sizes[density] = sum(
            os.path.getsize(p)
            for p in (
                paths.masks_file(rdir),
                *(paths.checkpoint_file(rdir, w) for w in ("start", "final")),
            )
        )
        assert sizes[density] <= kernels / 8 + dense + density * 4 * kernels + 4000, density
    assert sizes[1.0] > sizes[0.2] > sizes[0.05] > sizes[0.01]


# ---- the main job's run directory --------------------------------------------------------

BOUND = 15_000_000  # bytes, the main job's whole run directory (as `du -sb` counts)
# What else it holds: report.md/json, the plot, config.json, every round's summary,
# sparsity, metrics and TensorBoard files, and the directories themselves (0.81 MB).
OTHER_FILES = 1_000_000


def _main_job():
    job = dict(presets.MAIN_JOB)
    return make_config(job.pop("arch"), **job)


def test_the_main_jobs_weight_files_fit_its_15_mb_run_directory(tmp_path):
    # Every weight and mask file the main job writes (presets.MAIN_JOB: its arch, rounds,
    # pruning rule and controls), through write_npz with the references lth_tf.rounds
    # uses, with random values for the trained weights (they compress no better).
    config = _main_job()
    shape, num_classes = SYNTHETIC_SHAPES[config.dataset]

    def fresh(seed):
        model = models.build_model(config.arch, shape, num_classes, seed=seed)
        return sparsity.wrap(model, output_rate=config.output_rate)

    model = fresh(config.seed)
    w_0, layers = sparsity.get_weights(model), sorted(sparsity.wrappers(model))
    rates = sparsity.layer_rates(model, config)
    assert config.rewind_step == "0"  # W_k is W_0, round 0's start.npz (no rewind.npz)
    run_dir = str(tmp_path / "run")
    r0 = paths.round_dir(run_dir, 0)
    round_masks = masks.ones_like({n: w_0[f"{n}/kernel"] for n in layers})
    files.write_npz(paths.masks_file(r0), round_masks)
    w_0_path = paths.checkpoint_file(r0, "start")
    files.write_npz(w_0_path, w_0, compress=False)
    final = _trained(w_0)
    files.write_npz(paths.checkpoint_file(r0, "final"), final, masks=paths.masks_file(r0))
    for r in range(1, config.rounds + 1):
        kernels = {n: final[f"{n}/kernel"] for n in layers}
        round_masks = masks.prune(
            kernels, round_masks, config.prune_fraction, config.prune_scope, rates
        )
        final = _under(_trained(w_0), round_masks)
        _write_round(
            paths.round_dir(run_dir, r), round_masks, _under(w_0, round_masks), final, w_0_path
        )
        for control in config.controls:  # a fresh initialisation under the round's masks
            start = _under(sparsity.get_weights(fresh(config.seed + r)), round_masks)
            rdir = paths.round_dir(run_dir, r, control)
            _write_round(rdir, round_masks, start, _under(_trained(start), round_masks))
    assert masks.density(round_masks) < 0.04  # the main job's last round: 3.5%
    written = sum(
        os.path.getsize(os.path.join(d, f)) for d, _, names in os.walk(run_dir) for f in names
    )
    assert written <= BOUND - OTHER_FILES
