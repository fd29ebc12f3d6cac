"""The frozen configuration of a run, its JSON round trip and its identity hash.

Flags are read only by entry points; they build a `RunConfig` with
`make_config` (recipe defaults + the user's overrides) and pass it down. Library
code never reads flags and never mutates a config.
"""

import dataclasses
import hashlib
import json
import math

from lth_tf import FORMAT_VERSION, criteria, presets, steps, subnetworks

OPTIMIZERS = ("sgd", "adam")
PRUNE_SCOPES = ("global", "layerwise")

# Fields that do not change what a run computes: they may differ between the
# invocations that build one run directory (e.g. `--rounds=5`, later `--rounds=10`
# extends the same run; adding a control adds a branch). jit_compile and
# steps_per_execution change only the speed (up to floating-point rounding, as the
# device does), so a run started on GPUs can be resumed on a TPU and the GPU and
# TPU flagfiles name the same run. The rewind step is checked against the current
# invocation's steps_per_execution when the schedule is resolved (train.resolve),
# not the one in config.json. Precision and batch size change the results and
# stay in the identity; the strategy is not a config field at all.
NON_IDENTITY_FIELDS = (
    "data_dir",
    "rounds",
    "controls",
    "verbose",
    "test_every_period",
    "jit_compile",
    "steps_per_execution",
)

# Fields added after run directories were already named by the hash of the
# identity, with the value every run had before the field existed. A config.json
# without the field reads as that value, and a field at that value is left out of
# the identity, so that every run directory written before keeps its hash; set to
# anything else it is part of the identity like any field. For conv_rate,
# validation_holdout and prune_criterion that value is also the default; data_order and warmup_form
# default to the papers' protocol instead, which new runs record.
DEFAULT_OMITTED_FIELDS = {
    "conv_rate": 1.0,
    "validation_holdout": 0,
    "data_order": "replay",
    "warmup_form": "step+1",
    "input_shards": 0,
    "prune_criterion": criteria.MAGNITUDE,
}

