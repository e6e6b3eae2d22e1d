"""`torch.compile` where it works, the eager function where it does not.

    fast = compile_or_eager(fn)     # compiled at the first call; eager (one warning) on failure

Compiling needs a C++ compiler and a Python that torch.compile supports, and can fail
at build or at call time; a metagg run must not fail because of it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["compile_or_eager"]

log = logging.getLogger("metagg")


def compile_or_eager(fn: Callable) -> Callable:
    """`torch.compile(fn)`, falling back to `fn` (with a warning) if compiling fails, e.g.
    without a C++ compiler or on a Python torch.compile does not support."""

    def fall_back(exc: Exception) -> None:
        log.warning("torch.compile failed (%s: %s); continuing without it",
                    type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
        use[0] = fn

    use: list[Callable] = [fn]
    try:
        use[0] = torch.compile(fn, dynamic=False)
    except Exception as exc:  # torch's compile errors have no common base class
        fall_back(exc)

    def call(*args: Any) -> Any:
        if use[0] is fn:
            return fn(*args)
        try:
            return use[0](*args)
        except Exception as exc:  # a genuine error in fn is raised again by fn below
            fall_back(exc)
            return fn(*args)

    return call
