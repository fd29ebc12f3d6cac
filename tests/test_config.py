"""Contracts of durations, recipes and the frozen run config."""

import bisect
import dataclasses
import json

import pytest

from lth_tf import config as config_lib
from lth_tf import presets, steps, subnetworks, train


def test_durations_parse_iterations_and_epochs():
    assert steps.parse("50000it") == steps.Duration(50000, "it")
    assert steps.parse("160ep") == steps.Duration(160, "ep")
    assert steps.parse("0") == steps.Duration(0, "it")
    assert steps.to_steps("5ep", 916) == 4580
    assert steps.to_steps("500it", 916) == 500


@pytest.mark.parametrize("bad", ["5 epochs", "ep", "-3it", "1.5ep", "", "500its"])
def test_malformed_durations_are_rejected_with_the_accepted_forms(bad):
    with pytest.raises(ValueError, match="'50000it', '160ep'"):
        steps.parse(bad, "rewind_step")


def test_make_config_fills_the_recipe_and_keeps_overrides():
    c = config_lib.make_config("resnet20", lr=0.05, batch_size=None)
    assert c.lr == 0.05
    assert c.batch_size == 128  # None keeps the recipe's value
    assert c.lr_drops == ("80ep", "120ep")
    assert c.rewind_step == "500it"


def test_every_recipe_builds_a_valid_config():
    for arch in presets.RECIPES:
        c = config_lib.make_config(arch)
        assert c.arch == arch
        for field, value in presets.recipe(arch).items():  # the recipe, field by field
            expected = tuple(value) if isinstance(value, list) else value
            assert getattr(c, field) == expected, (arch, field)
        # Valid: it survives its own JSON round trip (which checks every field again).
        assert config_lib.RunConfig.from_json(c.to_json()) == c


def test_unknown_arch_lists_the_known_ones():
    with pytest.raises(ValueError, match="lenet_300_100.*resnet50"):
        config_lib.make_config("alexnet")


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("prune_fraction", 1.0, "prune_fraction"),
        ("prune_fraction", 0.0, "prune_fraction"),
        ("target_density", 0.0, "target_density"),
        ("target_density", 1.5, "target_density"),
        ("rounds", -1, "rounds"),
        ("batch_size", 0, "batch_size"),
        ("optimizer", "rmsprop", "optimizer"),
        ("prune_scope", "blockwise", "prune_scope"),
        ("controls", ("random_reinit", "magic"), "controls"),
        ("rewind_step", "5 epochs", "rewind_step"),
        ("steps_per_execution", 0, "steps_per_execution"),
        ("steps_per_execution", 2.5, "steps_per_execution"),
        ("steps_per_execution", True, "steps_per_execution"),
    ],
)
def test_bad_values_get_errors_naming_the_field(field, value, message):
    with pytest.raises(ValueError, match=message):
        config_lib.make_config("lenet_300_100", **{field: value})


