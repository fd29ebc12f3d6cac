"""Fuzzing the entry points with bad flag values and damaged files (a seeded generator).

Every case is input that cannot make sense: random values drawn from each flag's
invalid domain (infinite, NaN, negative, out-of-range rates and densities, paths
where names are expected, unknown choices, malformed durations, npz files whose
labels, images or splits make no sense), and truncated or garbled config.json,
summary.json and npz files of a copy of a finished run. For each, the entry point
(imp, branch, stability, export, report; in-process: main with parsed flags, as
app.run calls it) must
  - refuse it with exit code 2 and a message, without a traceback;
  - leave the finished run byte-identical (every file hashed before and after) and,
    for a bad flag value, write nothing at all (imp: no run directory); in a damaged
    copy, every file that was there stays byte-identical (the damaged one too: it is
    reported, not replaced).
The generator is seeded (FUZZ_SEED): a failure names its case and replays.
"""

import random
import shutil

import conftest
import numpy as np
import pytest
from absl import flags
from entry_points import call, snapshot

FLAGS = flags.FLAGS
FUZZ_SEED = 20
TINY = conftest.tiny_flags(rounds=1, output_rate=1.0, checkpoint_seconds=0)


# ---- the generator: values from each flag's invalid domain -------------------------------------


def _word(rng):
    return "".join(rng.choice("abcxyz_-") for _ in range(rng.randint(1, 8)))


def _non_finite(rng):
    return rng.choice(["inf", "-inf", "nan", "1e999", "-1e999", "NaN", "Infinity"])


def _negative(rng):
    return f"-{rng.uniform(1e-9, 1e3):.6g}"


def _above(rng, bound):
    return f"{bound + rng.uniform(0, 100):.6g}"


def _tiny(rng):
    return f"{10 ** -rng.uniform(6, 300):.3g}"  # below one of LeNet's 49,600 weights


def _path_name(rng, ctx):
    # Absolute paths inside the test's directory: were one accepted, the test would see
    # (and clean) what it wrote.
    return rng.choice(
        [
            "..",
            ".",
            "../" * rng.randint(1, 4) + _word(rng),
            str(ctx["base"] / "/".join(_word(rng) for _ in range(rng.randint(1, 3)))),
            f"{_word(rng)}/{_word(rng)}",
            f"{_word(rng)}\\{_word(rng)}",
        ]
    )


def _bad_duration(rng):
    return rng.choice([f"-{rng.randint(1, 99)}it", _word(rng) + "x", f"{rng.random():.2f}ep"])


def _one_of(*makers):
    return lambda rng, ctx: rng.choice(makers)(rng, ctx)


def _v(fn):
    return lambda rng, ctx: fn(rng)


RATE = _one_of(_v(_non_finite), _v(_negative), lambda r, c: "0")
# (flag, generator of an invalid value); ctx holds the fixture's paths.
IMP_FLAGS = [
    ("lr", RATE),
    ("momentum", _one_of(_v(_non_finite), _v(_negative), lambda r, c: _above(r, 1))),
    ("weight_decay", _one_of(_v(_non_finite), _v(_negative))),
    ("lr_gamma", _one_of(_v(_non_finite), _v(_negative), lambda r, c: _above(r, 1.001))),
    ("prune_fraction", _one_of(_v(_non_finite), _v(_negative), lambda r, c: _above(r, 1))),
    ("output_rate", _one_of(_v(_non_finite), _v(_negative), lambda r, c: _above(r, 5))),
    ("conv_rate", _one_of(_v(_non_finite), _v(_negative), lambda r, c: _above(r, 5))),
    ("target_density", _one_of(_v(_non_finite), _v(_negative), _v(_tiny), lambda r, c: "0")),
    ("batch_size", _one_of(lambda r, c: str(-r.randint(0, 9)), lambda r, c: "100000")),
    ("training_steps", _one_of(_v(_bad_duration), lambda r, c: "0")),
    ("eval_every", _one_of(_v(_bad_duration), lambda r, c: "0ep")),
    ("rewind_step", _one_of(_v(_bad_duration), lambda r, c: f"{r.randint(40, 10**6)}it")),
    ("rounds", lambda r, c: str(-r.randint(1, 9))),
    ("run_name", _path_name),
    ("validation_holdout", _one_of(_v(_negative), lambda r, c: str(r.randint(3000, 10**6)))),
    ("replicates", lambda r, c: str(-r.randint(0, 3))),
    ("steps_per_execution", lambda r, c: str(-r.randint(0, 3))),
    ("arch", _v(_word)),
    ("controls", _v(_word)),
    ("dataset", lambda r, c: r.choice(c["bad_datasets"])),
]
BRANCH_CASES = [
    lambda r, c: ["--kind=" + _word(r)],
    lambda r, c: ["--kind=finetune", "--finetune_lr=" + RATE(r, c)],
    lambda r, c: ["--kind=oneshot", "--densities=" + r.choice(c["bad_densities"])(r)],
    lambda r, c: ["--kind=rewind", "--rewind_step=" + r.choice([_bad_duration(r), "20it"])],
    lambda r, c: ["--kind=rewind"],
    lambda r, c: ["--kind=rewind", "--rewind_step=10it", f"--rounds={r.randint(60, 500)}"],
    lambda r, c: ["--kind=lr_rewind", f"--batch_size={r.randint(1, 31)}"],
    lambda r, c: ["--kind=lr_rewind", "--rounds=0"],
]
STABILITY_CASES = [
    lambda r, c: ["--branch=" + r.choice([_path_name(r, c), _word(r)])],
    lambda r, c: [f"--round={r.randint(2, 99)}"],
    lambda r, c: ["--rewind_steps=" + r.choice([_bad_duration(r), f"{r.randint(40, 10**5)}it"])],
    lambda r, c: ["--subnetwork=" + _word(r)],
    lambda r, c: [f"--num_alphas={r.randint(-3, 1)}"],
    lambda r, c: [f"--repeats={r.randint(-3, 0)}"],
]
EXPORT_CASES = [
    lambda r, c: [f"--round={r.randint(2, 99)}"],
    lambda r, c: [f"--round={-r.randint(1, 9)}"],
    lambda r, c: [f"--eval_examples={-r.randint(1, 9)}"],
    lambda r, c: [f"--run_dir={c['run_dir']}"],  # twice
]
REPORT_CASES = [
    lambda r, c: [f"--out={r.choice(c['other_runs'])}"],
    lambda r, c: [f"--run_dir={c['other']}", f"--out={r.choice(c['other_runs'])}"],
]


