"""Every absl flag of every entry point, defined here and only here.

Each entry point calls the `define_*_flags()` function named after it
(`define_imp_flags`, `define_stability_flags`, `define_export_flags`,
`define_report_flags`); those call the shared groups below. Every define
function is idempotent: a second call (tests, two entry points in one process)
does nothing, so no entry point guards with `if "x" in FLAGS`.

Only entry points (and this module, on their behalf) read FLAGS: imp calls
`config_from_flags()` once and passes the frozen config down. Flags left unset
(None) take the architecture's recipe value (lth_tf/presets.py).

Names, one per concept across entry points:
  --rewind_step   the run's rewind point k: one duration ('0', '500it', '5ep').
  --rewind_steps  a list of rewind points k (imp: more W_k that round 0
                  records; stability: the k to analyse).
  --round         one round index (0: the dense network); stability, export.
  --rounds        how many pruning rounds a run has after round 0 (imp).
  --root_dir, --run_name   where imp writes a run: <root_dir>/<run_name>.
  --run_dir       an existing run directory (<root_dir>/<run_name>) that
                  stability, export, report and branch read.
  --branch        one branch of a run (a directory under <run_dir>/branches/).
"""

import dataclasses
import functools
import math
import sys
import textwrap

from absl import app, flags

from lth_tf import branch_kinds, criteria, data, paths, presets, steps, subnetworks
from lth_tf import config as config_lib

FLAGS = flags.FLAGS

# RunConfig fields that have no flag of their own. A field added to RunConfig must
# get a flag below or be listed here with the reason (tests/test_cli.py checks
# both directions). warmup_form: every new run warms up as open_lth does; only a
# run directory written before the field existed has the other form, and the
# command that resumes it takes the form from its config.json
# (config.RECORDED_FIELDS, rundir.resumed_config).
CONFIG_FIELDS_WITHOUT_FLAGS: frozenset[str] = frozenset(config_lib.RECORDED_FIELDS)

# imp's flags that are not RunConfig fields: where the run goes and how this
# process runs it; none of them changes what the run computes.
IMP_PROCESS_FLAGS = (
    "rewind_steps",  # more W_k recorded by round 0: files added, nothing trained differs
    "replicates",
    "replicate",
    "root_dir",
    "run_name",
    "checkpoint_seconds",
    "deterministic",
    "print_config",
    "allow_any_dataset",
    "strategy",
    "num_gpus",
    "tpu",
)

# The flags `python -m lth_tf.imp --helpshort` lists (it also prints them above a
# usage error, so the list is short); --helpfull lists all.
IMP_KEY_FLAGS = (
    "arch",
    "dataset",
    "data_dir",
    "training_steps",
    "eval_every",
    "batch_size",
    "lr",
    "rewind_step",
    "rounds",
    "prune_fraction",
    "target_density",
    "controls",
    "replicates",
    "root_dir",
    "strategy",
    "print_config",
)

# Every RunConfig field, in the dataclass's order, read from the flag of the same
# name. Derived, not listed, so that a new field cannot be forgotten here.
_CONFIG_FLAGS = tuple(
    f.name
    for f in dataclasses.fields(config_lib.RunConfig)
    if f.name not in CONFIG_FIELDS_WITHOUT_FLAGS
)

_DATASET_FORMS = (
    "mnist (the real MNIST bundled with lth_tf), tfds:mnist, cifar10, imagenet2012 "
    "(tfds, prepared in --data_dir), npz:PATH (your arrays), synthetic (random images "
    "shaped like the architecture's dataset), synthetic:HxWxC:NUM_CLASSES, tfds:NAME (any "
    "prepared tfds image classification dataset, e.g. tfds:fashion_mnist), "
    "package.module:function (your own, returning an lth_tf.data.Dataset)"
)


# While a define function runs, the sets collecting the flag names of it and of
# the define functions that called it (see _idempotent).
_collecting: list[set[str]] = []


def _idempotent(define):
    """Makes a define function run once per process; later calls do nothing.

    It also records the names of the flags the function defines, its callees'
    included (whether they ran now or earlier), for `flag_names`.
    """

    @functools.wraps(define)
    def wrapper():
        if wrapper.flag_names is None:
            before = set(FLAGS)
            _collecting.append(collected := set())
            try:
                define()
            finally:
                _collecting.pop()
            wrapper.flag_names = frozenset(collected | (set(FLAGS) - before))
        for names in _collecting:
            names.update(wrapper.flag_names)

    wrapper.flag_names = None
    return wrapper


