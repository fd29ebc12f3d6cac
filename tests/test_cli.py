"""Contracts of the command line: flag names, flagfiles, defaults, clear errors."""

import dataclasses
import os
import subprocess
import sys

import pytest
from absl import flags

from lth_tf import config as config_lib
from lth_tf import flagdefs, models, presets

FLAGS = flags.FLAGS
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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


def test_conv2_flagfile_is_the_2019_protocol_and_the_recipe(parse):
    c = parse(f"--flagfile={ROOT}/flags/conv2_cifar10.cfg")
    assert c == config_lib.make_config(
        "conv2", rounds=20, controls=("random_reinit", "random_prune")
    )
    assert (c.prune_scope, c.conv_rate, c.output_rate, c.validation_holdout) == (
        "layerwise",
        0.5,
        0.5,
        5000,
    )


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
        (["--controls=random_reinit,magic"], "Known controls: random_reinit, random_prune"),
        (["--arch=alexnet"], "Known architectures: lenet_300_100, .*, resnet50"),
        (["--dataset=svhn"], "Known datasets.*npz:PATH"),
        (["--lr_drops=80ep,later"], "lr_drops"),
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


# --- flags defined once, in flagdefs ------------------------------------------------

ENTRY_POINTS = {
    "imp": flagdefs.define_imp_flags,
    "stability": flagdefs.define_stability_flags,
    "export": flagdefs.define_export_flags,
    "report": flagdefs.define_report_flags,
    "branch": flagdefs.define_branch_flags,
}


def test_define_functions_are_idempotent():
    for define in [*ENTRY_POINTS.values(), flagdefs.define_train_flags]:
        define()
        define()  # a second call neither raises DuplicateFlagError nor redefines
    assert "run_dir" in FLAGS and "arch" in FLAGS


@pytest.mark.parametrize("name", sorted(ENTRY_POINTS))
def test_every_entry_point_defines_its_flags_in_flagdefs(name):
    import importlib

    module = importlib.import_module(f"lth_tf.{name}")
    module.define_flags()
    names = flagdefs.flag_names(ENTRY_POINTS[name])
    assert names, name
    for flag in names:
        assert FLAGS.find_module_defining_flag(flag) == "lth_tf.flagdefs", flag
    # No lth_tf module other than flagdefs defines a flag.
    definers = {m for m in FLAGS.flags_by_module_dict() if m.startswith("lth_tf")}
    assert definers == {"lth_tf.flagdefs"}


def test_shared_flags_have_one_definition():
    for define in ENTRY_POINTS.values():
        define()
    names = {n: flagdefs.flag_names(d) for n, d in ENTRY_POINTS.items()}
    assert "run_dir" in names["stability"] & names["export"] & names["report"]
    assert "round" in names["stability"] & names["export"]
    assert {"strategy", "tpu", "num_gpus", "mixed_precision"} <= flagdefs.flag_names(
        flagdefs.define_distribute_flags
    )
    # One definition, in flagdefs (a second DEFINE elsewhere would raise DuplicateFlagError).
    for name in ("run_dir", "round", "strategy", "mixed_precision"):
        assert FLAGS.find_module_defining_flag(name) == "lth_tf.flagdefs"


def test_every_config_field_has_a_flag_and_every_imp_flag_is_a_field_or_process_flag():
    flagdefs.define_imp_flags()
    fields = {f.name for f in dataclasses.fields(config_lib.RunConfig)}
    imp_flags = flagdefs.flag_names(flagdefs.define_imp_flags)
    assert fields - flagdefs.CONFIG_FIELDS_WITHOUT_FLAGS <= imp_flags
    assert imp_flags - fields == set(flagdefs.IMP_PROCESS_FLAGS)
    assert set(flagdefs._CONFIG_FLAGS) == fields - flagdefs.CONFIG_FIELDS_WITHOUT_FLAGS


# --- closed sets are enums ----------------------------------------------------------

ENUMS = {
    "arch": ("architecture", models.ARCHITECTURES),
    "optimizer": ("optimizer", config_lib.OPTIMIZERS),
    "prune_scope": ("prune scope", config_lib.PRUNE_SCOPES),
    "strategy": ("strategy", ("default", "mirrored", "multi_worker", "tpu")),
    "mixed_precision": ("mixed precision", ("bfloat16", "float16")),
}


