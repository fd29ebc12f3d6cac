"""What is in a run directory: open or verify one, read its config, list its finished rounds.

Library code; it never builds a model, so the report, export and stability
entry points can ask "what does this run hold" without the training stack.
The layout itself (every file name) is lth_tf/paths.py.
"""

import dataclasses
import json
import re

from lth_tf import FORMAT_VERSION, files, paths, schemas, subnetworks
from lth_tf.config import NON_IDENTITY_FIELDS, RECORDED_FIELDS, RunConfig
from lth_tf.keras import tf

IMP = subnetworks.IMP  # the branch name of the IMP rounds in finished_rounds()
MATCHING_POINTS = 0.002  # within 0.2 accuracy points of the dense network


class RunDirError(ValueError):
    """The directory is not an lth_tf run, or holds a run that does not fit this config."""


class CorruptRunError(ValueError):
    """A file of the run is damaged or inconsistent with the others."""


def open_run_dir(config: RunConfig, run_dir: str, write: bool = True) -> None:
    """Creates run_dir with config.json, or checks that the existing one is this config's.

    Args:
      config: the run's frozen config.
      run_dir: the run directory (see lth_tf/paths.py).
      write: False on non-chief workers: check only, create nothing.

    Raises:
      RunDirError: if run_dir is a file, or holds a run with a different config
        (nothing in it is touched).
      DamagedFileError: its config.json is truncated, was edited by hand, or misses a
        field or has one of the wrong type (the message names the file and the field).
    """
    if files.exists(run_dir) and not tf.io.gfile.isdir(run_dir):
        raise RunDirError(f"{run_dir} is a file, not a directory. Choose another --root_dir.")
    path = paths.config_file(run_dir)
    if files.exists(path):
        try:
            existing = _read_config(path)
        except files.DamagedFileError:
            raise  # names the file and the field, and says what to do
        except ValueError as e:
            raise RunDirError(f"{run_dir} holds a run this lth_tf cannot continue: {e}") from e
        diff = existing.differences(config)
        if diff:
            lines = "\n".join(
                f"  {k}: run has {a!r}, you asked for {b!r}" for k, (a, b) in diff.items()
            )
            raise RunDirError(
                f"{run_dir} holds a run with a different configuration:\n{lines}\n"
                "Nothing was changed. Use the run's own settings to resume it, or another "
                "--root_dir / --run_name for a new run."
            )
        return
    if tf.io.gfile.isdir(run_dir) and set(tf.io.gfile.listdir(run_dir)) - {paths.LOCK_FILE}:
        raise RunDirError(
            f"{run_dir} is not empty but has no config.json: it is not an lth_tf run. "
            "Nothing was changed; choose another --root_dir or --run_name."
        )
    if write:
        tf.io.gfile.makedirs(run_dir)
        files.write_json(path, json.loads(config.to_json()))


def _read_config(path: str) -> RunConfig:
    """config.json, verified (lth_tf.files.read_json) and checked against RunConfig's fields.

    Raises:
      DamagedFileError: the file is truncated, edited by hand, misses a field or has
        one of the wrong type (the message names the file and the field).
      ValueError: the values do not make a valid config (another format version, a
        value out of range).
    """
    d = files.read_json(path)  # verified; the types of the fields present checked
    # Another format version is refused by from_json, with what to do about it.
    if d.get("format_version") == FORMAT_VERSION:
        files.check_schema(path, d, schemas.config_schema())
    try:
        return RunConfig.from_json(json.dumps(d))
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e


def _absent(path: str) -> str | None:
    """Why `path` cannot be a run at all (no such directory, a file), or None."""
    if not tf.io.gfile.exists(path):
        return "the directory does not exist"
    if not tf.io.gfile.isdir(path):
        return "it is a file, not a directory"
    return None


def _require_run(run_dir: str) -> str:
    path = paths.config_file(run_dir)
    if not files.exists(path):
        why = _absent(run_dir) or "it has no config.json"
        raise RunDirError(
            f"{run_dir} is not an lth_tf run directory ({why}). Pass the "
            "directory `python -m lth_tf.imp` printed as 'Run directory: ...'."
        )
    return path


