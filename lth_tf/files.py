"""Crash-safe reads and writes: temporary name, then rename into place.

A reader never sees half a file: a file either has its final content or does
not exist. Nor one changed since it was written: weight files (npz) carry a
sha256 of their arrays and must hold finite values; the JSON files later steps
trust carry a sha256 per field and must fit their schema (lth_tf.schemas).
Errors on read name the file (and the field or array) and say what to do.
"""

import errno
import hashlib
import io
import json
import os
import shutil
import uuid

import numpy as np

from lth_tf import paths, schemas
from lth_tf.keras import tf


def _atomic_write(path: str, data: bytes) -> None:
    directory = os.path.dirname(path)
    if directory:
        tf.io.gfile.makedirs(directory)
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        _failpoint("kill", path)
        with tf.io.gfile.GFile(tmp, "wb") as f:
            _failpoint("enospc", path)
            f.write(data)
        tf.io.gfile.rename(tmp, path, overwrite=True)
    except BaseException:
        # A full disk or an exception leaves no temporary file behind; a kill can,
        # and it is harmless: readers only ever open final names.
        if tf.io.gfile.exists(tmp):
            tf.io.gfile.remove(tmp)
        raise


def _failpoint(action: str, path: str) -> None:
    """Fault injection for the crash-safety tests (LTH_TF_FAILPOINT).

    'kill:<substring>' ends the process at once (as SIGKILL would) when a file
    whose path contains <substring> is about to be written; 'enospc:<substring>'
    raises the error of a full disk there instead, as the os module does
    (OSError ENOSPC), and 'enospc_tf:<substring>' as tf.io.gfile does
    (tf.errors.ResourceExhaustedError).
    """
    spec = os.environ.get("LTH_TF_FAILPOINT", "")
    wanted, _, pattern = spec.partition(":")
    as_tf = wanted == "enospc_tf"
    if as_tf:
        wanted = "enospc"
    if wanted != action or not pattern or pattern not in path:
        return
    if action == "kill":
        os._exit(137)
    if as_tf:
        raise tf.errors.ResourceExhaustedError(None, None, f"{path}; {os.strerror(errno.ENOSPC)}")
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)


class LinkError(ValueError):
    """A run directory holds a symbolic link: lth_tf would write or delete through it."""


def _is_local(path: str) -> bool:
    return "://" not in str(path)


def refuse_links(directory: str) -> None:
    """Raises LinkError if `directory` holds a symbolic link anywhere below it.

    lth_tf writes and deletes inside its run directories; a link there would take
    a write or a deletion outside (a deleted checkpoint directory that is a link
    to elsewhere would delete what it points to). The directory itself may be a
    link (a run kept on another disk). Remote file systems (gs://) have no links.
    """
    if not _is_local(directory) or not os.path.isdir(directory):
        return
    for dirpath, dirnames, filenames in os.walk(directory):
        for name in sorted(dirnames + filenames):
            path = os.path.join(dirpath, name)
            if os.path.islink(path):
                raise LinkError(
                    f"{directory} holds a symbolic link, {path} -> {os.readlink(path)}: lth_tf "
                    "writes and deletes files inside its run directories and never follows a "
                    "link out of one. Nothing was changed. Replace the link with what it points "
                    "to (or remove it), then rerun."
                )


def remove_tree(path: str) -> None:
    """Deletes the directory `path` and everything in it, never following a link.

    A link at `path` itself is refused (LinkError); links below it are removed,
    not followed (shutil.rmtree). Remote file systems: tf.io.gfile.rmtree.
    """
    if not _is_local(path):
        tf.io.gfile.rmtree(path)
        return
    if os.path.islink(path):
        raise LinkError(
            f"{path} is a symbolic link (to {os.readlink(path)}), where lth_tf keeps a "
            "directory of its own: it was not deleted, nor what it points to. Remove the link "
            "and rerun."
        )
    shutil.rmtree(path)


def exists(path: str) -> bool:
    return tf.io.gfile.exists(path)


