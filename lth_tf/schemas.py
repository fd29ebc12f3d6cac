"""What the JSON files that later steps trust must hold: a schema per file name.

lth_tf.files checks a JSON file against its schema whenever it writes or reads
one (and protects its content with a per-field sha256, as write_npz protects
arrays), so a later step never works from a file with a missing field, a field
of the wrong type, or a value edited by hand. The schemas list the fields the
readers use (required) and the others lth_tf writes (optional, type-checked
where present); fields a schema does not know are allowed, so that an older
lth_tf reads a newer file's known fields. config.json's schema is derived from
lth_tf.config.RunConfig's fields and types: a new config field needs no entry here.
"""

import dataclasses
import os
import types
import typing

from lth_tf import paths
from lth_tf.config import RunConfig


class SchemaError(ValueError):
    """A JSON value that does not fit its file's schema; `field` names where."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


# ---- types -----------------------------------------------------------------------------------


class Type:
    """A JSON type: its name in messages and a test of a loaded JSON value."""

    def __init__(self, name: str, test):
        self.name = name
        self.test = test

    def check(self, field: str, value) -> None:
        if not self.test(value):
            raise SchemaError(
                field,
                f"field {field!r} is {value!r} (a {_json_type(value)}); expected {self.name}",
            )


def _json_type(value) -> str:
    if value is None:
        return "null"
    return {bool: "boolean", int: "integer", float: "number", str: "string", list: "list"}.get(
        type(value), "JSON object" if isinstance(value, dict) else type(value).__name__
    )


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


INT = Type("an integer", _is_int)
NUMBER = Type("a number", _is_number)
STR = Type("a string", lambda v: isinstance(v, str))
BOOL = Type("true or false", lambda v: isinstance(v, bool))
OBJECT = Type("a JSON object", lambda v: isinstance(v, dict))
LIST = Type("a list", lambda v: isinstance(v, list))


def optional(t: Type) -> Type:
    return Type(f"{t.name} or null", lambda v: v is None or t.test(v))


def list_of(t: Type) -> Type:
    return Type(f"a list of {t.name}s", lambda v: isinstance(v, list) and all(map(t.test, v)))


def object_of(fields: dict) -> Type:
    """A JSON object whose values are each an object with `fields` (e.g. per-layer records)."""

    def test(v):
        return isinstance(v, dict) and all(
            isinstance(rec, dict) and all(k in rec and t.test(rec[k]) for k, t in fields.items())
            for rec in v.values()
        )

    keys = ", ".join(f"{k!r}" for k in fields)
    return Type(f"a JSON object of records with {keys}", test)


@dataclasses.dataclass(frozen=True)
class Schema:
    """Required and optional fields of a JSON object, with their types."""

    required: dict
    optional: dict = dataclasses.field(default_factory=dict)
    closed: bool = False  # unknown fields refused (config.json: RunConfig takes no others)

    def check(self, obj) -> None:
        """Raises SchemaError naming the first field that is missing or of the wrong type."""
        if not isinstance(obj, dict):
            raise SchemaError("", f"holds a {_json_type(obj)}; expected a JSON object")
        for name, t in self.required.items():
            if name not in obj:
                raise SchemaError(name, f"field {name!r} is missing; expected {t.name}")
            t.check(name, obj[name])
        for name, t in self.optional.items():
            if name in obj:
                t.check(name, obj[name])
        if self.closed:
            unknown = sorted(set(obj) - set(self.required) - set(self.optional))
            if unknown:
                raise SchemaError(unknown[0], f"has unknown fields {unknown}")


# ---- config.json: from RunConfig -------------------------------------------------------------


def _type_of(annotation) -> Type:
    """The JSON type of a RunConfig field's annotation (int, float, str | None, tuple[str, ...])."""
    args = typing.get_args(annotation)
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1 and type(None) in args:
            return optional(_type_of(inner[0]))
        raise TypeError(f"No JSON type for the config annotation {annotation!r}.")
    if typing.get_origin(annotation) in (tuple, list):
        return list_of(_type_of(args[0]))
    simple = {int: INT, float: NUMBER, str: STR, bool: BOOL}
    if annotation in simple:
        return simple[annotation]
    raise TypeError(f"No JSON type for the config annotation {annotation!r}.")