def flag_names(define) -> frozenset[str]:
    """The names of the flags that `define` (a define_*_flags function) defines.

    Raises:
      ValueError: if `define` has not been called in this process yet.
    """
    if define.flag_names is None:
        raise ValueError(f"{define.__name__}() has not been called yet; call it first.")
    return define.flag_names


def declare_key_flags(names) -> None:
    """Makes --helpshort (and the usage printed with a usage error) list `names`.

    absl lists the key flags of the main module, which it names by sys.argv[0]:
    the module's file for `python -m lth_tf.imp`, the script for `lth-imp`. The
    flags themselves are defined here, so entry points declare them as theirs.
    """
    for name in names:
        FLAGS.register_key_flag_for_module(sys.argv[0], FLAGS[name])


class _ChoiceParser(flags.EnumParser):
    """An enum parser whose error names what was received and lists the choices."""

    def __init__(self, choices, kind):
        super().__init__(list(choices))
        self.kind = kind

    def parse(self, argument):
        if argument not in self.enum_values:
            raise ValueError(
                f"{argument!r} is not a known {self.kind}. Known {self.kind}s: "
                f"{', '.join(self.enum_values)}."
            )
        return argument


class _ArchParser(_ChoiceParser):
    """The built-in architectures, or a user's builder 'package.module:function'."""

    def parse(self, argument):
        if presets.is_custom(argument):
            return argument
        try:
            return super().parse(argument)
        except ValueError as e:
            raise ValueError(
                f"{e} Or your own model's builder: --arch=package.module:function."
            ) from None


class _PathParser(flags.ArgumentParser):
    """A local path with '~' and $VARS expanded (lth_tf.paths.expand); URLs as given."""

    syntactic_help = "a path"

    def parse(self, argument):
        return paths.expand(argument)

    def flag_type(self):
        return "string"


class _DatasetParser(_PathParser):
    """A dataset name; the PATH of npz:PATH is expanded as a path."""

    syntactic_help = ""

    def parse(self, argument):
        if isinstance(argument, str) and argument.startswith("npz:"):
            return "npz:" + paths.expand(argument[4:])
        return argument


def _define_path(name, default, help_text, parser=None):
    """DEFINE_string whose value is a path: '~' and $VARS expanded (not gs:// or URLs)."""
    flags.DEFINE(
        parser or _PathParser(), name, default, help_text, serializer=flags.ArgumentSerializer()
    )


def _define_choice(name, default, choices, kind, help_text):
    """DEFINE_enum with an error that lists the choices ('Known <kind>s: ...').

    The help text starts with <a|b|c>, as absl's own enums do.
    """
    flag = flags.EnumFlag(name, default, help_text, list(choices))
    flag.parser = _ChoiceParser(choices, kind)
    flags.DEFINE_flag(flag)


def _duration_validator(name):
    def check(value):
        if value is None:
            return True
        try:
            # In a list, an empty item ('--lr_drops=') means none.
            for item in [value] if isinstance(value, str) else [v for v in value if v]:
                steps.parse(item, name)
        except ValueError as e:
            raise flags.ValidationError(str(e)) from None
        return True

    return check


def _finite_validator(name):
    """Refuses inf and nan (absl's float flags parse both): no rate or fraction is infinite."""

    def check(value):
        if value is not None and not math.isfinite(value):
            raise flags.ValidationError(
                f"--{name}={value}: expected a finite number (inf and nan are not rates, "
                "fractions or factors)."
            )
        return True

    return check


def _name_validator(name, instead):
    """Refuses a path where a name is expected (lth_tf.paths.check_name)."""

    def check(value):
        if not value:  # unset, or --run_name= (the default name)
            return True
        try:
            paths.check_name(value, f"--{name}", instead)
        except ValueError as e:
            raise flags.ValidationError(str(e)) from None
        return True

    return check


def parse_flags(argv):
    """absl's flag parsing for app.run(flags_parser=...): bad input exits with code 2.

    absl's own parser exits with 1, the code of a failure; a value the user can
    fix exits with 2, as every entry point's other refusals of bad input do.
    Help (--help, --helpshort, --helpfull, --helpxml) exits with 0: it is what
    was asked for (absl's help flags print and exit with 1 while parsing; nothing
    else exits there).
    """
    try:
        return FLAGS(argv)
    except SystemExit as e:
        if e.code == 1:
            sys.exit(0)
        raise
    except flags.Error as e:
        message = str(e)
        if "\n" in message:
            message = "\n" + textwrap.indent(message, "  ")
        sys.stderr.write(f"FATAL Flags parsing error: {message}\n")
        sys.stderr.write("Pass --helpshort or --helpfull to see help on flags.\n")
        sys.exit(2)


