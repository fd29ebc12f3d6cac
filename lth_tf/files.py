"""Crash-safe reads and writes: temporary name, then rename into place.

A reader never sees half a file: a file either has its final content or does
not exist. Errors on read name the file and say what to do.
"""

import errno
import hashlib
import io
import json
import os
import shutil
import uuid

import numpy as np

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
    _atomic_write(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def write_text(path: str, text: str) -> None:
    _atomic_write(path, text.encode())


def write_bytes(path: str, data: bytes) -> None:
    _atomic_write(path, data)


def read_json(path: str):
    try:
        with tf.io.gfile.GFile(path, "rb") as f:
            return json.loads(f.read())
    except json.JSONDecodeError as e:
        raise DamagedFileError(path, f"is not valid JSON ({e})") from e


_CHECKSUM_KEY = "__sha256__"


def _checksum(arrays: dict) -> str:
    digest = hashlib.sha256()
    for key in sorted(arrays):
        value = np.ascontiguousarray(arrays[key])
        digest.update(f"{key}|{value.dtype.str}|{value.shape}|".encode())
        digest.update(value.tobytes())
    return digest.hexdigest()


def write_npz(path: str, arrays: dict, compress: bool = True) -> None:
    """Writes arrays with a sha256 of their contents; `compress=False` for float weights."""
    buffer = io.BytesIO()
    payload = {**arrays, _CHECKSUM_KEY: np.frombuffer(_checksum(arrays).encode(), np.uint8)}
    (np.savez_compressed if compress else np.savez)(buffer, **payload)
    _atomic_write(path, buffer.getvalue())


def read_npz(path: str) -> dict:
    """Reads arrays written by write_npz and verifies their checksum.

    Raises:
      FileNotFoundError: the file does not exist.
      DamagedFileError: the file is truncated, corrupted or not ours.
    """
    try:
        with tf.io.gfile.GFile(path, "rb") as f:
            blob = f.read()
    except tf.errors.NotFoundError:
        raise FileNotFoundError(f"{path} does not exist.") from None
    try:
        with np.load(io.BytesIO(blob), allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except Exception as e:
        raise DamagedFileError(path, f"cannot be read ({type(e).__name__}: {e})") from e
    stored = arrays.pop(_CHECKSUM_KEY, None)
    if stored is None:
        raise DamagedFileError(path, "has no checksum: it was not written by lth_tf")
    if stored.tobytes().decode() != _checksum(arrays):
        raise DamagedFileError(path, "fails its sha256 checksum")
    return arrays


class DamagedFileError(ValueError):
    """A run's file is truncated or corrupted."""

    def __init__(self, path: str, what: str):
        super().__init__(
            f"{path} {what}; the file is damaged. Delete it (and, for a round's file, that "
            "round's summary.json) and rerun the same command to recompute it."
        )
        self.path = path


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