# The data order of the rounds after round 0. per_round: each IMP round and each
# control (and each branch round) draws its own order from the data seed, its
# round and its branch, as the authors' framework (open_lth) does by default;
# replay: every one replays round 0's order from its first step (runs written
# before the field existed). Round 0, and so W_k, has the data seed's order in both.
DATA_ORDERS = ("per_round", "replay")
# The linear warm-up over W steps: 'step' multiplies the rate at global step s by
# min(1, s / W), as open_lth does (step 0 trains at rate 0); 'step+1' by
# min(1, (s + 1) / W) (runs written before the field existed).
WARMUP_FORMS = ("step", "step+1")
# Fields no flag sets: a new run records the current form, and a command that
# resumes a run takes them from its config.json (lth_tf.rundir.resumed_config).
RECORDED_FIELDS = ("warmup_form",)
# The duration fields, held in one spelling (lth_tf.steps.canonical).
DURATION_FIELDS = ("warmup", "training_steps", "eval_every", "rewind_step")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Everything that determines a run. See lth_tf/presets.py for the fields' meaning."""

    arch: str
    dataset: str
    batch_size: int
    optimizer: str
    lr: float
    momentum: float
    weight_decay: float
    warmup: str
    lr_drops: tuple[str, ...]
    lr_gamma: float
    training_steps: str
    eval_every: str
    augment: bool
    output_rate: float
    # Prune-rate multiplier of the conv kernels (every convolution): 1 prunes them like
    # the dense hidden layers, 0.5 at half the rate (the 2019 paper's Conv-2/4).
    conv_rate: float = 1.0
    # Training examples held out for validation (early stopping); 0 keeps the
    # dataset's convention (CIFAR-10: validate on the test set, as the authors'
    # framework does; MNIST, npz, synthetic: the last 5,000 or 10%).
    validation_holdout: int = 0
    warmup_form: str = "step"  # WARMUP_FORMS
    # imagenet2012: V > 0 defines the training order over V virtual shards of its
    # files, so that each of H hosts (H dividing V) reads only V/H of them and the
    # batches are the same for every such H (lth_tf.data.imagenet); 0: every host
    # reads every record.
    input_shards: int = 0
    seed: int = 0
    data_seed: int = 0
    data_order: str = "per_round"  # DATA_ORDERS
    data_dir: str | None = None
    jit_compile: bool = False
    # None: chosen per model (train.execution_steps: up to 100 for small models); 1 turns
    # the automatic choice off.
    steps_per_execution: int | None = None
    mixed_precision: str | None = None  # None (float32), 'bfloat16' or 'float16'
    # Evaluate the test set at every evaluation period too, so that summaries can
    # report test accuracy at the early-stopping iteration (the 2019 paper's LeNet
    # and Conv figures). Off by default for the large datasets.
    test_every_period: bool = False
    # Pruning.
    rewind_step: str = "0"
    rounds: int = 0
    prune_fraction: float = 0.2
    prune_scope: str = "global"
    # Which survivors a round removes (lth_tf.criteria): magnitude (|W_f|, the papers'),
    # magnitude_increase, random, or package.module:function (a score function).
    prune_criterion: str = criteria.MAGNITUDE
    target_density: float | None = None
    controls: tuple[str, ...] = ()
    verbose: int = 1

    def __post_init__(self):
        # One spelling per duration ('500' is '500it'): one run, one directory name.
        for name in DURATION_FIELDS:
            object.__setattr__(self, name, steps.canonical(getattr(self, name), name))
        drops = tuple(steps.canonical(d, "lr_drops") for d in self.lr_drops)
        object.__setattr__(self, "lr_drops", drops)
        _check(self)

    def to_json(self) -> str:
        d = dataclasses.asdict(self)
        d["format_version"] = FORMAT_VERSION
        return json.dumps(d, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "RunConfig":
        d = json.loads(text)
        version = d.pop("format_version", None)
        if version != FORMAT_VERSION:
            raise ValueError(
                f"This run was written with lth_tf format version {version}, but this lth_tf "
                f"reads format {FORMAT_VERSION}. Use the lth_tf version that wrote it, or start "
                "a new run in another --root_dir."
            )
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"config.json has unknown fields {sorted(unknown)}.")
        for name in ("lr_drops", "controls"):
            if name in d:
                d[name] = tuple(d[name])
        # Written before the field existed: the value it had then (not the default).
        for name, value in DEFAULT_OMITTED_FIELDS.items():
            d.setdefault(name, value)
        return cls(**d)

    def identity(self) -> dict:
        """The fields that define what this run computes."""
        d = dataclasses.asdict(self)
        for name in NON_IDENTITY_FIELDS:
            # With a target density, the number of rounds sets each round's fraction.
            if name == "rounds" and self.target_density is not None:
                continue
            d.pop(name)
        for name, default in DEFAULT_OMITTED_FIELDS.items():
            if d[name] == default:
                d.pop(name)
        if self.warmup == "0":  # no warm-up: its form changes nothing
            d.pop("warmup_form", None)
        return d

    def hash8(self) -> str:
        blob = json.dumps(self.identity(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:8]

    def differences(self, other: "RunConfig") -> dict:
        """{field: (self value, other value)} over the identity fields."""
        a, b = self.identity(), other.identity()
        # A field left out of one identity (a default-omitted field at its default)
        # still differs from the other's non-default value.
        keys = sorted(a.keys() | b.keys())
        a = {k: a.get(k, getattr(self, k)) for k in keys}
        b = {k: b.get(k, getattr(other, k)) for k in keys}
        return {k: (a[k], b[k]) for k in keys if a[k] != b[k]}


def make_config(arch: str, **overrides) -> RunConfig:
    """Builds a config from `arch`'s recipe, replacing fields given in `overrides`.

    `None` values in `overrides` mean "not given" and keep the recipe's value.
    """
    fields = presets.recipe(arch)
    known = {f.name for f in dataclasses.fields(RunConfig)}
    for key, value in overrides.items():
        if key not in known:
            raise ValueError(
                f"Unknown config field {key!r}. Known fields: {', '.join(sorted(known))}."
            )
        if value is not None:
            fields[key] = value
    fields["lr_drops"] = tuple(fields.get("lr_drops", ()))
    fields["controls"] = tuple(fields.get("controls", ()))
    return RunConfig(arch=arch, **fields)


# The float fields of a config: each must be a finite number (not a bool, a string,
# inf or nan), whatever wrote it (a flag, a test, an edited config.json).
_NUMBER_FIELDS = (
    "lr",
    "momentum",
    "weight_decay",
    "lr_gamma",
    "output_rate",
    "conv_rate",
    "prune_fraction",
    "target_density",
)


def _finite_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check(c: RunConfig) -> None:
    def fail(field, value, expected):
        raise ValueError(f"{field}: got {value!r}; expected {expected}.")

    presets.recipe(c.arch)  # unknown arch -> error listing the known ones
    # Numbers first: a non-number (e.g. a string in an edited config.json) or an
    # infinite or NaN rate is refused before any comparison uses it.
    for field in _NUMBER_FIELDS:
        value = getattr(c, field)
        if value is None and field == "target_density":
            continue
        if not _finite_number(value):
            fail(field, value, "a finite number")
    if not isinstance(c.batch_size, int) or c.batch_size <= 0:
        fail("batch_size", c.batch_size, "a positive integer (the global batch size)")
    if c.optimizer not in OPTIMIZERS:
        fail("optimizer", c.optimizer, f"one of {', '.join(OPTIMIZERS)}")
    if not c.lr > 0:
        fail("lr", c.lr, "a positive learning rate")
    if not 0 <= c.momentum < 1:
        fail("momentum", c.momentum, "a value in [0, 1)")
    if c.weight_decay < 0:
        fail("weight_decay", c.weight_decay, "a value >= 0")
    if not 0 < c.lr_gamma <= 1:
        fail("lr_gamma", c.lr_gamma, "a factor in (0, 1]")
    if not isinstance(c.rounds, int) or isinstance(c.rounds, bool) or c.rounds < 0:
        fail("rounds", c.rounds, "an integer >= 0 (0 trains the dense network only)")
    if not 0 < c.prune_fraction < 1:
        fail("prune_fraction", c.prune_fraction, "a fraction in (0, 1), e.g. 0.2")
    if c.target_density is not None and not 0 < c.target_density <= 1:
        fail("target_density", c.target_density, "a density in (0, 1], e.g. 0.3")
    # A layer at rate r removes r * fraction of its weights each round: r * fraction >= 1
    # would remove all of them (the fraction of a round is the prune fraction, or with a
    # target density 1 - target_density ** (1 / rounds): lth_tf.rounds.round_fraction).
    fraction = c.prune_fraction
    what = f"prune_fraction={c.prune_fraction:g}"
    if c.target_density is not None:
        fraction = 1.0 - c.target_density ** (1.0 / max(c.rounds, 1))
        what = (
            f"each round's fraction {fraction:.4g} (target_density={c.target_density:g} in "
            f"{max(c.rounds, 1)} round{'s' if c.rounds > 1 else ''})"
        )
    for field, role in (
        ("output_rate", "0 keeps the output layer dense, 0.5 prunes it at half rate"),
        ("conv_rate", "0 keeps the conv layers dense, 0.5 prunes them at half rate"),
    ):
        rate = getattr(c, field)
        if not 0 <= rate * fraction < 1 or rate < 0:
            fail(
                field,
                rate,
                f"a multiplier >= 0 of the prune fraction with {field} * fraction < 1; with "
                f"{what}, {rate:g} would prune {100 * min(rate * fraction, 1):.4g}% of the "
                f"layer each round (a layer with no weight left). Use {field} < "
                f"{1 / fraction:.4g} ({role})",
            )
    if (
        not isinstance(c.validation_holdout, int)
        or isinstance(c.validation_holdout, bool)
        or c.validation_holdout < 0
    ):
        fail(
            "validation_holdout",
            c.validation_holdout,
            "an integer >= 0: training examples held out for validation (0: the dataset's "
            "convention, e.g. 5000 for the 2019 paper's CIFAR-10 protocol)",
        )
    if (
        not isinstance(c.input_shards, int)
        or isinstance(c.input_shards, bool)
        or c.input_shards < 0
        or (c.input_shards and c.dataset != "imagenet2012")
        or (c.input_shards and c.batch_size % c.input_shards)
    ):
        fail(
            "input_shards",
            c.input_shards,
            "0, or with --dataset=imagenet2012 a number of virtual shards that divides the "
            f"batch size and is a multiple of the number of hosts (dataset: {c.dataset!r}, "
            f"batch size: {c.batch_size})",
        )
    steps.parse(c.warmup, "warmup")
    for drop in c.lr_drops:
        steps.parse(drop, "lr_drops")
    if steps.parse(c.training_steps, "training_steps").value <= 0:
        fail("training_steps", c.training_steps, "a positive duration such as '50000it' or '160ep'")
    if steps.parse(c.eval_every, "eval_every").value <= 0:
        fail("eval_every", c.eval_every, "a positive duration such as '100it' or '1ep'")
    steps.parse(c.rewind_step, "rewind_step")
    spe = c.steps_per_execution
    if spe is not None and (not isinstance(spe, int) or isinstance(spe, bool) or spe < 1):
        fail("steps_per_execution", spe, "an integer >= 1 (or unset: automatic)")
    if c.prune_scope not in PRUNE_SCOPES:
        fail("prune_scope", c.prune_scope, f"one of {', '.join(PRUNE_SCOPES)}")
    if not criteria.is_valid_name(c.prune_criterion):
        fail("prune_criterion", c.prune_criterion, criteria.expected())
    for control in c.controls:
        if control not in subnetworks.CONTROLS:
            known = ", ".join(subnetworks.CONTROL_NAMES)
            fail("controls", control, f"a comma-separated subset of {known}")
    if c.mixed_precision not in (None, "bfloat16", "float16"):
        fail("mixed_precision", c.mixed_precision, "bfloat16 (TPU), float16 (GPU) or unset")
    if not isinstance(c.seed, int) or not isinstance(c.data_seed, int):
        fail("seed/data_seed", (c.seed, c.data_seed), "integers")
    if c.data_order not in DATA_ORDERS:
        fail("data_order", c.data_order, f"one of {', '.join(DATA_ORDERS)}")
    if c.warmup_form not in WARMUP_FORMS:
        fail("warmup_form", c.warmup_form, f"one of {', '.join(WARMUP_FORMS)}")
