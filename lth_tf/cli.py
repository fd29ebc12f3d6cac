"""What every entry point shares: stop requests, and how a failure becomes a message and an exit code.

`exit_code(body)` runs an entry point's work and maps lth_tf's expected
failures to one message on stderr and one exit code, the same in
`lth_tf.imp`, `branch`, `stability`, `export` and `report`:

    0    done
    2    bad input or a refused run (ValueError, FileNotFoundError: a damaged
         or inconsistent run, a run locked by another process, ...), or a full
         disk (`disk_full`: OSError ENOSPC/EDQUOT, or TensorFlow's
         ResourceExhaustedError from a file write)
    3    training diverged (DivergedError)
    130  stopped by SIGINT, 143 by SIGTERM (Interrupted; a checkpoint was saved)

Anything else is a bug and keeps its traceback. No model is built here, so the
report entry point can use it without the training stack.
"""

import errno
import os
import sys

from lth_tf.keras import tf

EXIT_REFUSED = 2
EXIT_DIVERGED = 3


class DivergedError(RuntimeError):
    """Training produced a NaN or Inf loss."""


class Interrupted(RuntimeError):
    """Training stopped on SIGINT/SIGTERM after saving a resumable checkpoint."""


class StopRequest:
    """Set by the entry points' signal handlers; training stops at the next batch boundary."""

    signal_name: str | None = None

    @classmethod
    def install(cls) -> None:
        """SIGINT and SIGTERM request a clean stop; a second SIGINT stops at once.

        Building a MultiWorkerMirroredStrategy replaces the SIGTERM handler (TF's
        coordination service installs its own preemption notifier): entry points
        call this again once their strategy is built.
        """
        import signal

        def handler(signum, frame):
            name = signal.Signals(signum).name
            if cls.signal_name is not None and signum == signal.SIGINT:
                raise KeyboardInterrupt
            cls.signal_name = name
            print(
                f"\n{name} received: saving a checkpoint at the next step, then stopping. "
                "Rerun the same command to resume.",
                flush=True,
            )

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)


_FULL = {errno.ENOSPC: os.strerror(errno.ENOSPC), errno.EDQUOT: os.strerror(errno.EDQUOT)}


def disk_full(error: BaseException) -> str | None:
    """What filled up, when `error` (or an error it was raised from) is a full disk or quota.

    A full disk reaches Python as OSError(ENOSPC) or OSError(EDQUOT) through
    the os and io modules, and as tf.errors.ResourceExhaustedError ("PATH; No
    space left on device") through tf.io.gfile and TensorFlow's checkpoint
    writers. An out-of-memory ResourceExhaustedError is not a full disk.
    """
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in _FULL:
            where = f" writing {error.filename}" if error.filename else ""
            return f"{_FULL[error.errno]}{where}"
        if isinstance(error, tf.errors.ResourceExhaustedError):
            message = str(error.message)
            for text in _FULL.values():
                if text in message:
                    return message.strip()[:300]
        error = error.__cause__ or error.__context__
    return None


def exit_code(body) -> int:
    """Runs `body()` (an entry point's work, returning None or an exit code) and maps failures.

    See the module docstring for the codes. Messages go to stderr, one per failure.
    """
    try:
        return body() or 0
    except Interrupted as e:
        print(str(e), file=sys.stderr)
        return 130 if StopRequest.signal_name == "SIGINT" else 143
    except DivergedError as e:
        print(f"error: training diverged: {e}", file=sys.stderr)
        return EXIT_DIVERGED
    except Exception as e:
        full = disk_full(e)
        if full:
            print(
                f"error: the disk is full ({full}). Free some space and rerun the same "
                "command: what was finished is kept unchanged (finished rounds, files written "
                "whole), and the rest resumes from its last checkpoint.",
                file=sys.stderr,
            )
            return EXIT_REFUSED
        if isinstance(e, (ValueError, FileNotFoundError)):
            print(f"error: {e}", file=sys.stderr)
            return EXIT_REFUSED
        raise
