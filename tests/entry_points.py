"""Entry points run in-process as `app.run` would run them, and a run tree's fingerprint.

Shared by the tests that feed the command lines bad input or damaged runs (test_inputs,
test_fuzz, test_reliability).
"""

import contextlib
import hashlib
import io
import os

from absl import app, flags

from lth_tf import branch, export, flagdefs, imp, report, stability

FLAGS = flags.FLAGS
ENTRY_POINTS = {
    "imp": imp,
    "branch": branch,
    "stability": stability,
    "export": export,
    "report": report,
}


def call(name, *argv, out=None):
    """(exit code, stderr) of entry point `name` run in-process, as app.run would run it.

    What it prints goes to `out` (a text stream) when given, else nowhere.
    Any other exception propagates: a traceback fails the test.
    """
    for module in ENTRY_POINTS.values():
        module.define_flags()
    FLAGS.unparse_flags()
    round_default = FLAGS["round"].default  # per entry point (flagdefs); restored below
    FLAGS.set_default("round", 0 if name == "stability" else None)
    err = io.StringIO()
    with (
        contextlib.redirect_stderr(err),
        contextlib.redirect_stdout(io.StringIO() if out is None else out),
    ):
        try:
            code = ENTRY_POINTS[name].main(flagdefs.parse_flags([name, *argv]))
        except SystemExit as e:
            code = e.code
        except app.UsageError as e:
            code = e.exitcode
            err.write(f"error: {e}\n")
        finally:
            FLAGS.unparse_flags()
            FLAGS.set_default("round", round_default)
    return code or 0, err.getvalue()


def snapshot(root) -> dict:
    """{relative path: sha256} of every file under root."""
    out = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
    return out