def test_arch_choices_are_the_model_registry_and_the_recipes():
    assert set(models.ARCHITECTURES) == set(presets.RECIPES)


@pytest.mark.parametrize("name", sorted(ENUMS))
def test_enum_flags_list_their_choices_in_help_and_refuse_others(parse, name):
    kind, choices = ENUMS[name]
    for choice in choices:
        assert choice in FLAGS[name].help
    with pytest.raises(flags.IllegalFlagValueError) as e:
        parse(f"--{name}=nonsense")
    assert f"--{name}=nonsense" in str(e.value)
    assert f"Known {kind}s: {', '.join(choices)}." in str(e.value)


def test_one_name_per_concept():
    for define in ENTRY_POINTS.values():
        define()
    imp = flagdefs.flag_names(flagdefs.define_imp_flags)
    stability = flagdefs.flag_names(flagdefs.define_stability_flags)
    branch = flagdefs.flag_names(flagdefs.define_branch_flags)
    # Singular: one value of the run; plural: a list or a count. imp has both: the
    # run's k (part of its identity) and the list of more k that round 0 records.
    assert "rewind_step" in imp and "rewind_steps" in imp
    assert "rewind_steps" in stability and "rewind_step" not in stability
    assert "rounds" in imp and "round" not in imp
    # A branch names its k and its rounds as imp names the run's.
    assert {"run_dir", "rewind_step", "rounds"} <= branch and not {"round", "rewind_steps"} & branch
    assert "--rewind_steps" in FLAGS["rewind_step"].help
    assert "--rewind_step" in FLAGS["rewind_steps"].help
    assert "--rounds" in FLAGS["round"].help and "--round," in FLAGS["rounds"].help


# --- the protocol a combination of flags chooses ------------------------------------


def test_no_flags_says_it_runs_the_mnist_demo(parse):
    (line,) = flagdefs.protocol_lines(parse())
    assert line.startswith("No --arch: running the MNIST demo (LeNet-300-100 on mnist")
    assert "5ep per round" in line and "15 rounds" in line
    assert "--arch=lenet_300_100 runs the paper's 50K-iteration recipe" in line


def test_an_arch_says_it_runs_the_recipe_on_the_recipes_dataset(parse):
    c = parse("--arch=resnet20", "--rounds=2")
    assert c.dataset == presets.recipe("resnet20")["dataset"] == "cifar10"
    (line,) = flagdefs.protocol_lines(c)
    assert line.startswith("--arch=resnet20: the paper's recipe")
    assert "cifar10 (the recipe's dataset)" in line and "160ep per round" in line


def test_an_arch_on_another_dataset_says_so(parse):
    c = parse("--arch=lenet_300_100", "--dataset=cifar10", "--allow_any_dataset")
    (line,) = flagdefs.protocol_lines(c)[:1]
    assert "cifar10 (the recipe is made for mnist)" in line


@pytest.mark.parametrize(
    "dataset, suggestion",
    [
        ("cifar10", "--arch=conv2, conv4, conv6, vgg16, vgg19, resnet20 or resnet56"),
        ("imagenet2012", "--arch=resnet50"),
        ("synthetic:32x32x3:10", "--arch=lenet_300_100 for the paper's LeNet recipe"),
    ],
)
def test_the_mnist_demo_on_images_that_are_not_mnist_shaped_is_refused(parse, dataset, suggestion):
    with pytest.raises(ValueError, match="without --arch") as e:
        parse(f"--dataset={dataset}")
    assert suggestion in str(e.value) and "Choose the network" in str(e.value)


@pytest.mark.parametrize("dataset", ["tfds:mnist", "synthetic", "synthetic:28x28:10", "npz:x.npz"])
def test_the_mnist_demo_runs_on_mnist_shaped_or_unknown_shaped_data(parse, dataset):
    c = parse(f"--dataset={dataset}")
    assert (c.arch, c.dataset, c.training_steps) == ("lenet_300_100", dataset, "5ep")