def _replicate_validator(value):
    if value is not None and value < 1:
        raise flags.ValidationError(
            f"--replicate={value}: replicates are numbered from 1 (replicate_1 is the "
            "group's first). In a job array numbered from 0, pass the index + 1."
        )
    return True


def _member_validator(values):
    i, n = values["replicate"], values["replicates"]
    # --replicates's default (1) says nothing about the group's size: only a given N bounds i.
    if i is not None and FLAGS["replicates"].present and i > n:
        raise flags.ValidationError(
            f"--replicate={i} with --replicates={n}: the group has replicates 1..{n}. "
            f"Pass --replicates={i} or more, or leave --replicates out."
        )
    return True


def brief_usage_errors(main):
    """Wraps an entry point's main for app.run: a usage error is one paragraph, exit 2.

    absl's app.run prints the module's help and its key flags above the error of
    an app.UsageError (tens of lines); this prints the error alone, and where
    help is. main itself still raises app.UsageError (its tests catch it).
    """

    @functools.wraps(main)
    def wrapper(argv):
        try:
            return main(argv)
        except app.UsageError as e:
            sys.stderr.write(
                f"error: {e}\nPass --helpshort to see the main flags, --helpfull for every flag.\n"
            )
            return 2

    return wrapper


def _dataset_validator(value):
    if value is None:
        return True
    try:
        data.check_name(value)
    except ValueError as e:
        raise flags.ValidationError(f"{e} Forms: {_DATASET_FORMS}.") from None
    return True


def _controls_validator(value):
    for control in value or ():
        if control and control not in subnetworks.CONTROLS:
            raise flags.ValidationError(
                f"{control!r} is not a control. Known controls: "
                f"{', '.join(subnetworks.CONTROL_NAMES)} (comma-separated, e.g. "
                f"--controls={','.join(subnetworks.CONTROL_NAMES)}; empty for none)."
            )
    return True


@_idempotent
def define_train_flags() -> None:
    """The RunConfig fields of the network, data, optimizer and schedule."""
    _define_choice(
        "arch",
        None,
        tuple(presets.RECIPES),  # = models.ARCHITECTURES (test_cli), without importing TF
        "architecture",
        "Network; sets the paper's recipe (lth_tf/presets.py) for every flag left unset, "
        "its dataset included. Without --arch: the MNIST demo (LeNet-300-100, 5 epochs per "
        "round, 15 rounds); --arch=lenet_300_100 is the paper's 50K-iteration recipe. "
        "Your own model: --arch=package.module:function, a builder (input_shape, "
        "num_classes, seed) -> Keras model, with lth_tf's generic recipe "
        "(lth_tf/presets.py CUSTOM_RECIPE) for every flag left unset.",
    )
    FLAGS["arch"].parser = _ArchParser(presets.RECIPES, "architecture")
    _define_path(
        "dataset",
        None,
        f"Dataset; default: the --arch recipe's. Forms: {_DATASET_FORMS}.",
        _DatasetParser(),
    )
    flags.register_validator("dataset", _dataset_validator)
    _define_data_dir_flag()
    flags.DEFINE_integer(
        "validation_holdout",
        None,
        "Training examples held out for validation (early stopping); the training set "
        "shrinks by as many. 0: the dataset's convention (CIFAR-10 validates on the test "
        "set, as the authors' framework does; MNIST holds out 5,000). Default: the recipe's "
        "(5000 for conv2/4/6, the 2019 paper's protocol).",
        lower_bound=0,
    )
    flags.DEFINE_integer(
        "input_shards",
        None,
        "imagenet2012: the number V of virtual shards (runs of its files) that define the "
        "training order, part of the run; each of H hosts (H dividing V) reads only V/H "
        "of them, and the batches are the same for every such H. A divisor of the batch "
        "size, at most the number of training files. 0 (default): every host reads every "
        "record.",
        lower_bound=0,
    )
    flags.DEFINE_integer(
        "batch_size", None, "Global batch size (split over the devices).", lower_bound=1
    )
    flags.DEFINE_string("training_steps", None, "Training length T: '50000it' or '160ep'.")
    _define_choice("optimizer", None, config_lib.OPTIMIZERS, "optimizer", "Optimizer.")
    flags.DEFINE_float("lr", None, "Base learning rate for the global batch size.")
    flags.DEFINE_float("momentum", None, "SGD momentum.")
    flags.DEFINE_float("weight_decay", None, "Coupled L2 weight decay (PyTorch SGD semantics).")
    flags.DEFINE_string("warmup", None, "Linear warm-up length: '0', '5ep'.")
    flags.DEFINE_list(
        "lr_drops", None, "Steps where the learning rate is multiplied by lr_gamma: '80ep,120ep'."
    )
    flags.DEFINE_float("lr_gamma", None, "Learning-rate drop factor.")
    flags.DEFINE_boolean(
        "augment", None, "Training augmentation (CIFAR flip+crop, ImageNet crop+flip)."
    )
    flags.DEFINE_integer("seed", 0, "Initialisation seed.")
    flags.DEFINE_integer("data_seed", 0, "Data order and augmentation seed.")
    _define_choice(
        "data_order",
        None,
        config_lib.DATA_ORDERS,
        "data order",
        "The data order of the rounds after the dense round 0. per_round (default, the "
        "papers' protocol and open_lth's): each IMP round, control and branch round draws "
        "its own order from --data_seed, its round and its branch, so its SGD noise is its "
        "own. replay: each one replays round 0's batches from its rewind step k, sharing the "
        "dense run's noise (runs written before this flag existed are replay runs; resume "
        "them with --data_order=replay). Round 0, and so W_k, has --data_seed's order in both.",
    )
    flags.DEFINE_string("eval_every", None, "Evaluation period: '100it', '1ep'.")
    flags.DEFINE_boolean(
        "test_every_period",
        None,
        "Also evaluate the test set every evaluation period (test accuracy at the "
        "early-stopping iteration, as the 2019 paper reports it). Default: the recipe's.",
    )
    _define_speed_flags()
    flags.DEFINE_integer(
        "verbose",
        1,
        "Keras fit verbosity: 0 silent, 1 progress bar, 2 one line per evaluation period.",
        lower_bound=0,
        upper_bound=2,
    )
    for name in ("training_steps", "warmup", "eval_every", "lr_drops"):
        flags.register_validator(name, _duration_validator(name))
    for name in ("lr", "momentum", "weight_decay", "lr_gamma"):
        flags.register_validator(name, _finite_validator(name))