def config_schema(complete: bool = True) -> Schema:
    """config.json's schema, from RunConfig's fields and their types.

    Args:
      complete: require RunConfig's fields without a default (a run's config, as
        lth_tf.rundir.load_config reads it); False checks the types of the fields
        present only (what a report reads: the config as JSON).
    """
    hints = typing.get_type_hints(RunConfig)
    required, optional_fields = {}, {"format_version": INT}
    for f in dataclasses.fields(RunConfig):
        has_default = (
            f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
        )
        # A field with a default may be missing from a run written before it existed.
        target = required if complete and not has_default else optional_fields
        target[f.name] = _type_of(hints[f.name])
    if complete:
        required["format_version"] = optional_fields.pop("format_version")
    return Schema(required, optional_fields, closed=complete)


# ---- the other files -------------------------------------------------------------------------

SUMMARY = Schema(
    required={
        "round": INT,
        "density": NUMBER,
        "test_accuracy": NUMBER,
    },
    optional={
        "best_validation_accuracy": optional(NUMBER),
        "best_validation_step": optional(INT),
        "start_step": INT,
        "branch": STR,
        "end_step": INT,
        "test_loss": NUMBER,
        "early_stopping_step": optional(INT),
        "test_accuracy_at_early_stopping": optional(NUMBER),
        "test_accuracy_at_best_validation": optional(NUMBER),
        "min_validation_loss": optional(NUMBER),
        "train_accuracy": optional(NUMBER),
        "steps": INT,
        "wall_seconds": NUMBER,
    },
)

SPARSITY = Schema(
    required={"layers": object_of({"size": INT, "density": NUMBER})},
    optional={"density": NUMBER, "remaining": INT, "size": INT},
)

BRANCH = Schema(
    required={"name": STR, "kind": STR, "rewind_step": INT},
    optional={
        "masks": STR,
        "retraining": STR,
        "densities": list_of(NUMBER),
        "finetune_lr": optional(NUMBER),
        "finetune_steps": optional(INT),
    },
)

INTERPOLATION = Schema(
    required={
        "round": INT,
        "rewind_step": INT,
        "density": NUMBER,
        "batchnorm": STR,
        "stable": BOOL,
        "test_barrier_mean": NUMBER,
        "test_barrier_std": optional(NUMBER),  # null with one repeat
        "train_barrier_mean": NUMBER,
        "train_barrier_std": optional(NUMBER),  # null with one repeat
        "data_order_distance_mean": NUMBER,
    },
    optional={
        "repeats": LIST,
        "subnetwork": STR,
        "branch": optional(STR),
        "num_alphas": INT,
        "eval_examples": optional(INT),
        "stable_bound": NUMBER,
        "data_order_distance_std": optional(NUMBER),  # null with one repeat
        "test_accuracy_mean": NUMBER,
        "test_accuracy_std": optional(NUMBER),  # null with one repeat
        "pruning_distance": NUMBER,
        "pruning_distance_normalized": NUMBER,
    },
)

EXPORT = Schema(
    required={
        "round": INT,
        "recorded_test_accuracy": NUMBER,
        "dense": OBJECT,
        "sparse": OBJECT,
        "density_all_kernels": NUMBER,
        "exported_test_accuracy": NUMBER,
        "zip_ratio_sparse_over_dense": NUMBER,
    },
    optional={
        "tflite": OBJECT,
        "layers": OBJECT,
        "density_prunable": NUMBER,
        "eval_split": STR,
        "eval_examples": optional(INT),
        "signatures": list_of(STR),
        "raw_ratio_sparse_over_dense": NUMBER,
    },
)


def _basename(path: str) -> str:
    return os.path.basename(path)


# File name -> schema. The names come from lth_tf.paths (which spells every path).
SCHEMAS = {
    _basename(paths.config_file("")): config_schema(complete=False),
    _basename(paths.summary_file("")): SUMMARY,
    _basename(paths.sparsity_file("")): SPARSITY,
    _basename(paths.branch_file("", "any")): BRANCH,
    _basename(paths.join(paths.stability_point_dir("", 0, 0), "interpolation.json")): INTERPOLATION,
    _basename(paths.export_report_file("", 0)): EXPORT,
}


def for_path(path: str) -> Schema | None:
    """The schema of the JSON file at `path` (by its name), or None for an untrusted file."""
    return SCHEMAS.get(_basename(path))


def recomputable(path: str) -> bool:
    """Whether lth_tf can write the file at `path` again (config.json: the run's settings, no)."""
    return _basename(path) != _basename(paths.config_file(""))
