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


# A float array that is mostly zeros (a pruned kernel) is stored as its values at the
# places it keeps (1-D, in C order) and where those are (one bit per entry, np.packbits),
# under these keys instead of its own; every other entry is +0.0. Entries are told apart
# by their bits, so -0.0 is kept like any value: the array read back is the one written,
# bit for bit, whatever it holds.
_SPARSE_PREFIX = "__sparse__/"
_SPARSE_PARTS = ("values", "where", "shape")  # values are stored as 'planes' (_to_planes)

# A part of a sparse array that another file of the run already holds is not stored: the
# file names that file (relative to its own directory) under the part's key, and the part
# is read from it. `where` from the round's masks.npz (the mask of layer L is where L/kernel
# keeps its weights), `values` from a base file, W_k (a pruned round starts from W_k under
# its masks). A referenced file has no references of its own.
# {part: (the key naming the referenced file, what a message says the file holds)}
_REFERENCES = {
    "where": ("__masks__", "where its pruned kernels' weights are as the masks of"),
    "values": ("__base__", "its pruned kernels' values as those of"),
}


def _sparse_form(value, mask=None) -> dict | None:
    """{part: array} storing the float array `value` sparse, or None when dense is smaller.

    With a `mask` of value's shape and `value` +0.0 wherever the mask is 0, the
    places kept are the mask's (the file then refers to it for `where`).
    """
    value = np.asarray(value)
    if value.dtype.kind != "f" or value.size == 0:
        return None
    flat = np.ascontiguousarray(value).reshape(-1)
    where = flat.view(np.dtype(f"u{flat.itemsize}")) != 0
    if mask is not None and not np.any(where & (mask.reshape(-1) == 0)):
        where = mask.reshape(-1) != 0
    elif int(np.count_nonzero(where)) * flat.itemsize + (flat.size + 7) // 8 >= flat.nbytes:
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


def _mask_name(key: str) -> str | None:
    """The layer whose mask applies to array `key` ('fc1' for 'fc1/kernel'), or None."""
    layer, _, leaf = key.rpartition("/")
    return layer if leaf == "kernel" and layer else None


