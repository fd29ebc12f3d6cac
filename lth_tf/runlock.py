"""One writer per run directory: the lock a command holds while it writes into a run.

`lth_tf.imp`, `branch`, `stability` and `export` hold the lock of the run
directory they write (`hold`); a second one on the same directory is refused
at once, with a message naming the holder (its command, pid, host and since
when). `lth_tf.report` takes no lock: it only reads, and writes whole files.

Local file systems: the lock is a `flock` on `<run_dir>/lock.json`, which
also names the holder. The kernel releases it when the holder's process ends,
however it ends (a kill -9 included), so a lock left by a killed process is
never in the way: the next command takes it over. On NFS, flock is a POSIX
lock of the server, released with the client's lease.

Other file systems (gs:// and what else tf.io.gfile reaches): there is no
atomic exclusive create, so the lock is the file alone: it is written, then
read back, and a command finding another's lock is refused. A lock left by a
killed process on this host (its pid is gone) is removed; one of another host
is named with the command that removes it. Two commands started within the
same second on two machines can both pass: the guarantee there is "refused
once the first holder is visible", not mutual exclusion.

Multi-worker runs: only the chief writes the run directory, the other workers
write their own scratch copies (distribute.worker_run_dir), so each worker
holds the lock of its own directory and the workers never refuse each other.
"""

import contextlib
import datetime
import json
import os
import socket
import sys
import uuid

from lth_tf import files, paths
from lth_tf.keras import tf
from lth_tf.rundir import RunDirError


class RunLockedError(ValueError):
    """Another process holds the run directory's lock."""


def _is_local(path: str) -> bool:
    return "://" not in str(path)


def _holder_text(holder: dict | None) -> str:
    if not holder:
        return "another process (it has not written its name yet)"
    return (
        f"{holder.get('command', 'an lth_tf command')} (pid {holder.get('pid')} on host "
        f"{holder.get('host')}, since {holder.get('since')})"
    )


def _read(path: str) -> dict | None:
    try:
        with tf.io.gfile.GFile(path, "rb") as f:
            holder = json.loads(f.read() or b"null")
    except (tf.errors.NotFoundError, FileNotFoundError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


def _me(command: str) -> dict:
    return {
        "command": command,
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "since": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "token": uuid.uuid4().hex,
    }


def _alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError, TypeError):
        return True  # another user's process, or a pid we cannot judge: assume alive
    return True


def _refusal(run_dir: str, holder: dict | None, remedy: str) -> RunLockedError:
    return RunLockedError(
        f"{run_dir} is in use: {_holder_text(holder)} is writing it, and one process writes "
        f"a run directory at a time. Nothing was changed. {remedy}"
    )


class _LocalLock:
    def __init__(self, run_dir: str, command: str):
        self.path = paths.lock_file(run_dir)
        import fcntl

        os.makedirs(run_dir, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise _refusal(
                    run_dir,
                    _read(self.path),
                    "Wait for it to finish, or stop it (SIGTERM or Ctrl-C save a checkpoint "
                    "first), then rerun.",
                ) from None
            # A holder that was releasing may have deleted the file we opened: the
            # lock counts only on the file that is at the path now.
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        self.fd = fd
        try:
            data = (json.dumps(_me(command)) + "\n").encode()
            os.ftruncate(fd, 0)
            os.pwrite(fd, data, 0)
        except BaseException:
            self.release()
            raise

    def release(self) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)  # before unlocking: a waiting opener sees another inode
        os.close(self.fd)
        self.fd = None


class _RemoteLock:
    def __init__(self, run_dir: str, command: str):
        self.path = paths.lock_file(run_dir)
        holder = _read(self.path) if files.exists(self.path) else None
        if files.exists(self.path):
            here = holder and holder.get("host") == socket.gethostname()
            if here and not _alive(holder.get("pid")):
                print(
                    f"Removing the lock of {_holder_text(holder)}: that process is gone.",
                    file=sys.stderr,
                )
                tf.io.gfile.remove(self.path)
            else:
                remedy = (
                    "Wait for it to finish, or stop it, then rerun."
                    if here
                    else "Wait for it to finish, or stop it, then rerun. If that process is "
                    f"gone (e.g. its machine was deleted), remove the lock with "
                    f"`gsutil rm {self.path}` (or tf.io.gfile.remove) and rerun."
                )
                raise _refusal(run_dir, holder, remedy)
        self.me = _me(command)
        files.write_json(self.path, self.me)
        if (_read(self.path) or {}).get("token") != self.me["token"]:
            raise _refusal(run_dir, _read(self.path), "Another command took it at the same time.")

    def release(self) -> None:
        if self.me is not None and (_read(self.path) or {}).get("token") == self.me["token"]:
            tf.io.gfile.remove(self.path)
        self.me = None


@contextlib.contextmanager
def hold(run_dir: str, command: str, *, create: bool = False):
    """Holds `run_dir`'s lock for the `with` block; checks first that the run holds no link.

    Args:
      run_dir: the run directory.
      command: the holder's name in another process's refusal, e.g. 'lth_tf.imp'.
      create: create run_dir if it does not exist (else that is refused).

    Raises:
      RunLockedError: another process holds the lock (nothing is written).
      files.LinkError: the run directory holds a symbolic link (nothing is written).
      rundir.RunDirError: run_dir does not exist and `create` is False.
    """
    if not create and not tf.io.gfile.isdir(run_dir):
        raise RunDirError(
            f"{run_dir} does not exist. Pass the directory `python -m lth_tf.imp` printed as "
            "'Run directory: ...'."
        )
    files.refuse_links(run_dir)
    if not _is_local(run_dir):
        tf.io.gfile.makedirs(run_dir)
    lock = _LocalLock(run_dir, command) if _is_local(run_dir) else _RemoteLock(run_dir, command)
    try:
        yield lock
    finally:
        lock.release()