def _bad_densities():
    return [
        _non_finite,
        _negative,
        _tiny,
        lambda r: _above(r, 1),
        lambda r: r.choice(["0", "1", "0.5,0.5", _word(r)]),
    ]


def _garble(rng, blob: bytes, json_file: bool) -> bytes:
    """A damaged copy of blob that no reader can take for a good one.

    Truncated anywhere before its end (an npz loses its zip directory, which is at
    the end; JSON is cut before its closing brace), or for JSON also overwritten from
    its first byte with bytes no JSON document starts with. (A bit flip may leave
    valid JSON with another value, or touch an unused zip header field: not damage
    a reader can see, so not generated.)
    """
    end = len(blob.rstrip()) - 1 if json_file else len(blob) - 1
    if json_file and rng.random() < 0.5:
        junk = bytes(rng.choice(b"x#!?\x00\xff") for _ in range(rng.randint(1, 32)))
        return junk + blob[len(junk) :]
    return blob[: rng.randint(0, end)]


def _bad_npz_files(tmp):
    """npz datasets whose contents cannot make sense (each refused by lth_tf.data.load_npz)."""
    rng = np.random.default_rng(0)

    def write(name, **override):
        arrays = dict(
            x_train=rng.integers(0, 256, (40, 8, 8), dtype=np.uint8),
            y_train=np.arange(40) % 4,
            x_test=rng.integers(0, 256, (10, 8, 8), dtype=np.uint8),
            y_test=np.arange(10) % 4,
        )
        arrays.update(override)
        np.savez(tmp / name, **arrays)
        return f"npz:{tmp / name}"

    big = (np.arange(40) % 4).astype(np.uint64)
    big[0] = 2**63 + 1
    stray = np.arange(40) % 4
    stray[3] = 200000
    out = [
        write("uint64.npz", y_train=big),
        write("stray.npz", y_train=stray),
        write("declared.npz", y_train=stray, num_classes=np.int64(10)),
        write("empty_test.npz", x_test=np.zeros((0, 8, 8), np.uint8), y_test=np.zeros(0, int)),
        write(
            "zero.npz",
            x_train=np.zeros((40, 0, 0), np.uint8),
            x_test=np.zeros((10, 0, 0), np.uint8),
        ),
        write("float_labels.npz", y_train=np.arange(40) % 4 + 0.5),
        f"npz:{tmp / 'missing.npz'}",
    ]
    (tmp / "garbage.npz").write_bytes(b"PK\x03\x04 not a zip")
    out.append(f"npz:{tmp / 'garbage.npz'}")
    return out + ["synthetic:0x0:10", "synthetic:8x8x1:1", "svhn"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One finished tiny run (rounds 0 and 1), other runs to protect, and bad inputs."""
    base = tmp_path_factory.mktemp("fuzz")
    root = base / "root"
    code, err = call("imp", *TINY, f"--root_dir={root}", "--run_name=r")
    assert code == 0, err[-3000:]
    run_dir = str(root / "r")
    other = base / "others" / "other"
    shutil.copytree(run_dir, other)
    (other / "report.md").write_text("the other run's report")
    shutil.copytree(run_dir, base / "others" / "group" / "replicate_1")
    data = base / "data"
    data.mkdir()
    return {
        "base": base,
        "root": str(root),
        "run_dir": run_dir,
        "other": str(other),
        "other_runs": [
            str(other),
            str(other / "round_01"),
            str(base / "others" / "group"),
            str(base / "others" / "group" / "replicate_1"),
            run_dir + "/round_00",
        ],
        "bad_datasets": _bad_npz_files(data),
        "bad_densities": _bad_densities(),
    }


def _cases(ctx, seed=FUZZ_SEED):
    """Every generator once (every bad dataset too), then as many random draws again."""
    rng = random.Random(seed)
    imp_cases = [f"--{flag}={make(rng, ctx)}" for flag, make in IMP_FLAGS]
    imp_cases += [f"--dataset={d}" for d in ctx["bad_datasets"]]
    for _ in range(len(IMP_FLAGS)):
        flag, make = rng.choice(IMP_FLAGS)
        imp_cases.append(f"--{flag}={make(rng, ctx)}")
    cases = [("imp", [*TINY, flag]) for flag in imp_cases + ["positional"]]
    for name, table in (
        ("branch", BRANCH_CASES),
        ("stability", STABILITY_CASES),
        ("export", EXPORT_CASES),
        ("report", REPORT_CASES),
    ):
        for make in table + [rng.choice(table) for _ in table]:
            cases.append((name, [f"--run_dir={ctx['run_dir']}", *make(rng, ctx)]))
    return cases


def test_bad_flag_values_are_refused_with_exit_code_2_and_change_nothing(finished, tmp_path):
    before = snapshot(finished["base"])
    failures = []
    cases = _cases(finished)
    assert len(cases) > 80
    for i, (name, argv) in enumerate(cases):
        if name == "imp":
            argv = [*argv, f"--root_dir={tmp_path / f'root_{i}' / 'sub'}"]
        code, err = call(name, *argv)
        if code != 2 or "Traceback" in err or not err.strip():
            failures.append(f"{name} {' '.join(argv[-2:])}: exit {code}: {err[-500:]}")
        elif snapshot(tmp_path) or snapshot(finished["base"]) != before:
            failures.append(f"{name} {' '.join(argv[-2:])}: files written or changed")
            shutil.rmtree(tmp_path)
            tmp_path.mkdir()
    assert not failures, "\n".join(failures)


# (file of the run, entry points that read it, their extra flags)
DAMAGED = [
    ("config.json", ["report", "export", "stability", "branch", "imp"]),
    ("round_01/summary.json", ["report", "export"]),
    ("round_01/masks.npz", ["stability", "export"]),
    ("round_00/checkpoints/rewind.npz", ["stability"]),
    ("round_00/checkpoints/final.npz", ["branch"]),
]
EXTRA = {
    "report": [],
    "export": ["--round=1"],
    "stability": ["--round=1", "--rewind_steps=20it"],
    "branch": ["--kind=lr_rewind", "--rounds=1"],
}


def test_damaged_files_are_refused_with_exit_code_2_and_keep_every_file(finished, tmp_path):
    rng = random.Random(FUZZ_SEED + 1)
    before = snapshot(finished["base"])
    failures = []
    for i, (relative, readers) in enumerate(DAMAGED):
        for name in readers:
            copy = tmp_path / f"c{i}_{name}" / "run"
            shutil.copytree(finished["run_dir"], copy)
            target = copy / relative
            target.write_bytes(_garble(rng, target.read_bytes(), relative.endswith(".json")))
            damaged = snapshot(copy.parent)
            if name == "imp":
                argv = [*TINY, f"--root_dir={copy.parent}", "--run_name=run"]
            else:
                argv = [f"--run_dir={copy}", *EXTRA[name]]
            code, err = call(name, *argv)
            if code != 2 or "Traceback" in err or not err.strip():
                failures.append(f"{name} on damaged {relative}: exit {code}: {err[-500:]}")
                continue
            after = snapshot(copy.parent)
            changed = sorted(k for k in damaged if after.get(k) != damaged[k])
            if changed:
                failures.append(f"{name} on damaged {relative}: changed {changed}")
    assert snapshot(finished["base"]) == before
    assert not failures, "\n".join(failures)