def _referenced_part(part: str, referenced: dict, name: str, parts: dict):
    """Part `part` of sparse array `name` as a referenced file's arrays give it, or None.

    `parts` are the array's other parts (its shape; for `values`, its where).
    """
    shape = tuple(int(n) for n in parts["shape"])
    if part == "where":
        mask = referenced.get(_mask_name(name))
        if mask is None or mask.shape != shape:
            return None
        return np.packbits(mask.reshape(-1) != 0)
    base, where = referenced.get(name), parts.get("where")
    if (
        base is None
        or base.shape != shape
        or where is None
        or where.shape != ((base.size + 7) // 8,)
    ):
        return None
    return base.reshape(-1)[np.unpackbits(where, count=base.size).astype(bool)]


def write_npz(
    path: str,
    arrays: dict,
    compress: bool = True,
    base: str | None = None,
    masks: str | None = None,
) -> None:
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
      base: a weight file written by write_npz without references (round 0's
        W_k) that `arrays` may be a masked copy of (a pruned round's start): an
        array stored sparse whose values are the base's at its places stores
        none, and reads them from the base.
      masks: a masks file written by write_npz without references (the round's
        masks.npz, {layer: mask}): a kernel 'L/kernel' that is +0.0 wherever
        the mask of L is 0 stores its values at the mask's places and no
        bitmap of its own, and reads where they are from the masks file.
    """
    for key, value in arrays.items():
        if _non_finite(value):
            raise NonFiniteError(path, key, _non_finite(value), written=False)
    references = {"where": masks, "values": base}
    referenced = {part: read_npz(ref, references=False) for part, ref in references.items() if ref}
    stored, sparse = {}, {}
    for key, value in arrays.items():
        parts = _stored_parts(key, value, referenced)
        if parts is None:
            stored[key] = value
        else:
            sparse[key] = parts
            stored.update({_sparse_key(key, part): v for part, v in _encoded(parts).items()})
    compress = compress or bool(sparse)
    for part, (ref_key, _) in _REFERENCES.items():
        if any(part not in parts for parts in sparse.values()):
            relative = os.path.relpath(references[part], os.path.dirname(path) or ".")
            stored[ref_key] = np.frombuffer(relative.encode(), np.uint8)
    buffer = io.BytesIO()
    payload = {**stored, _CHECKSUM_KEY: np.frombuffer(_checksum(arrays).encode(), np.uint8)}
    (np.savez_compressed if compress else np.savez)(buffer, **payload)
    _atomic_write(path, buffer.getvalue())


def _stored_parts(key: str, value, referenced: dict) -> dict | None:
    """The parts write_npz stores for array `key` (none a referenced file holds), or None.

    None: the array is stored as it is (dense). `referenced`: {part: the arrays of
    the file referenced for it}.
    """
    mask = referenced.get("where", {}).get(_mask_name(key))
    fits = mask is not None and mask.shape == np.shape(value)
    sparse = _sparse_form(value, mask if fits else None)
    if sparse is None:
        return None
    kept = dict(sparse)
    for part, arrays in referenced.items():
        if _same_array(_referenced_part(part, arrays, key, sparse), sparse[part]):
            del kept[part]
    return kept


def _encoded(parts: dict) -> dict:
    """Sparse parts as stored: values byte-shuffled, as 'planes'."""
    if "values" not in parts:
        return parts
    out = {k: v for k, v in parts.items() if k != "values"}
    return {**out, "planes": _to_planes(parts["values"])}


def _to_planes(values: np.ndarray) -> np.ndarray:
    """`values` (1-D) byte-shuffled: every value's first byte, then every second byte, ...

    Float weights compress better so (their sign and exponent bytes repeat); same
    dtype and length as `values`.
    """
    columns = values.view(np.uint8).reshape(-1, values.itemsize)
    return np.ascontiguousarray(columns.T).reshape(-1).view(values.dtype)


def _from_planes(planes: np.ndarray) -> np.ndarray:
    """The values of _to_planes(values)."""
    rows = np.ascontiguousarray(planes).view(np.uint8).reshape(planes.itemsize, -1)
    return np.ascontiguousarray(rows.T).reshape(-1).view(planes.dtype)


def _same_array(a, b) -> bool:
    """Whether a (or None) is b bit for bit: same dtype, shape and bytes."""
    return (
        a is not None and a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
    )


def _base_path(path: str, relative: str) -> str:
    """`relative` (to path's directory) made a path; keeps 'gs://' intact."""
    directory = os.path.dirname(path)
    parts = relative.split("/")
    while parts and parts[0] == "..":
        directory, parts = os.path.dirname(directory), parts[1:]
    return paths.join(directory, *parts) if parts else directory


def _references(path: str, arrays: dict) -> dict:
    """Pops the references from a file's stored arrays: {part: the referenced file's path}."""
    return {
        part: _base_path(path, arrays.pop(key).tobytes().decode())
        for part, (key, _) in _REFERENCES.items()
        if key in arrays
    }


def _dense_arrays(path: str, arrays: dict, references: dict) -> dict:
    """The arrays of a file as written: sparse ones (write_npz) made dense again."""
    out = {k: v for k, v in arrays.items() if not k.startswith(_SPARSE_PREFIX)}
    sparse = {}
    for key, value in arrays.items():
        if key.startswith(_SPARSE_PREFIX):
            name, _, part = key[len(_SPARSE_PREFIX) :].rpartition("/")
            if part == "planes" and value.ndim == 1:  # values, byte-shuffled
                part, value = "values", _from_planes(value)
            if part not in _SPARSE_PARTS or part in sparse.get(name, {}):
                raise ValueError(f"unknown array {key!r}")
            sparse.setdefault(name, {})[part] = value
    loaded = {}
    for name, parts in sorted(sparse.items()):
        for part, reference in references.items():  # where first: values need it
            if part in parts or "shape" not in parts:
                continue
            if part not in loaded:
                loaded[part] = _read_reference(path, reference, part)
            value = _referenced_part(part, loaded[part], name, parts)
            if value is None:
                raise ValueError(f"array {name!r} does not fit {reference}")
            parts = {**parts, part: value}
        if set(parts) != set(_SPARSE_PARTS) or name in out:
            raise ValueError(f"array {name!r} is not stored whole")
        out[name] = _from_sparse(parts)
    return out


def _read_reference(path: str, reference: str, part: str) -> dict:
    try:
        return read_npz(reference, references=False)
    except (FileNotFoundError, DamagedFileError) as e:
        raise MissingBaseError(
            path,
            f"stores {_REFERENCES[part][1]} {reference}, which cannot be read ({e})",
            advice=_weights_advice(reference),
        ) from None


def read_npz(path: str, references: bool = True) -> dict:
    """Reads arrays written by write_npz and verifies their checksum.

    Args:
      path: the file.
      references: False for a file other files refer to (write_npz's base and
        masks), which must hold all its arrays itself.

    Raises:
      FileNotFoundError: the file does not exist.
      DamagedFileError: the file is truncated, corrupted or not ours, or holds NaN
        or infinite values (NonFiniteError, naming the array); MissingBaseError
        when a file it refers to cannot be read.
    """
    try:
        with tf.io.gfile.GFile(path, "rb") as f:
            blob = f.read()
    except tf.errors.NotFoundError:
        raise FileNotFoundError(f"{path} does not exist.") from None
    referenced = {}
    try:
        with np.load(io.BytesIO(blob), allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
        stored = arrays.pop(_CHECKSUM_KEY, None)
        referenced = _references(path, arrays)
        if referenced and not references:
            raise ValueError(f"a file others refer to refers to {sorted(referenced.values())}")
        arrays = _dense_arrays(path, arrays, referenced)
    except MissingBaseError:
        raise
    except Exception as e:
        raise DamagedFileError(
            path,
            f"cannot be read ({type(e).__name__}: {e}){_changed_instead(referenced)}",
            advice=_weights_advice(path),
        ) from e
    if stored is None:
        raise DamagedFileError(
            path, "has no checksum: it was not written by lth_tf", advice=_weights_advice(path)
        )
    if stored.tobytes().decode() != _checksum(arrays):
        raise DamagedFileError(
            path,
            f"fails its sha256 checksum{_changed_instead(referenced)}",
            advice=_weights_advice(path),
        )
    for key, value in arrays.items():
        if _non_finite(value):
            raise NonFiniteError(path, key, _non_finite(value), written=True)
    return arrays


def _changed_instead(referenced: dict) -> str:
    if not referenced:
        return ""
    names = " and ".join(sorted(set(referenced.values())))
    return f" (it reads part of its arrays from {names}, which may have changed instead)"


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
    """A weight file that refers to another (write_npz's base or masks) it cannot read."""


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