def test_an_explicit_arch_may_train_on_any_dataset_when_asked(parse):
    c = parse("--arch=lenet_300_100", "--dataset=cifar10", "--allow_any_dataset")
    assert (c.arch, c.dataset, c.training_steps) == ("lenet_300_100", "cifar10", "50000it")


def test_an_arch_without_rounds_says_how_to_prune(parse):
    c = parse("--arch=conv2")
    assert c.rounds == 0
    note = flagdefs.protocol_lines(c)[-1]
    assert note.startswith("No --rounds or --target_density: training the dense network")
    assert "--rounds=N" in note and "--target_density=D" in note
    assert flagdefs.protocol_lines(parse("--arch=conv2", "--rounds=0"))[-1].startswith(
        "--rounds=0: training the dense network (round 0) only"
    )
    assert len(flagdefs.protocol_lines(parse("--arch=conv2", "--rounds=3"))) == 1


def test_more_rounds_later_continue_the_same_run(parse):
    # What the round-0-only note promises: --rounds does not change the run directory.
    assert parse("--arch=conv2").hash8() == parse("--arch=conv2", "--rounds=5").hash8()


def test_the_no_flag_main_job_is_unchanged(parse):
    # The README's main job: same config, so the same run directory as before.
    c = parse()
    assert c == config_lib.make_config(
        "lenet_300_100",
        training_steps="5ep",
        eval_every="1ep",
        rounds=15,
        controls=("random_reinit",),
        steps_per_execution=100,
        prune_scope="global",  # the demo's rule; the recipe is the 2019 paper's layer-wise
        output_rate=0.0,
    )
    # Pinned: a change of the run identity renames every run directory. (It changed
    # twice, on purpose: jit_compile and steps_per_execution left the identity; then
    # new runs drew a data order per round. --data_order=replay names the run before.)
    assert c.hash8() == "d77a6768"
    assert parse("--data_order=replay").hash8() == "cf60f868"


def test_conv_rate_and_validation_holdout_flags_reach_the_config(parse):
    c = parse("--arch=conv2")
    assert (c.conv_rate, c.output_rate, c.prune_scope, c.validation_holdout) == (
        0.5,
        0.5,
        "layerwise",
        5000,
    )
    c = parse("--arch=conv6", "--conv_rate=1", "--validation_holdout=0")
    assert (c.conv_rate, c.validation_holdout) == (1.0, 0)
    c = parse("--arch=resnet20", "--conv_rate=0.5", "--prune_scope=layerwise")
    assert (c.conv_rate, c.output_rate, c.prune_scope) == (0.5, 1.0, "layerwise")
    assert parse("--arch=resnet20").hash8() == "3d184bf8"  # unset: the recipe's run dir
    with pytest.raises(flags.IllegalFlagValueError):
        parse("--validation_holdout=-1")


def test_stability_parses_a_list_of_rewind_steps():
    flagdefs.define_stability_flags()
    FLAGS.unparse_flags()
    FLAGS(["stability", "--run_dir=r", "--round=2", "--rewind_steps=0,500it,2ep"])
    assert (FLAGS.run_dir, FLAGS.round, FLAGS.rewind_steps) == (["r"], 2, ["0", "500it", "2ep"])
    FLAGS.unparse_flags()
    with pytest.raises(flags.IllegalFlagValueError, match="rewind_steps"):
        FLAGS(["stability", "--run_dir=r", "--rewind_steps=0,2 epochs"])
    FLAGS.unparse_flags()


def test_stability_cli_lists_its_flags_and_analyses_round_0_by_default():
    # A fresh process: --round's default is set by the entry point that defines it.
    result = subprocess.run(
        [sys.executable, "-m", "lth_tf.stability", "--helpshort"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    assert result.returncode == 0 and "--round:" in result.stdout, result.stderr[-2000:]
    for name in flagdefs.flag_names(flagdefs.define_stability_flags):
        assert f"--{name}" in result.stdout or f"--[no]{name}" in result.stdout, name
    round_help = result.stdout[result.stdout.index("--round:") :]
    assert "(default: '0')" in round_help.split("--run_dir")[0]