def test_config_is_frozen_and_round_trips_through_json():
    c = config_lib.make_config("vgg16", controls=("random_prune",), target_density=0.3, rounds=2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.lr = 1.0
    assert config_lib.RunConfig.from_json(c.to_json()) == c


def test_other_format_version_is_refused():
    text = (
        config_lib.make_config("lenet_300_100")
        .to_json()
        .replace('"format_version": 1', '"format_version": 99')
    )
    with pytest.raises(ValueError, match="format version 99"):
        config_lib.RunConfig.from_json(text)


def test_hash_ignores_fields_that_do_not_change_the_computation():
    a = config_lib.make_config("lenet_300_100", rounds=2)
    b = config_lib.make_config(
        "lenet_300_100", rounds=9, controls=("random_reinit",), data_dir="/x"
    )
    c = config_lib.make_config("lenet_300_100", rounds=2, lr=1e-3)
    assert a.hash8() == b.hash8()
    assert a.hash8() != c.hash8()
    assert a.differences(c) == {"lr": (1.2e-3, 1e-3)}


def test_schedule_resolves_epochs_and_refuses_rewind_past_the_end():
    c = config_lib.make_config("resnet50")
    s = train.resolve(c, steps_per_epoch=1251)
    assert (s.total, s.rewind, s.warmup) == (90 * 1251, 5 * 1251, 5 * 1251)
    assert s.boundaries == (30 * 1251, 60 * 1251, 80 * 1251)
    late = config_lib.make_config("lenet_300_100", training_steps="100it", rewind_step="100it")
    with pytest.raises(ValueError, match="rewind_step=100it"):
        train.resolve(late, steps_per_epoch=10)


def test_rewind_step_must_be_visible_to_the_callback():
    c = config_lib.make_config(
        "lenet_300_100", rewind_step="150it", steps_per_execution=100, eval_every="1000it"
    )
    with pytest.raises(ValueError, match="steps_per_execution=100"):
        train.resolve(c, steps_per_epoch=916)
    # At a period end it is fine: Keras calls back at every period's end.
    ok = config_lib.make_config("resnet50", steps_per_execution=100)
    train.resolve(ok, steps_per_epoch=1251)


def _open_lth_lr(lr, warmup, milestones, gamma, it):
    # open_lth's training/optimizers.py get_lr_schedule: the LambdaLR factor at
    # iteration `it` is gamma ** bisect(milestones, it) * min(1, it / warmup).
    factor = gamma ** bisect.bisect(milestones, it)
    if warmup:
        factor *= min(1.0, it / warmup)
    return lr * factor


def test_learning_rate_schedule_has_warmup_and_drops():
    schedule = train.StepSchedule(0.4, warmup_steps=10, boundaries=(100, 200), gamma=0.1)
    lr = {s: float(schedule(s)) for s in (0, 4, 5, 9, 10, 50, 99, 100, 199, 200, 500)}
    assert lr[0] == 0.0  # open_lth's warm-up: the first step trains at rate 0
    assert lr[4] == pytest.approx(0.16) and lr[5] == pytest.approx(0.2)
    assert lr[9] == pytest.approx(0.36)
    assert lr[10] == lr[50] == lr[99] == pytest.approx(0.4)
    assert lr[100] == lr[199] == pytest.approx(0.04)
    assert lr[200] == lr[500] == pytest.approx(0.004)


@pytest.mark.parametrize("warmup", [10, 7, 1])
def test_the_learning_rate_of_a_new_run_is_open_lths(warmup):
    c = config_lib.make_config(
        "resnet50", lr=0.4, warmup=f"{warmup}it", lr_drops=("20it", "30it"), lr_gamma=0.1
    )
    assert c.warmup_form == "step"
    schedule = train.resolve(c, steps_per_epoch=1)
    lr = train.lr_schedule(c, schedule)
    w = warmup
    for step in sorted({0, w // 2, w, w + 1, 19, 20, 29, 30, 40}):
        expected = _open_lth_lr(0.4, w, [20, 30], 0.1, step)
        assert float(lr(step)) == pytest.approx(expected, rel=1e-6, abs=1e-9), step
    # The optimizer of a round warms up so too.
    optimizer = train.make_optimizer(c, schedule)
    assert optimizer.get_config()["learning_rate"]["config"]["schedule"]["warmup_form"] == "step"


def test_runs_written_before_the_warmup_form_keep_theirs():
    schedule = train.StepSchedule(0.4, warmup_steps=10, warmup_form="step+1")
    lr = {s: float(schedule(s)) for s in (0, 4, 9, 10)}
    assert lr[0] == pytest.approx(0.04) and lr[4] == pytest.approx(0.2)
    assert lr[9] == lr[10] == pytest.approx(0.4)


def test_segments_split_at_evaluation_periods():
    assert train.pieces(0, 300, 100) == [(0, 100, 3)]
    assert train.pieces(50, 300, 100) == [(50, 50, 1), (100, 100, 2)]
    assert train.pieces(0, 250, 100) == [(0, 100, 2), (200, 50, 1)]


def test_with_a_target_density_the_number_of_rounds_is_part_of_the_run():
    one_shot = config_lib.make_config("resnet20", target_density=0.3, rounds=1)
    iterative = config_lib.make_config("resnet20", target_density=0.3, rounds=4)
    assert one_shot.hash8() != iterative.hash8()
    assert "rounds" in one_shot.differences(iterative)


def test_every_recipe_field_is_a_config_field_and_its_dataset_a_known_name():
    from lth_tf import data

    fields = {f.name for f in dataclasses.fields(config_lib.RunConfig)}
    for arch, recipe in presets.RECIPES.items():
        assert set(recipe) <= fields, arch
        data.check_name(recipe["dataset"])  # recipes carry their dataset


def test_closed_sets_of_the_config_are_the_ones_the_flags_offer():
    from lth_tf import flagdefs, models

    flagdefs.define_imp_flags()
    flags = flagdefs.FLAGS
    assert flags["optimizer"].parser.enum_values == list(config_lib.OPTIMIZERS)
    assert flags["prune_scope"].parser.enum_values == list(config_lib.PRUNE_SCOPES)
    assert flags["arch"].parser.enum_values == list(models.ARCHITECTURES)
    for control in subnetworks.CONTROL_NAMES:
        assert control in flags["controls"].help


# Run directory hashes of the recipes written before conv_rate,
# validation_holdout, data_order and warmup_form existed (and after jit_compile
# and steps_per_execution left the identity): the new fields at the values runs
# had before them must not rename them.
HASHES_BEFORE_NEW_FIELDS = {
    "lenet_300_100": "dfd172c9",
    "vgg16": "9ec5ed3e",
    "vgg19": "2f95434a",
    "resnet20": "dd4075e8",
    "resnet56": "0c1ac40c",
    "resnet50": "4d730bc5",
}
# The LeNet recipe's pruning rule was the authors' framework's then; it is the 2019
# paper's since (layer-wise, output at half rate): with the old rule given as flags
# (flags/lenet300_mnist_open_lth.cfg), runs keep their directories.
RULE_BEFORE = {"lenet_300_100": {"prune_scope": "global", "output_rate": 0.0}}


# The recipes' run directories since new runs draw a data order per round (and
# warm up as open_lth does): pinned, so that no later change renames them unnoticed.
HASHES_OF_NEW_RUNS = {
    "lenet_300_100": "3dbf93b6",  # the 2019 paper's layer-wise rule
    "vgg16": "60ad4a80",
    "vgg19": "02df7e69",
    "resnet20": "3d184bf8",
    "resnet56": "c3c9180b",
    "resnet50": "3ae91001",
}


@pytest.mark.parametrize("arch, hash8", sorted(HASHES_BEFORE_NEW_FIELDS.items()))
def test_new_fields_at_their_old_values_keep_existing_run_directories(arch, hash8):
    c = config_lib.make_config(
        arch, **config_lib.DEFAULT_OMITTED_FIELDS, **RULE_BEFORE.get(arch, {})
    )
    assert c.hash8() == hash8
    for name in config_lib.DEFAULT_OMITTED_FIELDS:
        assert name not in c.identity()


@pytest.mark.parametrize("arch, hash8", sorted(HASHES_OF_NEW_RUNS.items()))
def test_new_runs_have_the_papers_data_order_and_warmup_in_their_identity(arch, hash8):
    c = config_lib.make_config(arch)
    assert (c.data_order, c.warmup_form) == ("per_round", "step")
    assert c.hash8() == hash8 != HASHES_BEFORE_NEW_FIELDS[arch]
    assert c.identity()["data_order"] == "per_round"
    # Without a warm-up its form changes nothing computed: not part of the identity.
    assert ("warmup_form" in c.identity()) == (c.warmup != "0")


def test_a_replay_run_without_warmup_is_the_run_directory_it_was():
    old = config_lib.make_config("resnet20", data_order="replay")  # warmup_form: the new one
    assert old.hash8() == HASHES_BEFORE_NEW_FIELDS["resnet20"]
    assert config_lib.make_config("resnet50", data_order="replay").hash8() not in (
        HASHES_BEFORE_NEW_FIELDS["resnet50"],
        HASHES_OF_NEW_RUNS["resnet50"],
    )  # its warm-up computes otherwise


def test_new_fields_set_away_from_their_defaults_change_the_identity():
    base = config_lib.make_config("resnet20")
    for name, value in (("conv_rate", 0.5), ("validation_holdout", 5000)):
        other = config_lib.make_config("resnet20", **{name: value})
        assert other.hash8() != base.hash8()
        assert other.identity()[name] == value
        assert base.differences(other) == {name: (getattr(base, name), value)}
        assert other.differences(base) == {name: (value, getattr(base, name))}


def test_steps_per_execution_unset_means_automatic_and_survives_json():
    c = config_lib.make_config("lenet_300_100")
    assert c.steps_per_execution is None  # train.execution_steps chooses per model
    assert config_lib.RunConfig.from_json(c.to_json()) == c
    one = config_lib.make_config("lenet_300_100", steps_per_execution=1)  # automatic choice off
    assert config_lib.RunConfig.from_json(one.to_json()).steps_per_execution == 1
    assert one.hash8() == c.hash8()  # a speed setting: the same run


def test_a_config_json_written_before_the_new_fields_still_reads():
    c = config_lib.make_config("resnet50", rounds=3)
    d = json.loads(c.to_json())
    for name in config_lib.DEFAULT_OMITTED_FIELDS:
        d.pop(name)
    read = config_lib.RunConfig.from_json(json.dumps(d))
    # Each missing field reads as the value runs had before it existed, not its default.
    assert read == dataclasses.replace(c, **config_lib.DEFAULT_OMITTED_FIELDS)
    assert (read.data_order, read.warmup_form) == ("replay", "step+1")
    assert read.hash8() == HASHES_BEFORE_NEW_FIELDS["resnet50"]


@pytest.mark.parametrize(
    "field, spellings",
    [
        ("rewind_step", ("500", "500it", 500, " 500 it")),
        ("rewind_step", ("0", "0it", "0ep", 0)),
        ("training_steps", ("300", "300it")),
        ("eval_every", ("100", "100it")),
        ("warmup", ("5", "5it")),
        ("lr_drops", (("80", "120ep"), ("80it", "120ep"))),
    ],
)
def test_every_spelling_of_a_duration_is_one_config_and_one_run(field, spellings):
    configs = [config_lib.make_config("resnet20", **{field: s}) for s in spellings]
    assert len({c.hash8() for c in configs}) == 1
    assert all(c == configs[0] for c in configs)
    # And as config.json recorded it in another spelling (runs written before).
    d = json.loads(configs[0].to_json())
    d[field] = list(spellings[0]) if field == "lr_drops" else spellings[0]
    assert config_lib.RunConfig.from_json(json.dumps(d)) == configs[0]


def test_durations_keep_the_spelling_run_directories_recorded():
    # Zero is '0' (the default rewind step), others 'Nit' / 'Nep' as the recipes write them.
    assert steps.canonical("0ep") == "0" and steps.canonical(500) == "500it"
    assert steps.canonical("160ep") == "160ep" and steps.canonical("50000it") == "50000it"
    for arch in presets.RECIPES:
        recipe = presets.recipe(arch)
        c = config_lib.make_config(arch)
        for name in config_lib.DURATION_FIELDS:
            if name in recipe:
                assert getattr(c, name) == recipe[name], (arch, name)


@pytest.mark.parametrize("field, value", [("data_order", "shuffled"), ("warmup_form", "s/W")])
def test_bad_data_order_and_warmup_form_are_refused(field, value):
    with pytest.raises(ValueError, match=field):
        config_lib.make_config("lenet_300_100", **{field: value})


@pytest.mark.parametrize(
    "field, value",
    [
        ("conv_rate", -0.5),
        ("conv_rate", 6.0),  # 6 * 0.2 > 1: more than every survivor
        ("validation_holdout", -1),
        ("validation_holdout", 2.5),
        ("validation_holdout", True),
    ],
)
def test_bad_new_field_values_get_errors_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        config_lib.make_config("conv2", **{field: value})


@pytest.mark.parametrize("arch, conv_rate", [("conv2", 0.5), ("conv4", 0.5), ("conv6", 0.75)])
def test_conv_recipes_follow_the_2019_protocol(arch, conv_rate):
    c = config_lib.make_config(arch)
    assert (c.prune_scope, c.prune_fraction) == ("layerwise", 0.2)
    assert (c.conv_rate, c.output_rate) == (conv_rate, 0.5)  # conv 10%/15%, output 10%
    assert c.validation_holdout == 5000
    assert c.dataset == "cifar10"


@pytest.mark.parametrize("arch", ["vgg16", "vgg19", "resnet20", "resnet56"])
def test_cifar_resnet_and_vgg_recipes_keep_the_frameworks_validation_on_test(arch):
    c = config_lib.make_config(arch)
    assert (c.validation_holdout, c.conv_rate, c.prune_scope) == (0, 1.0, "global")
