"""A researcher's first hour: commands as the README writes them work as written."""

import os
import subprocess
import sys

import conftest
import pytest
from absl import flags

from lth_tf import flagdefs, paths

FLAGS = flags.FLAGS


@pytest.fixture()
def parse_flags():
    """Parses argv with every entry point's flags defined; restores them after."""
    flagdefs.define_imp_flags()
    flagdefs.define_stability_flags()
    flagdefs.define_export_flags()
    flagdefs.define_report_flags()
    flagdefs.define_branch_flags()

    def _parse(*argv):
        FLAGS.unparse_flags()
        FLAGS(["prog", *argv])
        return FLAGS

    yield _parse
    FLAGS.unparse_flags()


def test_expand_expands_home_and_variables_in_local_paths(monkeypatch):
    monkeypatch.setenv("HOME", "/home/alice")
    monkeypatch.setenv("LTH_DATA", "/data/lth")
    assert paths.expand("~/tensorflow_datasets") == "/home/alice/tensorflow_datasets"
    assert paths.expand("$LTH_DATA/runs") == "/data/lth/runs"
    assert paths.expand("${LTH_DATA}/x") == "/data/lth/x"
    assert paths.expand("runs") == "runs"
    assert paths.expand(None) is None


@pytest.mark.parametrize("url", ["gs://bucket/~/$HOME/tfds", "s3://b/~x", "http://h/~u/$X"])
def test_expand_leaves_urls_alone(monkeypatch, url):
    monkeypatch.setenv("HOME", "/home/alice")
    monkeypatch.setenv("X", "expanded")
    assert paths.expand(url) == url


def test_every_path_flag_is_expanded_as_the_readme_writes_it(monkeypatch, parse_flags):
    """The README's `--data_dir=~/tensorflow_datasets`: the shell does not expand it."""
    monkeypatch.setenv("HOME", "/home/alice")
    monkeypatch.setenv("RUNS", "/scratch/runs")
    f = parse_flags(
        "--data_dir=~/tensorflow_datasets",
        "--root_dir=$RUNS",
        "--run_dir=~/runs/a",
        "--run_dir=${RUNS}/b",
        "--out=~/report",
        "--dataset=npz:~/arrays.npz",
    )
    assert f.data_dir == "/home/alice/tensorflow_datasets"
    assert f.root_dir == "/scratch/runs"
    assert f.run_dir == ["/home/alice/runs/a", "/scratch/runs/b"]
    assert f.out == "/home/alice/report"
    assert f.dataset == "npz:/home/alice/arrays.npz"
    assert flagdefs.config_from_flags().data_dir == "/home/alice/tensorflow_datasets"


def test_path_flags_keep_gs_urls_and_dataset_names(monkeypatch, parse_flags):
    monkeypatch.setenv("HOME", "/home/alice")
    f = parse_flags("--data_dir=gs://bucket/~/tfds", "--root_dir=gs://b/$HOME", "--dataset=cifar10")
    assert (f.data_dir, f.root_dir, f.dataset) == ("gs://bucket/~/tfds", "gs://b/$HOME", "cifar10")
    assert os.path.isabs(parse_flags("--dataset=npz:~/a.npz").dataset[4:])


class _DataLoaded(Exception):
    """Raised by the mock data loader: the test has seen what it needed."""


@pytest.fixture()
def moved_run(tmp_path, tiny_config, monkeypatch):
    """A run whose config.json names a data_dir of the host it was made on.

    Its round 0 looks finished (export checks the files before loading data);
    lth_tf.data.load is replaced by a mock that records its data_dir and stops.
    """
    import numpy as np

    from lth_tf import data as data_lib
    from lth_tf import files, rundir

    run_dir = str(tmp_path / "run")
    config = tiny_config(dataset="tfds:mnist", data_dir="/old_host/tensorflow_datasets")
    rundir.open_run_dir(config, run_dir)
    rd = paths.round_dir(run_dir, 0)
    files.write_npz(paths.masks_file(rd), {"x": np.ones(1)})
    files.write_npz(paths.checkpoint_file(rd, "final"), {"x": np.ones(1)})
    files.write_json(paths.summary_file(rd), {"round": 0, "density": 1.0, "test_accuracy": 0.5})
    seen = []

    def load(name, data_dir=None, **kwargs):
        seen.append(data_dir)
        raise _DataLoaded(data_dir)

    monkeypatch.setattr(data_lib, "load", load)
    return run_dir, seen