# The config fields that a command reading an existing run (lth_tf.stability,
# export, branch) may set for itself, over its config.json: where the data is and
# how fast it runs; none is part of the run's identity (config.NON_IDENTITY_FIELDS).
OVERRIDE_FIELDS = ("data_dir", "jit_compile", "steps_per_execution")


@_idempotent
def _define_data_dir_flag() -> None:
    _define_path(
        "data_dir",
        None,
        "TensorFlow Datasets data_dir where tfds datasets are prepared. Not part of the "
        "run: lth_tf.stability, export and branch read the run's data from here instead of "
        "the data_dir in its config.json (e.g. after moving the run to another host).",
    )


@_idempotent
def _define_speed_flags() -> None:
    """jit_compile and steps_per_execution: the same run, faster or slower."""
    flags.DEFINE_boolean(
        "jit_compile",
        None,
        "Compile the train and evaluation steps with XLA (faster for small MLPs such as LeNet, "
        "slower for conv nets on a CPU; about 100 MB more memory). A speed setting: the same "
        "run, other floating-point rounding.",
    )
    flags.DEFINE_integer(
        "steps_per_execution",
        None,
        "Train steps per tf.function call (the rewind step must be a multiple of it within its "
        "evaluation period). Unset: up to 100 for small models such as LeNet, chosen so that "
        "the rewind step is reached (train.execution_steps; same results), else 1; "
        "--steps_per_execution=1 turns the automatic choice off.",
        lower_bound=1,
    )


def config_overrides() -> dict:
    """{field: value} of the OVERRIDE_FIELDS whose flags this process defines and has set.

    What lth_tf.stability and export lay over the run's config.json for this
    invocation only (config.json is not rewritten).
    """
    assert set(OVERRIDE_FIELDS) <= set(config_lib.NON_IDENTITY_FIELDS)
    return {
        name: FLAGS[name].value
        for name in OVERRIDE_FIELDS
        if name in FLAGS and FLAGS[name].value is not None
    }


@_idempotent
def define_strategy_flags() -> None:
    """Which devices a process trains on: strategy, GPUs, TPU (imp, stability)."""
    _define_choice(
        "strategy",
        "default",
        ["default", "mirrored", "multi_worker", "tpu"],
        "strategy",
        "tf.distribute strategy. multi_worker reads the cluster from TF_CONFIG.",
    )
    flags.DEFINE_integer(
        "num_gpus", None, "GPUs for --strategy=mirrored (default: all).", lower_bound=1
    )
    flags.DEFINE_string("tpu", None, "TPU name or address for --strategy=tpu; 'local' on a TPU VM.")


