"""A user's function named `package.module:function` (--arch, --dataset, --prune_criterion).

One place imports them, so that every flag that takes one explains a missing module
or function the same way.
"""

import importlib
from collections.abc import Callable


def import_function(spec: str, flag: str) -> Callable:
    """The callable `spec` ('package.module:function') names, for the flag `flag`.

    Raises:
      ValueError: the module cannot be imported or has no such callable; the message
        names the flag, the module and what to do.
    """
    module_name, _, function = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(
            f"--{flag}={spec}: cannot import module {module_name!r} ({e}). The module must "
            "be importable from this process (installed, or on PYTHONPATH)."
        ) from e
    fn = getattr(module, function, None)
    if not callable(fn):
        raise ValueError(f"--{flag}={spec}: module {module_name!r} has no function {function!r}.")
    return fn