@pytest.mark.parametrize("command", ["stability", "export"])
def test_stability_and_export_read_the_data_from_data_dir(moved_run, parse_flags, command):
    """--data_dir replaces config.json's for this command; without it, config.json's is used."""
    from lth_tf import export, stability

    run_dir, seen = moved_run
    main = {"stability": stability._stability, "export": lambda: export._export(FLAGS)}[command]
    for argv, expected in (
        ((), "/old_host/tensorflow_datasets"),
        (("--data_dir=/new_host/tfds",), "/new_host/tfds"),
    ):
        parse_flags(f"--run_dir={run_dir}", "--round=0", *argv)
        with pytest.raises(_DataLoaded):
            main()
        assert seen[-1] == expected
    # config.json is not rewritten: the override was this invocation's only.
    from lth_tf import rundir

    assert rundir.load_config(run_dir).data_dir == "/old_host/tensorflow_datasets"


@pytest.mark.parametrize("command", ["stability", "branch"])
def test_stability_and_branch_take_the_speed_settings_too(
    moved_run, parse_flags, monkeypatch, command
):
    """The copies and branch rounds train with this command's --jit_compile and
    --steps_per_execution (speed only), over config.json's."""
    from lth_tf import branch, rounds, stability

    run_dir, _ = moved_run
    configs = []

    def experiment(config, *args, **kwargs):
        configs.append(config)
        raise _DataLoaded()

    monkeypatch.setattr(rounds, "Experiment", experiment)
    main = {"stability": stability._stability, "branch": branch._branch}[command]
    parse_flags(
        f"--run_dir={run_dir}",
        "--kind=rewind",
        "--data_dir=/new_host/tfds",
        "--jit_compile",
        "--steps_per_execution=2",
    )
    with pytest.raises(_DataLoaded):
        main()
    (config,) = configs
    assert (config.data_dir, config.jit_compile, config.steps_per_execution) == (
        "/new_host/tfds",
        True,
        2,
    )


def test_data_dir_and_speed_settings_are_not_part_of_a_run():
    from lth_tf import config as config_lib

    assert set(flagdefs.OVERRIDE_FIELDS) <= set(config_lib.NON_IDENTITY_FIELDS)


@pytest.mark.parametrize("arch", ["lenet_300_100", "conv2", "resnet20"])
@pytest.mark.parametrize("fraction", [1.5, 1.0, -0.5])
def test_a_bad_prune_fraction_is_reported_as_itself_not_as_a_rate(arch, fraction):
    """The rates multiply the fraction: the fraction is checked first."""
    from lth_tf import config as config_lib

    with pytest.raises(ValueError, match=r"^prune_fraction: got"):
        config_lib.make_config(arch, prune_fraction=fraction)


@pytest.mark.parametrize("flag", ["--help", "--helpshort", "--helpfull"])
def test_help_exits_0(parse_flags, flag, capsys):
    from absl import app

    app.define_help_flags()  # as app.run does
    with pytest.raises(SystemExit) as e:
        flagdefs.parse_flags(["prog", flag])
    assert e.value.code == 0
    assert "--" in capsys.readouterr().out


def test_a_usage_error_is_one_paragraph_without_the_help(parse_flags, capsys):
    from lth_tf import imp

    parse_flags("--arch=lenet_300_100", "--prune_fraction=1.5", "--print_config")
    assert flagdefs.brief_usage_errors(imp.main)(["imp"]) == 2
    captured = capsys.readouterr()
    assert captured.err == (
        "error: prune_fraction: got 1.5; expected a fraction in (0, 1), e.g. 0.2.\n"
        "Pass --helpshort to see the main flags, --helpfull for every flag.\n"
    )
    assert captured.out == ""
    assert flagdefs.brief_usage_errors(imp.main)(["imp", "extra"]) == 2
    assert capsys.readouterr().err.startswith("error: Unexpected arguments ['extra']")