@_idempotent
def define_distribute_flags() -> None:
    """How a run is spread over devices: the strategy flags, and mixed precision."""
    define_strategy_flags()
    # A RunConfig field (it changes results), so imp's only: stability trains its
    # copies with the precision of the run it analyses.
    _define_choice(
        "mixed_precision",
        None,
        ["bfloat16", "float16"],
        "mixed precision",
        "Mixed precision compute dtype (bfloat16 on TPU, float16 on GPU; default float32); "
        "variables and masks stay float32.",
    )


@_idempotent
def define_prune_flags() -> None:
    """The RunConfig fields of the pruning protocol."""
    flags.DEFINE_string(
        "rewind_step",
        None,
        "The run's rewind point k, one duration: '0' (reset to init), '500it', '5ep'. "
        "(--rewind_steps, plural, is a list of k: more W_k that imp's round 0 records, the k "
        "that lth_tf.stability analyses.) lth_tf.branch: the branch's k.",
    )
    flags.DEFINE_integer(
        "rounds",
        None,
        "How many pruning rounds follow the dense round 0. Default: 15 in the MNIST demo (no "
        "--arch), 1 with --target_density, else 0 (round 0 only; rerun with --rounds=N to "
        "continue the same run). (--round, singular, is one round index in lth_tf.stability "
        "and lth_tf.export.)",
        lower_bound=0,
    )
    flags.DEFINE_float("prune_fraction", None, "Fraction of surviving weights pruned per round.")
    _define_choice(
        "prune_scope",
        None,
        config_lib.PRUNE_SCOPES,
        "prune scope",
        "global: one magnitude threshold over the layers at rate 1 (the others are pruned "
        "layer-wise at their --conv_rate/--output_rate); layerwise: one per layer.",
    )
    flags.DEFINE_string(
        "prune_criterion",
        None,
        "Which survivors a round removes (lth_tf/criteria.py): magnitude (|W_f|, the papers' "
        "and the default), magnitude_increase (|W_f| - |W_k|, Zhou et al. 2019), random, or "
        "package.module:function, a score function of (final, rewind, masks, seed) -> "
        "{layer: scores} (higher survives). Part of the run's name only when not magnitude.",
    )
    flags.register_validator(
        "prune_criterion",
        lambda v: v is None or criteria.is_valid_name(v),
        message=f"--prune_criterion: expected {criteria.expected()}.",
    )
    flags.DEFINE_float(
        "target_density",
        None,
        "Prune to this density of the pruned kernels in --rounds rounds (one round by default: "
        "one-shot pruning). With every rate 1 each round prunes the same fraction; with "
        "--conv_rate or --output_rate other than 1 each layer ends where IMP at "
        "--prune_fraction with those rates has it at this density (--output_rate=0: the "
        "output layer is not pruned and not counted).",
    )
    flags.DEFINE_float(
        "output_rate",
        None,
        "Prune-rate multiplier of the output layer (0 keeps it dense, 0.5 half rate).",
    )
    flags.DEFINE_float(
        "conv_rate",
        None,
        "Prune-rate multiplier of the conv kernels (Conv2D layers); dense hidden layers "
        "prune at rate 1. With --prune_scope=global the rate-1 layers share one threshold "
        "and layers at another rate are pruned layer-wise at rate * --prune_fraction. "
        "Default: the recipe's (1; 0.5 for conv2/4, 0.75 for conv6).",
    )
    flags.DEFINE_list(
        "controls",
        None,
        f"Control branches, comma-separated: {', '.join(subnetworks.CONTROL_NAMES)}.",
    )
    flags.register_validator("controls", _controls_validator)
    flags.register_validator("rewind_step", _duration_validator("rewind_step"))
    for name in ("prune_fraction", "target_density", "output_rate", "conv_rate"):
        flags.register_validator(name, _finite_validator(name))


@_idempotent
def _define_checkpoint_seconds_flag() -> None:
    flags.DEFINE_float(
        "checkpoint_seconds",
        300.0,
        "Save a resumable mid-round checkpoint at "
        "most this often (seconds; 0 = every evaluation period).",
        lower_bound=0,
    )


