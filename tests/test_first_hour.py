"""A researcher's first hour: commands as the README writes them work as written."""

import os

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
