"""Crash-safe reads and writes: temporary name, then rename into place.

A reader never sees half a file: a file either has its final content or does
not exist. Errors on read name the file and say what to do.
"""

import io
import json
import os
import uuid

import numpy as np

from lth_tf.keras import tf


def _atomic_write(path: str, data: bytes) -> None:
    directory = os.path.dirname(path)
    if directory:
        tf.io.gfile.makedirs(directory)
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    with tf.io.gfile.GFile(tmp, "wb") as f:
        f.write(data)
    tf.io.gfile.rename(tmp, path, overwrite=True)


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
        raise ValueError(
            f"{path} is not valid JSON ({e}); the file is damaged. Delete it to "
            "recompute that step, or restore it from a backup."
        ) from e


def write_npz(path: str, arrays: dict, compress: bool = True) -> None:
    """Writes arrays; `compress=False` for float weights, which barely compress."""
    buffer = io.BytesIO()
    (np.savez_compressed if compress else np.savez)(buffer, **arrays)
    _atomic_write(path, buffer.getvalue())


def read_npz(path: str) -> dict:
    try:
        with tf.io.gfile.GFile(path, "rb") as f:
            blob = f.read()
        with np.load(io.BytesIO(blob), allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except tf.errors.NotFoundError:
        raise FileNotFoundError(f"{path} does not exist.") from None
    except Exception as e:
        raise ValueError(
            f"{path} cannot be read ({e}); the file is damaged. Delete it to "
            "recompute that step, or restore it from a backup."
        ) from e


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
            raise ValueError(f"{path}, line {i + 1}, is not valid JSON: {line[:80]!r}") from None
    return records


def truncate_jsonl(path: str, max_step: int) -> list:
    """Drops the lines after `max_step` (a resumed round replays them)."""
    lines = [r for r in read_jsonl(path) if r.get("step", 0) <= max_step]
    if exists(path):
        write_text(path, "".join(json.dumps(r) + "\n" for r in lines))
    return lines