def load_config(run_dir: str) -> RunConfig:
    """The frozen config of an existing run.

    Raises:
      RunDirError: run_dir has no config.json (it is not a run).
      DamagedFileError: config.json is truncated, edited by hand, or misses a field
        or has one of the wrong type (lth_tf.files.read_json).
      ValueError: its values do not make a valid config.
    """
    return _read_config(_require_run(run_dir))


def config_json(run_dir: str) -> dict:
    """config.json of a run as plain JSON (readable even by a newer lth_tf's runs).

    Raises:
      RunDirError: run_dir has no config.json (it is not a run).
      DamagedFileError: config.json is truncated, was edited by hand, or has a known
        field of the wrong type.
    """
    return files.read_json(_require_run(run_dir))


def _scan_rounds(directory: str) -> dict:
    out = {}
    if not tf.io.gfile.isdir(directory):
        return out
    for name in sorted(tf.io.gfile.listdir(directory)):
        name = name.rstrip("/")
        match = paths.ROUND_RE.match(name)
        path = paths.summary_file(paths.join(directory, name))
        if match and files.exists(path):
            out[int(match.group(1))] = files.read_json(path)
    return out


def branches(run_dir: str) -> list:
    """Names of the branches of a run (directories under branches/: the controls and
    those of lth_tf.branch), sorted."""
    directory = paths.join(run_dir, "branches")
    if not tf.io.gfile.isdir(directory):
        return []
    return sorted(name.rstrip("/") for name in tf.io.gfile.listdir(directory))


def finished_rounds(run_dir: str) -> dict:
    """{branch: {round: summary}} of the finished rounds of a run.

    A round is finished when its summary.json exists. The IMP rounds are under
    the branch "imp"; branches with no finished round are left out.
    """
    out = {}
    imp = _scan_rounds(run_dir)
    if imp:
        out[IMP] = imp
    for branch in branches(run_dir):
        found = _scan_rounds(paths.join(run_dir, "branches", branch))
        if found:
            out[branch] = found
    return out


def choose_round(run_dir: str) -> tuple[int, str]:
    """The sparsest finished IMP round that matches the dense network, and why.

    "Matching" (the paper's word): a test accuracy within 0.2 points of the
    dense round's. Round 0 always matches itself, so there is always an answer.

    Raises:
      RunDirError: the run has no finished dense round.
    """
    imp = finished_rounds(run_dir).get(IMP, {})
    if 0 not in imp:
        raise RunDirError(
            f"{run_dir} has no finished dense round (round_00/summary.json). Run "
            "`python -m lth_tf.imp` with the run's flags first."
        )
    dense = imp[0]["test_accuracy"]
    matching = [r for r, s in imp.items() if s["test_accuracy"] >= dense - MATCHING_POINTS]
    best = min(matching, key=lambda r: imp[r]["density"])
    why = (
        f"round {best}: the sparsest round ({100 * imp[best]['density']:.2f}% of weights) "
        f"within 0.2 points of the dense test accuracy {100 * dense:.2f}% "
        f"(it has {100 * imp[best]['test_accuracy']:.2f}%)"
    )
    return best, why


# ---- replicate groups ------------------------------------------------------------------------

# Fields in which the replicates of one group may differ: their seeds, and what does not change
# what a run computes (lth_tf.config.NON_IDENTITY_FIELDS, e.g. how many rounds were asked for).
REPLICATE_FIELDS = ("seed", "data_seed")


def replicate_dirs(path: str) -> list:
    """The run directories of a replicate group, sorted by replicate number.

    A replicate group is a directory whose subdirectories replicate_1, replicate_2,
    ... are each a complete run (lth_tf/paths.py); a plain run directory (config.json
    at its top) is a group of one. A replicate_N directory without config.json yet
    (a replicate that has not started) is left out.

    Args:
      path: a run directory or a replicate group directory.

    Returns:
      [path] for a plain run; the replicate directories otherwise.

    Raises:
      RunDirError: path is neither a run nor a group with at least one started replicate.
    """
    if files.exists(paths.config_file(path)):
        return [path]
    found = []
    if tf.io.gfile.isdir(path):
        for name in tf.io.gfile.listdir(path):
            name = name.rstrip("/")
            match = paths.REPLICATE_RE.match(name)
            directory = paths.join(path, name)
            if match and files.exists(paths.config_file(directory)):
                found.append((int(match.group(1)), directory))
    if not found:
        absent = _absent(path)
        what = (
            f"({absent})"
            if absent
            else "(it has no config.json) nor a replicate group (no replicate_N/config.json "
            "under it)"
        )
        raise RunDirError(
            f"{path} is not an lth_tf run directory {what}. Pass the directory `python -m lth_tf.imp` "
            "printed as 'Run directory: ...', or the parent of its replicate_N directories."
        )
    return [directory for _, directory in sorted(found)]


