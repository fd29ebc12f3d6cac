"""Contracts of the command line: flag names, flagfiles, defaults, clear errors."""

import os
import subprocess
import sys

import pytest
from absl import flags

from lth_tf import flagdefs, imp

FLAGS = flags.FLAGS
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture()
def parse():
    # Every flag imp defines: the ResNet-50 flagfiles set --strategy and --mixed_precision.
    imp.define_flags()

    def _parse(*argv):
        FLAGS.unparse_flags()
        FLAGS(["imp", *argv])
        return flagdefs.config_from_flags()

    yield _parse
    FLAGS.unparse_flags()


def test_no_flags_is_the_mnist_demo(parse):
    c = parse()
    assert (c.arch, c.dataset, c.prune_scope, c.prune_fraction) == (
        "lenet_300_100",
        "mnist",
        "global",
        0.2,
    )
    assert c.rounds >= 8 and c.controls == ("random_reinit",)


def test_an_explicit_arch_gets_the_paper_recipe(parse):
    c = parse("--arch=lenet_300_100")
    assert (c.training_steps, c.batch_size, c.optimizer, c.lr) == ("50000it", 60, "adam", 1.2e-3)


def test_lenet_flagfile_is_the_paper_protocol(parse):
    c = parse(f"--flagfile={ROOT}/flags/lenet300_mnist.cfg")
    assert (c.arch, c.training_steps, c.batch_size, c.lr, c.eval_every) == (
        "lenet_300_100",
        "50000it",
        60,
        1.2e-3,
        "100it",
    )
    assert c.controls == ("random_reinit", "random_prune")


@pytest.mark.parametrize(
    "name, arch, rewind",
    [
        ("resnet20_cifar10", "resnet20", "500it"),
        ("vgg16_cifar10", "vgg16", "1000it"),
    ],
)
def test_cifar_flagfiles(parse, name, arch, rewind):
    c = parse(f"--flagfile={ROOT}/flags/{name}.cfg")
    assert (c.arch, c.dataset, c.rewind_step, c.training_steps) == (
        arch,
        "cifar10",
        rewind,
        "160ep",
    )
    assert (c.optimizer, c.lr, c.momentum, c.weight_decay, c.batch_size) == (
        "sgd",
        0.1,
        0.9,
        1e-4,
        128,
    )
    assert c.lr_drops == ("80ep", "120ep") and c.augment


@pytest.mark.parametrize("kind", ["tpu", "gpu"])
def test_resnet50_flagfiles(parse, kind):
    c = parse(f"--flagfile={ROOT}/flags/resnet50_imagenet_{kind}.cfg")
    assert (c.arch, c.dataset, c.batch_size, c.lr, c.warmup) == (
        "resnet50",
        "imagenet2012",
        1024,
        0.4,
        "5ep",
    )
    assert c.lr_drops == ("30ep", "60ep", "80ep") and c.training_steps == "90ep"
    assert (c.rewind_step, c.target_density, c.rounds) == ("5ep", 0.3, 1)


def test_target_density_alone_means_one_shot(parse):
    c = parse("--arch=resnet20", "--target_density=0.3")
    assert c.rounds == 1


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--rewind_step=5 epochs"], "rewind_step"),
        (["--training_steps=lots"], "training_steps"),
        (["--prune_fraction=1.5"], "prune_fraction"),
        (["--controls=random_reinit,magic"], "controls"),
        (["--arch=alexnet"], "Known architectures"),
        (["--dataset=svhn"], "Known datasets"),
    ],
)
def test_bad_flag_values_are_explained(parse, argv, message):
    with pytest.raises((ValueError, flags.Error), match=message):
        parse(*argv)


def test_the_entry_point_reports_bad_input_without_a_traceback(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "lth_tf.imp",
            "--arch=lenet_300_100",
            "--prune_fraction=1.5",
            f"--root_dir={tmp_path}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    assert result.returncode != 0
    assert "prune_fraction" in result.stderr and "Traceback" not in result.stderr
    assert not list(tmp_path.iterdir())  # nothing written


def test_mixed_precision_and_distribution_flags_reach_the_config(parse):
    from lth_tf import imp

    imp.define_flags()
    c = parse("--arch=resnet50", "--mixed_precision=bfloat16", "--strategy=mirrored")
    assert c.mixed_precision == "bfloat16"
    assert FLAGS.strategy == "mirrored"


def test_target_density_without_arch_is_still_one_shot(parse):
    c = parse("--target_density=0.3")
    assert c.rounds == 1 and c.arch == "lenet_300_100"