@_idempotent
def define_imp_flags() -> None:
    """Every flag of `python -m lth_tf.imp`."""
    define_train_flags()
    define_prune_flags()
    define_distribute_flags()
    _define_rewind_steps_flag()
    _define_path("root_dir", "runs", "Where runs are written (a local path or gs://).")
    flags.DEFINE_string(
        "run_name",
        None,
        "Run directory name under root_dir; default <arch>_<dataset>_<hash of the config>. "
        "The other entry points take the result as --run_dir=<root_dir>/<run_name>. A name, "
        "not a path (no '/' or '..'): choose the place with --root_dir.",
    )
    flags.register_validator(
        "run_name",
        _name_validator(
            "run_name",
            "a directory name under --root_dir such as my_run (to write elsewhere, set --root_dir)",
        ),
    )
    _define_checkpoint_seconds_flag()
    flags.DEFINE_boolean(
        "deterministic",
        False,
        "Enable TensorFlow's deterministic ops, so that "
        "a resumed run ends with the same weights as an uninterrupted one.",
    )
    flags.DEFINE_boolean(
        "print_config", False, "Print the resolved config and run directory; train nothing."
    )
    flags.DEFINE_boolean(
        "allow_any_dataset",
        False,
        "Train a built-in --arch on a built-in --dataset its recipe is not made for (e.g. "
        "resnet50 on mnist, lenet_300_100 on cifar10), which is otherwise refused. Your own "
        "architectures and datasets (synthetic, npz:, tfds:NAME, functions) need no flag.",
    )
    flags.DEFINE_integer(
        "replicates",
        1,
        "Independent runs of the same experiment: replicate i (1-based) uses seed+i-1 and "
        "data_seed+i-1, in <root_dir>/<group>/replicate_i (group: --run_name, default "
        "<arch>_<dataset>_<hash>_replicates); the report aggregates them "
        "(mean, std, min/max). Raising it later adds replicates to the same group.",
        lower_bound=1,
    )
    flags.DEFINE_integer(
        "replicate",
        None,
        "Run only replicate i (1-based) of the group --replicates=N writes: the same "
        "directory <group>/replicate_i and seeds, so N jobs of a cluster's job array "
        "(e.g. --replicate=$SLURM_ARRAY_TASK_ID) run the group side by side on shared "
        "storage; each writes the group's report of whatever has finished. With "
        "--replicates=N, i must be at most N.",
    )
    flags.register_validator("replicate", _replicate_validator)
    flags.register_multi_flags_validator(["replicate", "replicates"], _member_validator)


@_idempotent
def define_run_dir_flag() -> None:
    """--run_dir, the existing run that stability, export and report read.

    Not marked required here (a required flag would break every other entry
    point's parsing in a process that defines several); each entry point's
    `run()` marks it required.
    """
    flags.DEFINE_multi(
        _PathParser(),
        flags.ArgumentSerializer(),
        "run_dir",
        None,
        "A run directory written by lth_tf.imp, i.e. <root_dir>/<run_name>, e.g. "
        "runs/lenet_300_100_mnist_1a2b3c4d, or a replicate group (its replicate_N are runs). "
        "lth_tf.report takes it several times to compare runs; stability and export take one.",
    )


@_idempotent
def _define_round_flag() -> None:
    flags.DEFINE_integer(
        "round",
        None,
        "One round index (0: the dense network, r: the r-th pruned network). Default: "
        "lth_tf.stability analyses round 0; lth_tf.export exports the sparsest round within "
        "0.2 points of the dense accuracy. (--rounds, plural, is imp's number of rounds.)",
        lower_bound=0,
    )


@_idempotent
def _define_eval_examples_flag() -> None:
    flags.DEFINE_integer(
        "eval_examples",
        None,
        "Evaluate on at most this many examples per split (default, or 0: all).",
        lower_bound=0,
    )


@_idempotent
def _define_rewind_steps_flag() -> None:
    flags.DEFINE_list(
        "rewind_steps",
        None,
        "A list of rewind points k, durations, e.g. 0,100it,500it,2ep. lth_tf.imp: round 0 "
        "records W_k at each of them too (the run's own --rewind_step always; not part of the "
        "run's identity), for `lth_tf.branch --kind=rewind`. lth_tf.stability: the k to analyse "
        "(default: the --branch's k, else the run's --rewind_step, its single k).",
    )
    flags.register_validator("rewind_steps", _duration_validator("rewind_steps"))


