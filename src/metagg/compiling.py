"""`torch.compile` where it works, the eager function where it does not; and the
process-wide switch that says whether the simulator's workers are compiled.

    fast = compile_or_eager(fn)     # compiled at the first call; eager (one warning) on failure

    metagg run CONFIG               # workers compiled (the default)
    metagg run CONFIG --no-compile  # eager: the reference path, no compile wait
    METAGG_COMPILE=0 pytest         # the default for a whole process (tests use it)

Compiling needs a C++ compiler and a Python that torch.compile supports, and can fail
at build or at call time; a metagg run must not fail because of it.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
from collections.abc import Callable, Iterator
from typing import Any

import torch

__all__ = ["add_compile_arg", "compile_enabled", "compile_or_eager", "compiling_during",
           "set_compile"]

log = logging.getLogger("metagg")

ENV = "METAGG_COMPILE"
_OFF = {"0", "off", "false", "no"}
_ON = {"1", "on", "true", "yes", ""}
_setting: bool | None = None  # set_compile's value; None: the environment decides


def compile_enabled() -> bool:
    """Whether new simulations compile their workers: `set_compile`'s value, else
    `$METAGG_COMPILE` (0/off/false/no or 1/on/true/yes), else on."""
    if _setting is not None:
        return _setting
    value = os.environ.get(ENV, "").strip().lower()
    if value not in _OFF | _ON:
        raise ValueError(f"${ENV} must be 0/off/false/no or 1/on/true/yes, got {value!r}")
    return value not in _OFF


def set_compile(value: bool | None) -> bool:
    """Compile (True) or not (False) from now on; None: back to `$METAGG_COMPILE`.
    Returns the setting now in effect."""
    global _setting
    _setting = value
    return compile_enabled()


@contextlib.contextmanager
def compiling_during(value: bool | None) -> Iterator[bool]:
    """`set_compile(value)` inside the block (None leaves the setting), the previous after."""
    global _setting
    before = _setting
    try:
        yield compile_enabled() if value is None else set_compile(value)
    finally:
        _setting = before


def add_compile_arg(parser: argparse.ArgumentParser) -> None:
    """Add `--compile/--no-compile` (default: `$METAGG_COMPILE`, else on)."""
    parser.add_argument(
        "--compile", action=argparse.BooleanOptionalAction, default=None,
        help="torch.compile the workers' round (default on, or $METAGG_COMPILE=0 for off): "
             "~1.3-2x more rounds/s after a few seconds of compiling; --no-compile runs "
             "eager, the reference path (metrics agree to float rounding)")


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
