"""absl flag definitions shared by the entry points.

Only entry points (`python -m lth_tf.imp`, ...) read FLAGS: they call
`config_from_flags()` once and pass the frozen config down. Flags left unset
(None) take the architecture's recipe value (lth_tf/presets.py).
"""

from absl import flags

from lth_tf import config as config_lib
from lth_tf import data, steps

FLAGS = flags.FLAGS

# `python -m lth_tf.imp` with no flags at all runs this short demo on the bundled
# MNIST; any --arch (or a flagfile, which sets it) gets the paper's recipe instead.
MAIN_JOB = dict(
    arch="lenet_300_100",
    training_steps="5ep",
    eval_every="1ep",
    rounds=8,
    controls=("random_reinit",),
    steps_per_execution=100,
)


def _duration_validator(name):
    def check(value):
        if value is None:
            return True
        try:
            steps.parse(value, name)
        except ValueError as e:
            raise flags.ValidationError(str(e)) from None
        return True

    return check


def define_train_flags() -> None:
    flags.DEFINE_string(
        "arch",
        None,
        "Architecture: lenet_300_100, conv2, conv4, conv6, vgg16, "
        "vgg19, resnet20, resnet56, resnet50. Default: the MNIST demo (lenet_300_100).",
    )
    flags.DEFINE_string(
        "dataset",
        None,
        f"Dataset ({', '.join(data.KNOWN)}); default: the "
        "architecture's (mnist is the real MNIST bundled with lth_tf).",
    )
    flags.DEFINE_string(
        "data_dir", None, "TensorFlow Datasets data_dir where tfds datasets are prepared."
    )
    flags.DEFINE_integer(
        "batch_size", None, "Global batch size (split over replicas).", lower_bound=1
    )
    flags.DEFINE_string("training_steps", None, "Training length T: '50000it' or '160ep'.")
    flags.DEFINE_string("optimizer", None, "sgd or adam.")
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
    flags.DEFINE_string("root_dir", "runs", "Where runs are written (a local path or gs://).")
    flags.DEFINE_string(
        "run_name",
        None,
        "Run directory name under root_dir; default <arch>_<dataset>_<hash of the config>.",
    )
    flags.DEFINE_string("eval_every", None, "Evaluation period: '100it', '1ep'.")
    flags.DEFINE_boolean(
        "jit_compile",
        None,
        "Compile the train step with XLA (helps small MLPs on CPU, slows conv nets there).",
    )
    flags.DEFINE_integer(
        "steps_per_execution",
        None,
        "Train steps per tf.function call (default 1; the rewind step must be a multiple of it).",
        lower_bound=1,
    )
    flags.DEFINE_integer(
        "verbose",
        1,
        "Keras fit verbosity: 0 silent, 1 progress bar, 2 one line per evaluation period.",
        lower_bound=0,
        upper_bound=2,
    )
    flags.DEFINE_float(
        "checkpoint_seconds",
        300.0,
        "Save a resumable mid-round checkpoint at "
        "most this often (seconds; 0 = every evaluation period).",
        lower_bound=0,
    )
    flags.DEFINE_boolean(
        "deterministic",
        False,
        "Enable TensorFlow's deterministic ops, so that "
        "a resumed run ends with the same weights as an uninterrupted one.",
    )
    for name in ("training_steps", "warmup", "eval_every"):
        flags.register_validator(name, _duration_validator(name))


def define_distribute_flags() -> None:
    flags.DEFINE_enum(
        "strategy",
        "default",
        ["default", "mirrored", "multi_worker", "tpu"],
        "tf.distribute strategy. multi_worker reads the cluster from TF_CONFIG.",
    )
    flags.DEFINE_integer(
        "num_gpus", None, "GPUs for --strategy=mirrored (default: all).", lower_bound=1
    )
    flags.DEFINE_string("tpu", None, "TPU name or address for --strategy=tpu; 'local' on a TPU VM.")
    flags.DEFINE_enum(
        "mixed_precision",
        None,
        ["bfloat16", "float16"],
        "Mixed precision compute dtype (bfloat16 on TPU, float16 on GPU); "
        "variables and masks stay float32.",
    )


def define_prune_flags() -> None:
    flags.DEFINE_string("rewind_step", None, "Rewind point k: '0' (reset to init), '500it', '5ep'.")
    flags.DEFINE_integer("rounds", None, "Pruning rounds after the dense round 0.", lower_bound=0)
    flags.DEFINE_float("prune_fraction", None, "Fraction of surviving weights pruned per round.")
    flags.DEFINE_enum(
        "prune_scope",
        None,
        list(config_lib.PRUNE_SCOPES),
        "global: one magnitude threshold over all layers; layerwise: one per layer.",
    )
    flags.DEFINE_float(
        "target_density",
        None,
        "Prune to this density in --rounds rounds (one round by default: one-shot pruning). "
        "The layers at rate 1 reach it exactly; with --output_rate=0 the output layer stays "
        "dense, at another rate it prunes at that multiple of each round's fraction.",
    )
    flags.DEFINE_float(
        "output_rate",
        None,
        "Prune-rate multiplier of the output layer (0 keeps it dense, 0.5 half rate).",
    )
    flags.DEFINE_list("controls", None, "Control branches: random_reinit, random_prune.")
    flags.register_validator("rewind_step", _duration_validator("rewind_step"))


_CONFIG_FLAGS = (
    "dataset",
    "data_dir",
    "batch_size",
    "training_steps",
    "optimizer",
    "lr",
    "momentum",
    "weight_decay",
    "warmup",
    "lr_drops",
    "lr_gamma",
    "augment",
    "seed",
    "data_seed",
    "eval_every",
    "jit_compile",
    "steps_per_execution",
    "verbose",
    "rewind_step",
    "rounds",
    "prune_fraction",
    "prune_scope",
    "target_density",
    "output_rate",
    "controls",
    "mixed_precision",
)


def config_from_flags() -> config_lib.RunConfig:
    """The run's config: the recipe of --arch with every flag the user set on top."""
    values = {name: getattr(FLAGS, name) for name in _CONFIG_FLAGS if name in FLAGS}
    if values.get("target_density") is not None and values.get("rounds") is None:
        values["rounds"] = 1  # one-shot
    if FLAGS.arch is None:
        for key, value in MAIN_JOB.items():
            if values.get(key) is None:
                values[key] = value
    arch = values.pop("arch", None) or FLAGS.arch or MAIN_JOB["arch"]
    if values.get("rounds") is None:
        values["rounds"] = 0
    for name in ("lr_drops", "controls"):
        if values.get(name) is not None:
            values[name] = tuple(v for v in values[name] if v)
    if values.get("dataset") is not None:
        data.check_name(values["dataset"])
    return config_lib.make_config(arch, **values)