@_idempotent
def define_stability_flags() -> None:
    """Every flag of `python -m lth_tf.stability`."""
    define_run_dir_flag()
    # The copies train under a strategy like imp's rounds; their precision is the run's.
    define_strategy_flags()
    _define_round_flag()
    # --round is shared with export, whose default differs: each entry point's
    # define function sets it (a process runs one entry point; where tests define
    # several, the last defined wins).
    FLAGS.set_default("round", 0)
    _define_rewind_steps_flag()
    _define_data_dir_flag()
    _define_speed_flags()  # the copies train as imp's rounds do
    flags.DEFINE_integer("num_alphas", 30, "Points on the interpolation path.", lower_bound=2)
    flags.DEFINE_integer(
        "repeats",
        3,
        "Pairs of copies (data orders) per point, as the LMC paper; the table shows mean ± "
        "std (ddof=1) and n.",
        lower_bound=1,
    )
    flags.DEFINE_boolean(
        "shared_mask",
        False,
        "At --round>=1, analyse every k with the run's own round mask (found with the run's "
        "k) instead of each k's own IMP mask (the LMC paper; IMP rewound to k, the branch "
        "rewind_<k>it, trained first when missing).",
    )
    flags.DEFINE_boolean(
        "recompute_bn",
        False,
        "Re-estimate BatchNorm statistics on training batches at each interpolated point "
        "(default: interpolate them; what the LMC paper did is not established, README).",
    )
    _define_eval_examples_flag()
    _define_branch_flag()
    _define_choice(
        "subnetwork",
        "imp",
        subnetworks.SUBNETWORKS,
        "subnetwork",
        "Which subnetwork of round --round to analyse: imp (the IMP mask of the run, or of "
        "--branch), random_prune (a random mask with its per-layer densities, from W_k) or "
        "random_reinit (its mask, weights drawn afresh from the initialiser).",
    )


@_idempotent
def _define_branch_flag() -> None:
    flags.DEFINE_string(
        "branch",
        None,
        "A branch of the run written by lth_tf.branch, by its directory name under "
        "<run_dir>/branches/, e.g. rewind_100it (default: the run's own IMP rounds).",
    )
    flags.register_validator(
        "branch",
        _name_validator(
            "branch",
            "the name of one of the run's branches (a directory under <run_dir>/branches/)",
        ),
    )


def _densities_validator(value):
    for item in value or ():
        try:
            ok = 0 < float(item) < 1
        except ValueError:
            ok = False
        if not ok:
            raise flags.ValidationError(
                f"--densities: {item!r} is not a density in (0, 1); expected a comma-separated "
                "list such as 0.2,0.05,0.01."
            )
    return True


@_idempotent
def define_branch_flags() -> None:
    """Every flag of `python -m lth_tf.branch`.

    The training and pruning flags are defined too, so that a run's flagfile can
    be passed: a branch shares the run's round 0, so any of them set to another
    value than the run's is refused (lth_tf.branching.check_shares_round_0),
    except --rewind_step (the branch's k) and --rounds (the branch's rounds).
    """
    define_run_dir_flag()
    define_train_flags()
    define_prune_flags()
    define_distribute_flags()
    _define_choice(
        "kind",
        None,
        branch_kinds.NAMES,
        "branch kind",
        "What the branch does with the run's round 0: rewind (IMP rewound to another "
        "--rewind_step, with its own masks), lr_rewind (each round keeps the previous round's "
        "final weights and replays the learning rate from k to T; Renda et al. 2020), finetune "
        "(final weights, constant --finetune_lr for --finetune_steps), oneshot (prune round 0 "
        "straight to each of --densities, retrain from W_k).",
    )
    flags.DEFINE_float(
        "finetune_lr",
        None,
        "--kind=finetune: the constant learning rate (default: the schedule's last one).",
    )
    flags.register_validator("finetune_lr", _finite_validator("finetune_lr"))
    flags.DEFINE_string(
        "finetune_steps",
        None,
        "--kind=finetune: steps of fine-tuning per round, e.g. '2ep' (default: T - k, "
        "the rewinding rounds' budget).",
    )
    flags.register_validator("finetune_steps", _duration_validator("finetune_steps"))
    flags.DEFINE_list(
        "densities",
        None,
        "--kind=oneshot: the target densities, e.g. 0.2,0.05,0.01: one branch per density, "
        "each layer where IMP has it at that density (named by the density reached).",
    )
    flags.register_validator("densities", _densities_validator)
    _define_checkpoint_seconds_flag()


@_idempotent
def define_export_flags() -> None:
    """Every flag of `python -m lth_tf.export`."""
    define_run_dir_flag()
    _define_round_flag()
    FLAGS.set_default("round", None)  # see define_stability_flags
    _define_data_dir_flag()
    _define_eval_examples_flag()
    flags.DEFINE_boolean(
        "tflite", False, "Also write dense and sparse (TFLite sparse format) TFLite files."
    )
    flags.DEFINE_boolean(
        "tflite_int8",
        False,
        "Also write a sparse TFLite file with int8 weights (implies --tflite).",
    )


@_idempotent
def define_report_flags() -> None:
    """Every flag of `python -m lth_tf.report`."""
    define_run_dir_flag()
    _define_path(
        "out",
        None,
        "Where to write the report (default: the run or group itself; for several "
        "--run_dir a comparison_<hash> directory next to them). Never inside a compared run.",
    )


