"""`metagg launch`: 1 server + M worker processes on this machine (`metagg.runtime`)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from metagg.compiling import ENV as COMPILE_ENV
from metagg.compiling import add_compile_arg
from metagg.config import load_config
from metagg.runtime.ps import add_runtime_arguments, runtime_options
from metagg.threads import AUTO, add_threads_arg, free_cores

__all__ = ["add_parsers"]


def add_parsers(sub: Any) -> None:
    p = sub.add_parser(
        "launch", help="train with a real parameter server + worker processes on this machine",
        description="Start 1 server + M worker processes (torch.distributed, gloo on "
                    "127.0.0.1) running the config: same metrics as `metagg run`; a worker "
                    "that dies or misses --round-timeout is left out of that round; if the "
                    "server dies the group restarts from the last checkpoint. For many "
                    "machines use torchrun -m metagg.runtime.ps (see README).",
        conflict_handler="resolve")  # our --threads (N|auto) replaces the runtime's (N)
    add_launch_arguments(p)
    p.set_defaults(func=cmd_launch)


def add_launch_arguments(parser: argparse.ArgumentParser) -> None:
    """The `metagg launch` arguments (config, --workers, --out, --resume, --set, timeouts).

    `cmd_launch` also reads `args.verbose` when the parser has one (metagg's `-v`).
    """
    parser.add_argument("config", nargs="?", default=None,
                        help="YAML config file (see configs/); omitted = built-in defaults")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="override a config value (repeatable)")
    parser.add_argument("--workers", type=int, default=None,
                        help="number of worker processes M (default: workers.num_workers)")
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the checkpoint in --out")
    parser.add_argument("--max-restarts", type=int, default=3,
                        help="restarts of the whole group after the server dies (default 3)")
    parser.add_argument("--time-limit", type=float, default=None, metavar="S",
                        help="stop everything after S seconds (exit code 124)")
    add_runtime_arguments(parser)
    add_threads_arg(parser, note="per process; auto = the free cores shared out over the "
                                 "M + 1 processes, at least 1 each")
    add_compile_arg(parser)


def cmd_launch(args: argparse.Namespace) -> int:
    """`metagg launch`: run, then print the summary; returns the exit code."""
    from metagg.runtime.launch import launch

    cfg = load_config(args.config, args.overrides)
    if args.compile is not None:  # the worker processes read it from their environment
        os.environ[COMPILE_ENV] = "1" if args.compile else "0"
    if args.threads == AUTO:  # the processes compute at once: share the free cores out
        processes = (args.workers or cfg.workers.num_workers) + 1
        args.threads = max(1, free_cores() // processes)
    code = launch(cfg, args.out, workers=args.workers, resume=args.resume,
                  options=runtime_options(args), max_restarts=args.max_restarts,
                  time_limit=args.time_limit, verbose=getattr(args, "verbose", False))
    summary = args.out / "summary.json"
    if code == 0 and summary.exists():
        print(summary.read_text())
        print(f"wrote {args.out}/metrics.jsonl, summary.json, runtime.json, checkpoint.*; "
              f"process logs in {args.out}/launch/")
    return code
