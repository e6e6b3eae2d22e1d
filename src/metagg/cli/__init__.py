"""The `metagg` command line: argument parsing only; every command calls a library function.

    metagg demo                                   # mean vs median on digits, table + plot
    metagg run CONFIG.yaml --set rounds=300 --out runs/x [--resume]
    metagg compare CONFIG.yaml --aggregators mean,median --seeds 3 --out runs/cmp
    metagg meta-train rnn --task digits-mlp20 --workers 10 --out runs/rnn
    metagg tune CONFIG.yaml --baseline slowmo --budget 300 --out runs/tune
    metagg launch CONFIG.yaml --workers 10 --out runs/ps     # real processes, torch.distributed
    metagg reproduce ji2019|joseph2025 --scale quick --out runs/repro
    metagg list                                   # aggregators, attacks, datasets, models
    metagg tasks [sample --families image-mlp,lm]  # task families and the held-out suite

One module per group of commands (`run`: run, compare, demo, tune, list, data, zoo;
`launch`; `meta`: meta-train; `reproduce`; `tasks`); each registers its sub-commands with the
function that runs them.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

import yaml

from metagg import __version__
from metagg.checkpoint import CheckpointError
from metagg.cli import launch, meta, reproduce, run, tasks
from metagg.config import ConfigError

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="metagg",
        description="Learned and robust aggregation for distributed training.",
    )
    parser.add_argument("--version", action="version", version=f"metagg {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    run.add_parsers(sub)
    meta.add_parsers(sub)
    launch.add_parsers(sub)
    reproduce.add_parsers(sub)
    tasks.add_parsers(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    group = _command_group(parser, argv)
    if group is not None:  # `metagg reproduce`: its commands, not just a usage line
        group.print_help()
        return 2
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if args.command is None:  # `metagg`: every command with its one-line help
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except (ConfigError, CheckpointError, OSError, ValueError, yaml.YAMLError) as exc:
        # User errors (bad config, data, files, YAML): one line, no traceback.
        message = " ".join(str(exc).split())
        print(f"metagg {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _command_group(parser: argparse.ArgumentParser,
                   argv: list[str]) -> argparse.ArgumentParser | None:
    """The parser of a command that has sub-commands of its own (`metagg reproduce`,
    `metagg meta-train`) when argv names it and nothing else; else None."""
    words = [a for a in argv if a not in ("-v", "--verbose")]
    if len(words) != 1:
        return None
    commands = _subcommands(parser)
    command = commands.get(words[0]) if commands else None
    return command if command is not None and _subcommands(command) else None


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}