def test_imp_helpshort_lists_the_flags_a_first_run_sets():
    result = subprocess.run(
        [sys.executable, "-m", "lth_tf.imp", "--helpshort"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    listed = {line.split(":")[0].strip() for line in result.stdout.splitlines()}
    for name in flagdefs.IMP_KEY_FLAGS:
        assert f"--{name}" in listed or f"--[no]{name}" in listed, name
    for name in ("training_steps", "eval_every", "batch_size", "lr", "prune_fraction", "strategy"):
        assert f"--{name}" in listed, name
    assert "--momentum" not in listed  # the short list stays short; --helpfull has all


@pytest.mark.parametrize(
    "arch, dataset, made_for",
    [
        ("resnet50", "mnist", "imagenet2012"),
        ("lenet_300_100", "cifar10", "mnist"),
        ("resnet20", "imagenet2012", "cifar10"),
        ("conv2", "tfds:mnist", "cifar10"),
    ],
)
def test_an_arch_on_a_dataset_it_is_not_made_for_is_refused(parse, arch, dataset, made_for):
    with pytest.raises(ValueError, match=f"--arch={arch} --dataset={dataset}") as e:
        parse(f"--arch={arch}", f"--dataset={dataset}")
    assert f"--dataset={made_for}" in str(e.value) and "--allow_any_dataset" in str(e.value)
    c = parse(f"--arch={arch}", f"--dataset={dataset}", "--allow_any_dataset")
    assert (c.arch, c.dataset) == (arch, dataset)
    # Not part of the run: the same pair names the same run with or without the flag.
    assert "allow_any_dataset" not in c.to_json()


@pytest.mark.parametrize(
    "arch, dataset",
    [
        ("lenet_300_100", "mnist"),
        ("lenet_300_100", "tfds:mnist"),
        ("resnet50", "imagenet2012"),
        ("conv6", "cifar10"),
        ("resnet20", "synthetic"),  # shaped like the architecture's dataset
        ("lenet_300_100", "synthetic:8x8x1:4"),  # shapes the user chose
        ("resnet56", "npz:/data/arrays.npz"),
        ("vgg16", "tfds:svhn_cropped"),
        ("tests.byo_example:build", "cifar10"),  # a user's architecture
    ],
)
def test_matching_and_user_chosen_pairs_are_accepted(parse, arch, dataset):
    c = parse(f"--arch={arch}", f"--dataset={dataset}")
    assert (c.arch, c.dataset) == (arch, dataset)


def test_every_recipe_is_accepted_on_its_own_dataset():
    from lth_tf import models, presets

    for arch in models.REGISTRY:
        presets.check_arch_dataset(arch, presets.recipe(arch)["dataset"])


# ---- wording ---------------------------------------------------------------------------

TINY_RUN = conftest.tiny_flags(
    rounds=1, controls="", prune_scope=None, output_rate=None, run_name="r"
)


def _imp(root, *extra) -> tuple[int, str]:
    """Runs imp.main in-process; returns (exit code, what it printed)."""
    import contextlib
    import io

    from lth_tf import imp

    imp.define_flags()
    out = io.StringIO()
    FLAGS.unparse_flags()
    try:
        FLAGS(["imp", *TINY_RUN, f"--root_dir={root}", *extra])
        with contextlib.redirect_stdout(out):
            code = imp.main(["imp"])
    finally:
        FLAGS.unparse_flags()
    return code, out.getvalue()


@pytest.fixture(scope="module")
def three_invocations(tmp_path_factory):
    """A tiny run (1 round), the same command again, then with --rounds=2."""
    root = tmp_path_factory.mktemp("runs")
    return [_imp(root), _imp(root), _imp(root, "--rounds=2")]


def test_the_run_directory_line_counts_devices(three_invocations):
    code, out = three_invocations[0]
    assert code == 0
    line = next(x for x in out.splitlines() if x.startswith("Run directory:"))
    assert line.endswith("(1 device)"), line
    assert "replica" not in line


def test_a_first_run_does_not_speak_of_finished_rounds(three_invocations):
    assert "Already finished" not in three_invocations[0][1]
    assert "already finished" not in three_invocations[0][1]


def test_a_rerun_of_a_finished_run_says_every_round_was_already_done(three_invocations):
    code, out = three_invocations[1]
    assert code == 0
    assert (
        "Every round this command asks for is already finished (imp rounds 0-1): nothing to "
        "train. Add --rounds=N with a larger N to prune further."
    ) in out
    assert "== round" not in out  # nothing trained


def test_extending_a_run_says_which_rounds_are_kept(three_invocations):
    code, out = three_invocations[2]
    assert code == 0
    assert "Already finished, kept as they are: imp rounds 0-1. Training the rest." in out
    assert "== round 2" in out and "== round 1" not in out


def test_one_round_is_singular(parse):
    (line,) = flagdefs.protocol_lines(parse("--rounds=1"))[:1]
    assert "1 round of 20%" in line and "1 rounds" not in line
    from lth_tf import config as config_lib

    with pytest.raises(ValueError, match=r"in 1 round\)") as e:
        config_lib.make_config("conv2", target_density=0.01, rounds=1, conv_rate=2.0)
    assert "round(s)" not in str(e.value)


def test_a_run_dir_that_does_not_exist_is_named_so(tmp_path):
    from lth_tf import reporting, rundir

    missing = str(tmp_path / "nonexistent")
    with pytest.raises(rundir.RunDirError, match="the directory does not exist") as e:
        reporting.write_report(missing)
    assert "config.json" not in str(e.value)
    with pytest.raises(rundir.RunDirError, match="the directory does not exist"):
        rundir.load_config(missing)
    with pytest.raises(rundir.RunDirError, match=r"\(it has no config.json\)"):
        rundir.load_config(str(tmp_path))
    (tmp_path / "file").write_text("x")
    with pytest.raises(rundir.RunDirError, match="it is a file, not a directory"):
        reporting.write_report(str(tmp_path / "file"))
    assert not os.path.exists(missing)
