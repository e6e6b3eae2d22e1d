"""`torch.compile` where it works, the eager function where it does not; and the
process-wide switch that says whether the simulator's workers are compiled.

    fast = compile_or_eager(fn)     # compiled at the first call; eager (one warning) on failure

    metagg run CONFIG               # auto: compiled when the run has >= 1000 worker steps
    metagg run CONFIG --compile     # always compiled
    metagg run CONFIG --no-compile  # eager: the reference path, no compile wait
    METAGG_COMPILE=0 pytest         # the setting for a whole process (tests use it)

Why auto. Compiling the workers' round costs 2-5 s per process and model shape on this
2-core machine (tracing ~0.6 s, loading the cached kernels ~1.5 s, the rest the
first call; a CNN ~10 s) and saves ~1-4 ms per local step on the small MLPs of the
quickstart and ~4 ms on Fashion-MNIST 784-128-128: it pays from about a thousand
worker steps (rounds x local steps) on. The decision depends on the config only, never
on timing, so a run's numbers do not depend on the machine's load.

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

__all__ = ["AUTO_MIN_STEPS", "add_compile_arg", "compile_enabled", "compile_or_eager",
           "compile_setting", "compiling_during", "describe_setting", "set_compile"]

log = logging.getLogger("metagg")

ENV = "METAGG_COMPILE"
#: auto compiles a run's workers from this many worker steps (rounds x local steps) on
AUTO_MIN_STEPS = 1000
_OFF = {"0", "off", "false", "no"}
_ON = {"1", "on", "true", "yes"}
_AUTO = {"auto", ""}
_setting: bool | None = None  # set_compile's value; None: the environment decides


def compile_setting() -> bool | None:
    """True (compile), False (eager) or None (auto): `set_compile`'s value, else
    `$METAGG_COMPILE` (0/off/false/no, 1/on/true/yes or auto), else auto."""
    if _setting is not None:
        return _setting
    value = os.environ.get(ENV, "").strip().lower()
    if value not in _OFF | _ON | _AUTO:
        raise ValueError(f"${ENV} must be 0/off/false/no, 1/on/true/yes or auto, got {value!r}")
    return None if value in _AUTO else value in _ON


def compile_enabled(worker_steps: int | None = None) -> bool:
    """Whether a run of `worker_steps` worker steps (rounds x local steps; None: unknown,
    a long run) compiles its workers under the current setting."""
    setting = compile_setting()
    if setting is not None:
        return setting
    return worker_steps is None or worker_steps >= AUTO_MIN_STEPS


def set_compile(value: bool | None) -> bool | None:
    """Compile (True), not (False) or auto (None, or `$METAGG_COMPILE` when set) from now
    on. Returns the setting now in effect."""
    global _setting
    _setting = value
    return compile_setting()


@contextlib.contextmanager
def compiling_during(value: bool | None) -> Iterator[bool | None]:
    """`set_compile(value)` inside the block (None leaves the setting), the previous after."""
    global _setting
    before = _setting
    try:
        yield compile_setting() if value is None else set_compile(value)
    finally:
        _setting = before


def describe_setting() -> str:
    """The setting in words, for reports: "compiled", "eager" or "auto"."""
    setting = compile_setting()
    if setting is None:
        return f"workers compiled from {AUTO_MIN_STEPS} worker steps per run on"
    return "compiled workers" if setting else "eager workers"


def add_compile_arg(parser: argparse.ArgumentParser) -> None:
    """Add `--compile/--no-compile` (default: `$METAGG_COMPILE`, else auto)."""
    parser.add_argument(
        "--compile", action=argparse.BooleanOptionalAction, default=None,
        help="torch.compile the workers' round: 1.4-2x more rounds/s after 2-5 s of "
             f"compiling (default auto: runs of >= {AUTO_MIN_STEPS} rounds x local steps; "
             "$METAGG_COMPILE=0/1/auto sets it for a process); --no-compile runs eager, "
             "the reference path (metrics agree to float rounding)")


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