def one_run_dir(values) -> str:
    """The single --run_dir of stability and export (the flag may be repeated for report).

    Raises:
      ValueError: if --run_dir was given more than once.
    """
    values = list(values or [])
    if len(values) != 1:
        raise ValueError(
            f"--run_dir was given {len(values)} times ({', '.join(values)}); this command "
            "works on one run. Run it once per run, or use lth_tf.report to compare runs."
        )
    return values[0]


def explicit_config_flags() -> dict:
    """{config field: value} of the RunConfig flags set on the command line (or a flagfile).

    lth_tf.branch checks them against the run's config: a branch shares round 0.
    """
    out = {}
    for name in _CONFIG_FLAGS:
        if name in FLAGS and FLAGS[name].present:
            value = FLAGS[name].value
            if isinstance(value, list):
                value = tuple(v for v in value if v)
            out[name] = value
    return out


def config_from_flags() -> config_lib.RunConfig:
    """The run's config: the recipe of --arch with every flag the user set on top.

    Needs define_imp_flags().

    Raises:
      ValueError: for values or combinations that make no sense, e.g. the MNIST
        demo (no --arch) on a dataset whose images are not MNIST-shaped, or an
        architecture on a dataset its recipe is not made for (without
        --allow_any_dataset).
    """
    values = {name: getattr(FLAGS, name) for name in _CONFIG_FLAGS}
    arch = values.pop("arch")
    if values["target_density"] is not None and values["rounds"] is None:
        values["rounds"] = 1  # one-shot
    if arch is None:
        presets.check_demo_dataset(values["dataset"])
        for key, value in presets.MAIN_JOB.items():
            if values.get(key) is None:
                values[key] = value
        arch = values.pop("arch")
    if values["dataset"] is not None and not FLAGS.allow_any_dataset:
        presets.check_arch_dataset(arch, values["dataset"])
    if values["rounds"] is None:
        values["rounds"] = 0
    for name in ("lr_drops", "controls"):
        if values[name] is not None:
            values[name] = tuple(v for v in values[name] if v)
    return config_lib.make_config(arch, **values)


def protocol_lines(config: config_lib.RunConfig) -> list[str]:
    """What imp prints first: which protocol the flags chose, and round-0-only runs.

    Reads FLAGS to tell what the user set from what a default filled in.
    """
    drops = f", x{config.lr_gamma} at {','.join(config.lr_drops)}" if config.lr_drops else ""
    schedule = (
        f"{config.optimizer} lr={config.lr:g}{drops}, batch {config.batch_size}, "
        f"{config.training_steps} per round, rewind to {config.rewind_step}, "
        f"data order {config.data_order}"
    )
    if FLAGS.arch is None:
        controls = ", ".join(config.controls) or "none"
        lines = [
            f"No --arch: running the MNIST demo (LeNet-300-100 on {config.dataset}, "
            f"{schedule}, {config.rounds} round{'s' if config.rounds != 1 else ''} of "
            f"{100 * config.prune_fraction:g}%, "
            f"controls: {controls}). --arch=lenet_300_100 runs the paper's 50K-iteration "
            "recipe; --flagfile=flags/lenet300_mnist.cfg its full protocol."
        ]
    else:
        recipe_dataset = presets.recipe(config.arch)["dataset"]
        custom = presets.is_custom(config.arch)
        if FLAGS.dataset is None:
            on = f"{config.dataset} (the recipe's dataset)"
        elif config.dataset == recipe_dataset:
            on = config.dataset
        else:
            on = f"{config.dataset} (the recipe is made for {recipe_dataset})"
        if custom:
            on = config.dataset if FLAGS.dataset is not None else f"{config.dataset} (no --dataset)"
        recipe = (
            "your model with lth_tf's generic recipe (lth_tf/presets.py CUSTOM_RECIPE: no "
            "paper has one; set --dataset, --training_steps, --lr... to choose)"
            if custom
            else "the paper's recipe (lth_tf/presets.py)"
        )
        lines = [f"--arch={config.arch}: {recipe} with your flags on top: {on}, {schedule}."]
    if config.rounds == 0:
        why = "--rounds=0" if FLAGS.rounds is not None else "No --rounds or --target_density"
        lines.append(
            f"{why}: training the dense network (round 0) only. To prune, rerun with "
            f"--rounds=N (N rounds of {100 * config.prune_fraction:g}% each; this run directory, its "
            "round 0 reused) or add --target_density=D (one-shot pruning to density D)."
        )
    return lines