def write_json(path: str, obj) -> None:
    """Writes obj as JSON; a file later steps trust (lth_tf.schemas) gets per-field sha256s.

    The digests let read_json refuse a file edited by hand, naming the field.
    """
    if isinstance(obj, dict) and schemas.for_path(path) is not None:
        obj = {**obj, _CHECKSUM_KEY: _field_digests(obj)}
    _atomic_write(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def write_text(path: str, text: str) -> None:
    _atomic_write(path, text.encode())


def write_bytes(path: str, data: bytes) -> None:
    _atomic_write(path, data)


def read_json(path: str, schema=None):
    """Reads a JSON file; one that later steps trust is verified and checked.

    A file whose name has a schema (lth_tf.schemas) must not have been edited
    since lth_tf wrote it (its per-field sha256s; files written before they
    existed have none and are only checked) and must fit the schema. The
    digests are not part of what is returned.

    Args:
      path: the file.
      schema: a lth_tf.schemas.Schema to check instead of the file name's.

    Raises:
      FileNotFoundError: the file does not exist.
      DamagedFileError: the file is truncated or not JSON, was edited by hand
        (EditedFileError), or misses a field or has one of the wrong type; the
        message names the file and the field.
    """
    try:
        with tf.io.gfile.GFile(path, "rb") as f:
            blob = f.read()
    except tf.errors.NotFoundError:
        raise FileNotFoundError(f"{path} does not exist.") from None
    try:
        obj = json.loads(blob)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        advice = _RECOMPUTE if schemas.recomputable(path) else _RESTORE_ONLY
        raise DamagedFileError(path, f"is not valid JSON ({e})", advice=advice) from e
    schema = schema or schemas.for_path(path)
    if schema is None:
        return obj
    if isinstance(obj, dict) and _CHECKSUM_KEY in obj:
        _verify_fields(path, obj)
    check_schema(path, obj, schema)
    return obj


def check_schema(path: str, obj, schema) -> None:
    """Raises DamagedFileError naming path and the field where obj does not fit schema."""
    try:
        schema.check(obj)
    except schemas.SchemaError as e:
        raise DamagedFileError(path, f"does not fit its format: {e}", advice=_RESTORE) from e


_CHECKSUM_KEY = "__sha256__"


def _digest(value) -> str:
    blob = json.dumps(value, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _field_digests(obj: dict) -> dict:
    # Through a JSON round trip, so that what is hashed is what a reader will load.
    loaded = json.loads(json.dumps(obj))
    return {key: _digest(value) for key, value in loaded.items()}


def _verify_fields(path: str, obj: dict) -> None:
    """Pops the digests from obj; raises EditedFileError naming a field edited since written."""
    stored = obj.pop(_CHECKSUM_KEY)
    if not isinstance(stored, dict):
        raise EditedFileError(path, _CHECKSUM_KEY, f"its {_CHECKSUM_KEY!r} field was changed")
    for key in sorted(set(stored) | set(obj)):
        if key not in obj:
            raise EditedFileError(path, key, f"field {key!r} was removed")
        if key not in stored:
            raise EditedFileError(path, key, f"field {key!r} was added ({_short(obj[key])})")
        if stored[key] != _digest(obj[key]):
            raise EditedFileError(
                path, key, f"field {key!r} was changed (it now reads {_short(obj[key])})"
            )


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _checksum(arrays: dict) -> str:
    digest = hashlib.sha256()
    for key in sorted(arrays):
        value = np.ascontiguousarray(arrays[key])
        digest.update(f"{key}|{value.dtype.str}|{value.shape}|".encode())
        digest.update(value.tobytes())
    return digest.hexdigest()


# A float array that is mostly zeros (a pruned kernel) is stored as its non-zero entries
# (1-D, in C order) and where they are (one bit per entry, np.packbits), under these keys
# instead of its own. Entries are told apart by their bits, so -0.0 is kept like any value:
# the array read back is the one written, bit for bit, whatever it holds.
_SPARSE_PREFIX = "__sparse__/"
_SPARSE_PARTS = ("values", "where", "shape")


def _sparse_form(value) -> dict | None:
    """{part: array} storing the float array `value` sparse, or None when dense is smaller."""
    value = np.asarray(value)
    if value.dtype.kind != "f" or value.size == 0:
        return None
    flat = np.ascontiguousarray(value).reshape(-1)
    where = flat.view(np.dtype(f"u{flat.itemsize}")) != 0
    kept = int(np.count_nonzero(where))
    if kept * flat.itemsize + (flat.size + 7) // 8 >= flat.nbytes:
        return None
    return {
        "values": flat[where],
        "where": np.packbits(where),
        "shape": np.asarray(value.shape, np.int64),
    }


def _from_sparse(parts: dict) -> np.ndarray:
    """The dense array of _sparse_form's parts (raises ValueError if they do not fit)."""
    shape = tuple(int(n) for n in parts["shape"])
    size = int(np.prod(shape, dtype=np.int64))
    if min(shape, default=0) < 0 or parts["where"].shape != ((size + 7) // 8,):
        raise ValueError("its sparse parts do not fit together")
    where = np.unpackbits(parts["where"], count=size).astype(bool)
    values = parts["values"]
    if values.shape != (int(where.sum()),):
        raise ValueError("its sparse parts do not fit together")
    dense = np.zeros(size, values.dtype)
    dense[where] = values
    return dense.reshape(shape)


def _sparse_key(key: str, part: str) -> str:
    return f"{_SPARSE_PREFIX}{key}/{part}"


_BASE_KEY = "__base__"


def write_npz(path: str, arrays: dict, compress: bool = True, base: str | None = None) -> None:
    """Writes arrays with a sha256 of their contents.

    A float array that is mostly zeros (a pruned round's kernels) is stored
    sparse (_sparse_form) and the file compressed, so a round's weight files
    shrink with its density; read_npz gives back the arrays written, bit for
    bit, and the checksum is over them. `compress=False` (float weights: they
    hardly compress) applies to a file with no array stored sparse.

    Args:
      path: the file.
      arrays: {name: array}.
      compress: see above.
      base: a weight file written by write_npz without a base (round 0's W_k)
        that `arrays` may be a masked copy of (a pruned round's start): an
        array stored sparse whose non-zero values are the base's there is
        stored as its bitmap only, and read back from the base.
    """
    for key, value in arrays.items():
        if _non_finite(value):
            raise NonFiniteError(path, key, _non_finite(value), written=False)
    base_arrays = read_npz(base) if base is not None else {}
    stored = {}
    for key, value in arrays.items():
        sparse = _sparse_form(value)
        if sparse is None:
            stored[key] = value
            continue
        compress = True
        if _in_base(sparse, base_arrays.get(key)):
            del sparse["values"]
        stored.update({_sparse_key(key, part): v for part, v in sparse.items()})
    if any(_sparse_key(k, "values") not in stored for k in _sparse_names(stored)):
        relative = os.path.relpath(base, os.path.dirname(path) or ".")
        stored[_BASE_KEY] = np.frombuffer(relative.encode(), np.uint8)
    buffer = io.BytesIO()
    payload = {**stored, _CHECKSUM_KEY: np.frombuffer(_checksum(arrays).encode(), np.uint8)}
    (np.savez_compressed if compress else np.savez)(buffer, **payload)
    _atomic_write(path, buffer.getvalue())


def _sparse_names(stored: dict) -> set:
    return {
        k[len(_SPARSE_PREFIX) :].rpartition("/")[0] for k in stored if k.startswith(_SPARSE_PREFIX)
    }


def _in_base(sparse: dict, base) -> bool:
    """Whether the sparse form's values are `base`'s at the same places (bit for bit)."""
    if base is None or base.dtype != sparse["values"].dtype:
        return False
    if base.shape != tuple(int(n) for n in sparse["shape"]):
        return False
    where = np.unpackbits(sparse["where"], count=base.size).astype(bool)
    return base.reshape(-1)[where].tobytes() == sparse["values"].tobytes()


def _base_path(path: str, relative: str) -> str:
    """`relative` (to path's directory) made a path; keeps 'gs://' intact."""
    directory = os.path.dirname(path)
    parts = relative.split("/")
    while parts and parts[0] == "..":
        directory, parts = os.path.dirname(directory), parts[1:]
    return paths.join(directory, *parts) if parts else directory


def _dense_arrays(path: str, arrays: dict) -> dict:
    """The arrays of a file as written: sparse ones (write_npz) made dense again."""
    relative = arrays.pop(_BASE_KEY, None)
    out = {k: v for k, v in arrays.items() if not k.startswith(_SPARSE_PREFIX)}
    sparse = {}
    for key, value in arrays.items():
        if key.startswith(_SPARSE_PREFIX):
            name, _, part = key[len(_SPARSE_PREFIX) :].rpartition("/")
            if part not in _SPARSE_PARTS:
                raise ValueError(f"unknown array {key!r}")
            sparse.setdefault(name, {})[part] = value
    base = None
    for name, parts in sorted(sparse.items()):
        if "values" not in parts and relative is not None:
            if base is None:
                base = _read_base(path, _base_path(path, relative.tobytes().decode()))
            if name not in base:
                raise ValueError(f"array {name!r} is not in its base file")
            where = np.unpackbits(parts["where"], count=base[name].size).astype(bool)
            parts = {**parts, "values": base[name].reshape(-1)[where]}
        if set(parts) != set(_SPARSE_PARTS) or name in out:
            raise ValueError(f"array {name!r} is not stored whole")
        out[name] = _from_sparse(parts)
    return out


def _read_base(path: str, base: str) -> dict:
    try:
        return read_npz(base, allow_base=False)
    except (FileNotFoundError, DamagedFileError) as e:
        raise MissingBaseError(
            path,
            f"stores its pruned kernels' values as those of {base}, which cannot be read ({e})",
            advice=_weights_advice(base),
        ) from None


def read_npz(path: str, allow_base: bool = True) -> dict:
    """Reads arrays written by write_npz and verifies their checksum.

    Raises:
      FileNotFoundError: the file does not exist.
      DamagedFileError: the file is truncated, corrupted or not ours, or holds NaN
        or infinite values (NonFiniteError, naming the array).
    """
    try:
        with tf.io.gfile.GFile(path, "rb") as f:
            blob = f.read()
    except tf.errors.NotFoundError:
        raise FileNotFoundError(f"{path} does not exist.") from None
    try:
        with np.load(io.BytesIO(blob), allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
        stored = arrays.pop(_CHECKSUM_KEY, None)
        if _BASE_KEY in arrays and not allow_base:
            raise ValueError("a base file has a base of its own")
        arrays = _dense_arrays(path, arrays)
    except MissingBaseError:
        raise
    except Exception as e:
        raise DamagedFileError(
            path, f"cannot be read ({type(e).__name__}: {e})", advice=_weights_advice(path)
        ) from e
    if stored is None:
        raise DamagedFileError(
            path, "has no checksum: it was not written by lth_tf", advice=_weights_advice(path)
        )
    if stored.tobytes().decode() != _checksum(arrays):
        raise DamagedFileError(path, "fails its sha256 checksum", advice=_weights_advice(path))
    for key, value in arrays.items():
        if _non_finite(value):
            raise NonFiniteError(path, key, _non_finite(value), written=True)
    return arrays


def _weights_advice(path: str) -> str:
    # W_k (rewind.npz) is what every pruned round rewinds to: recomputing it would mean
    # retraining round 0, and the finished rounds would no longer follow from it. With
    # k = 0, W_0 is round 0's start.npz (no rewind.npz is written).
    name = os.path.basename(path)
    rdir = os.path.basename(os.path.dirname(os.path.dirname(path)))
    w_0 = (name, rdir) == (
        os.path.basename(paths.checkpoint_file("", "start")),
        os.path.basename(paths.round_dir("", 0)),
    )
    if name == os.path.basename(paths.checkpoint_file("", "rewind")) or w_0:
        return (
            "nothing was changed. It cannot be recomputed in place (every pruned round rewinds "
            "to it): put back a good copy (e.g. from a copy of the run), or start a new run "
            "(another --run_name or --root_dir)."
        )
    return _RECOMPUTE


def _non_finite(value) -> int:
    """How many NaN or infinite entries a float array has (0 for other arrays)."""
    value = np.asarray(value)
    if value.dtype.kind not in "fc":
        return 0
    return int(value.size - np.count_nonzero(np.isfinite(value)))


_RECOMPUTE = (
    "the file is damaged. Delete it (and, for a round's file, that round's summary.json) and "
    "rerun the same command to recompute it."
)
_RESTORE = (
    "nothing was changed. lth_tf does not use a file changed by hand: the results beside it "
    "were computed from what it wrote. Restore the file from a copy of the run (or undo the "
    "edit); for other settings start a new run (another --run_name or --root_dir)."
)

_RESTORE_ONLY = (
    "the file is damaged and lth_tf cannot recompute it (it holds what the run was made "
    "with). Nothing was changed. Restore it from a copy of the run."
)


class DamagedFileError(ValueError):
    """A run's file is truncated, corrupted or edited by hand."""

    def __init__(self, path: str, what: str, advice: str = _RECOMPUTE):
        super().__init__(f"{path} {what}; {advice}")
        self.path = path


class MissingBaseError(DamagedFileError):
    """A weight file stored by reference to a base file (write_npz) whose base is unreadable."""


class EditedFileError(DamagedFileError):
    """A JSON file lth_tf wrote whose content no longer matches its sha256s; `field` names where."""

    def __init__(self, path: str, field: str, what: str):
        super().__init__(path, f"was edited after lth_tf wrote it: {what}", advice=_RESTORE)
        self.field = field


class NonFiniteError(DamagedFileError):
    """Weights with NaN or infinite values: refused on write and on read, naming the array."""

    def __init__(self, path: str, array: str, count: int, written: bool):
        what = f"array {array!r} holds {count} NaN or infinite value(s)"
        if written:
            super().__init__(path, what, advice=_weights_advice(path))
        else:
            super().__init__(
                path,
                f"was not written: {what}",
                advice="the training produced them (it diverged: lower --lr, or add --warmup). "
                "Nothing was written.",
            )
        self.array = array


def read_jsonl(path: str) -> list:
    if not exists(path):
        return []
    with tf.io.gfile.GFile(path, "r") as f:
        lines = [line for line in f.read().splitlines() if line.strip()]
    records = []
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:  # a line cut short by a kill; the round replays it
                break
            raise DamagedFileError(path, f"line {i + 1} is not valid JSON: {line[:80]!r}") from None
    return records


def truncate_jsonl(path: str, max_step: int) -> list:
    """Drops the lines after `max_step` (a resumed round replays them)."""
    lines = [r for r in read_jsonl(path) if r.get("step", 0) <= max_step]
    if exists(path):
        write_text(path, "".join(json.dumps(r) + "\n" for r in lines))
    return lines