def group_config(path: str) -> dict:
    """config.json shared by the replicates of a group: the fields on which they all agree.

    Fields that differ between replicates (their seeds) are left out, so that the
    result describes the group; a plain run's is its config.json.

    Raises:
      RunDirError: path is not a run or group (replicate_dirs), or its replicates differ
        in a field that changes what a run computes: they are not replicates of one
        experiment and must not be averaged.
    """
    configs = [config_json(d) for d in replicate_dirs(path)]
    common = dict(configs[0])
    allowed = set(REPLICATE_FIELDS) | set(NON_IDENTITY_FIELDS) | {"format_version"}
    for other in configs[1:]:
        for key in sorted(set(common) | set(other)):
            if key in common and common.get(key) == other.get(key):
                continue
            if key not in allowed:
                raise RunDirError(
                    f"The replicates of {path} differ in {key!r} ({configs[0].get(key)!r} vs "
                    f"{other.get(key)!r}); replicates may differ only in {REPLICATE_FIELDS}. "
                    "Report them as separate runs: --run_dir=A --run_dir=B."
                )
            common.pop(key, None)
    return common


# ---- finding the run directory of a command ----------------------------------------------------


def resumed_config(config: RunConfig, run_dir: str) -> RunConfig:
    """`config` with the fields no flag sets (config.RECORDED_FIELDS) taken from run_dir's run.

    A run resumes with what it recorded (e.g. a run written before warmup_form
    existed keeps its warm-up); a new run, or a directory whose config.json
    cannot be read (open_run_dir then says why), keeps `config`.
    """
    if not files.exists(paths.config_file(run_dir)):
        return config
    try:
        existing = load_config(run_dir)
    except (ValueError, TypeError):
        return config
    return dataclasses.replace(
        config, **{name: getattr(existing, name) for name in RECORDED_FIELDS}
    )


def find_run_dir(root_dir: str, config: RunConfig, group: bool = False) -> str:
    """The default directory of `config`'s run (or replicate group) under root_dir.

    <root_dir>/<arch>_<dataset>_<hash8>[_replicates] when it exists or no other
    directory holds this run. Otherwise an existing directory named like a run
    of the same arch and dataset whose config.json (replicate_1's, for a group)
    reads as this run: the same identity once its durations are in one spelling
    and the fields no flag sets are its own (`resumed_config`). So a run
    directory named before durations had one spelling ('500' and '500it' named
    two runs), or before a field joined the identity at its old value, is still
    found by the command that made it. With several such directories, the first
    by name.
    """
    name = paths.group_name(config) if group else paths.run_name(config)
    canonical = paths.join(root_dir, name)
    suffix = name[len(paths.run_name(config)) :]  # "_replicates" or ""

    def holder(directory):
        return paths.replicate_dir(directory, 1) if group else directory

    if files.exists(paths.config_file(holder(canonical))) or not tf.io.gfile.isdir(root_dir):
        return canonical
    pattern = re.compile(re.escape(paths.run_prefix(config)) + r"[0-9a-f]{8}" + suffix + "$")
    for name in sorted(n.rstrip("/") for n in tf.io.gfile.listdir(root_dir)):
        directory = paths.join(root_dir, name)
        if not pattern.match(name) or not files.exists(paths.config_file(holder(directory))):
            continue
        try:
            existing = load_config(holder(directory))
        except (ValueError, TypeError):
            continue
        if not existing.differences(resumed_config(config, holder(directory))):
            return directory
    return canonical
