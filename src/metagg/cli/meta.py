"""`metagg meta-train rnn|arnn|lagg|lopt|trust`: argument parsing for `metagg.learned.meta`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from metagg.compiling import compile_enabled
from metagg.config import ConfigError, apply_overrides, parse
from metagg.threads import add_threads_arg

__all__ = ["BPTT_TASKS", "MULTI_TASK_DEFAULTS", "PES_TASKS", "add_parsers"]

# --task shorthands: (dataset, worker model)
BPTT_TASKS = {
    "digits-mlp20": ("digits", "mlp:20:sigmoid"),
    "fmnist-mlp20": ("fashion_mnist", "mlp:20:sigmoid"),
    "fmnist8x8-mlp20": ("fashion_mnist@8", "mlp:20:sigmoid"),
}
# fmnist8x8-mlp is the LAgg-A spec's small-image-mlp-fmst
PES_TASKS = {
    "fmnist8x8-mlp": ("fashion_mnist@8", "mlp:32:relu"),
    "fmnist-mlp": ("fashion_mnist", "mlp:128,128:relu"),
    "digits-mlp": ("digits", "mlp:32:relu"),
}


# `--tasks` runs: the general step (normalised correction, learned schedule) starting
# exactly at SlowMo (α 0.6, β 0.9); inner runs of 100-500 rounds in truncations of 20
# (tasks change more often); meta-loss log(loss / ln C), so relative progress counts the
# same on every task; outer lr 1e-3 → 3e-4 and 16 pairs (4 per task): PES estimates over
# different tasks are noisy; validation on 6 drawn tasks, 2 seeds, at 100 and 300 rounds
MULTI_TASK_DEFAULTS = {"step_mode": "general", "min_inner": 100, "max_inner": 500,
                       "unroll": 20, "meta_loss": "log", "lr": 1e-3, "final_lr": 3e-4,
                       "pairs": 16, "validation_seeds": 2, "validation_rounds": [100, 300]}


def add_parsers(sub: Any) -> None:
    p = sub.add_parser(
        "meta-train", help="meta-train a learned aggregator (rnn/arnn, lagg/lopt, trust)",
        description="Meta-train a learned aggregator and write the best one "
                    "(aggregator.safetensors + .json) to --out; use it with "
                    "--set aggregator=KIND:OUT.")
    kinds = p.add_subparsers(dest="kind", metavar="KIND", required=True)
    for kind, what in (("rnn", "the coordinatewise LSTM/GRU aggregator (Ji et al. 2019)"),
                       ("arnn", "the RNN that also sees each worker's trusted-sample loss")):
        q = kinds.add_parser(kind, help=f"{what}, by truncated BPTT",
                             description=f"Meta-train {what} by truncated BPTT.")
        q.add_argument("--task", default="digits-mlp20", choices=sorted(BPTT_TASKS),
                       help="dataset + worker model (default digits-mlp20)")
        q.add_argument("--tasks", default=None, metavar="FAMILY[,FAMILY...]",
                       help="meta-train on tasks drawn from families instead of one task "
                            "(see `metagg tasks`), e.g. image-mlp,synthetic: dataset, model, "
                            "batch size and partition per task (--set num_tasks=32, "
                            "validation_tasks=4); --workers stays M")
        q.add_argument("--workers", type=int, default=10,
                       help="number of workers M (default 10)")
        q.add_argument("--iterations", type=int, default=300,
                       help="meta-iterations (default 300)")
        q.add_argument("--attack", default="none", metavar="NAME[,NAME...]:B",
                       help="train against an attack, e.g. ipm:7, or a mixture "
                            "ipm,sign_flip,none:7 (default none)")
        _common(q, "MetaTrainConfig field, e.g. --set cell=gru --set unroll=50",
                "continue an interrupted run from --out's checkpoint (same options; "
                "--iterations may be raised)")
        q.set_defaults(func=cmd_meta_train)
    q = kinds.add_parser(
        "trust", help="the learned trust-weighted robust rule, by ES over an attack mixture",
        description="Meta-train the learned trust rule (metagg.learned.trust) by antithetic "
                    "evolution strategies: each pair of runs meets one setting of an attack "
                    "mixture (every attack at 3/10 and 7/10, none; worker momentum in 30 %, "
                    "Dirichlet data in 20 %), the white-box attacker optimising against the "
                    "current rule. Starts as a soft Zeno unless --init-from is given.")
    q.add_argument("--task", default="digits-mlp20", choices=sorted(BPTT_TASKS),
                   help="dataset + worker model (default digits-mlp20, no download)")
    q.add_argument("--steps", type=int, default=None, help="ES outer steps (default 300)")
    q.add_argument("--settings", default=None, metavar="ATTACK:B[,ATTACK:B...]",
                   help="the attack mixture (default: the shipped rule's last stage; attack "
                        "names: `metagg list`), e.g. none:0,ipm:7,sign_flip:7")
    q.add_argument("--init-from", default=None, metavar="PATH",
                   help="start from saved trust weights (e.g. pretrained/robust) instead of "
                        "the soft-Zeno initialisation")
    _common(q, "MetaTrainTrustConfig field, e.g. --set pairs=8 --set dirichlet_prob=0",
            "continue from the checkpoint in --out (same result as an uninterrupted run "
            "with the same --threads; --steps may be raised)")
    q.set_defaults(func=cmd_meta_train)
    for kind, what in (("lagg", "LAgg-A (sees every worker's update; fixed K)"),
                       ("lopt", "LOpt-A (sees the mean update; any K)")):
        q = kinds.add_parser(kind, help=f"{what}, by persistent evolution strategies",
                             description=f"Meta-train {what} (Joseph et al. 2025) by truncated "
                                         "PES with vmapped antithetic perturbations.")
        q.add_argument("--task", default="fmnist8x8-mlp", choices=sorted(PES_TASKS),
                       help="dataset + worker model (default fmnist8x8-mlp: 8×8 Fashion-MNIST, "
                            "MLP 64-32-10 ReLU; digits-mlp needs no download)")
        q.add_argument("--tasks", default=None, metavar="FAMILY[,FAMILY...]",
                       help="meta-train on task families instead of one task (see `metagg "
                            "tasks`), e.g. image-mlp,synthetic,lm: general step mode, any K; "
                            "--task/--workers/--local-steps are then drawn per task")
        q.add_argument("--workers", type=int, default=8, help="number of workers K (default 8)")
        q.add_argument("--local-steps", type=int, default=4,
                       help="local SGD steps H per round (default 4)")
        q.add_argument("--steps", type=int, default=None,
                       help="PES outer steps (default: the config's, 5000)")
        q.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                       help="torch.compile the inner training and the learned step (default "
                            "on unless $METAGG_COMPILE=0: ~1.3× faster outer steps after ~30 s; "
                            "--no-compile for eager)")
        _common(q, "MetaTrainPESConfig field, e.g. --set step_mode=reference --set pairs=4",
                "continue from the checkpoint in --out (same result as an uninterrupted run "
                "with the same --compile and --threads)")
        q.set_defaults(func=cmd_meta_train)


def _common(q: argparse.ArgumentParser, fields: str, resume: str) -> None:
    q.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help=f"any other {fields} (repeatable; values are YAML)")
    add_threads_arg(q)
    q.add_argument("--resume", action="store_true", help=resume)
    q.add_argument("--out", type=Path, required=True, help="output directory")


def cmd_meta_train(args: argparse.Namespace) -> int:
    from metagg.config.meta import MetaTrainConfig, MetaTrainPESConfig, MetaTrainTrustConfig
    from metagg.learned.meta import meta_train

    options: dict[str, Any]
    compile = False
    if args.kind == "trust":
        dataset, model = BPTT_TASKS[args.task]
        options = {"dataset": dataset, "model": model}
        for key in ("steps", "settings", "init_from"):
            if getattr(args, key) is not None:
                options[key] = getattr(args, key)
        cls: type = MetaTrainTrustConfig
    elif args.kind in ("lagg", "lopt"):
        if args.tasks:
            # one φ for every task: the general parameterisation, a small initial correction
            options = {"kind": args.kind, "tasks": args.tasks, **MULTI_TASK_DEFAULTS}
        else:
            dataset, model = PES_TASKS[args.task]
            options = {"kind": args.kind, "dataset": dataset, "model": model,
                       "num_workers": args.workers, "local_steps": args.local_steps}
        if args.steps is not None:
            options["steps"] = args.steps
        cls = MetaTrainPESConfig
        compile = compile_enabled() if args.compile is None else args.compile  # auto: on
    else:
        dataset, model = BPTT_TASKS[args.task]
        options = {"dataset": dataset, "model": model, "num_workers": args.workers,
                   "iterations": args.iterations, "arnn": args.kind == "arnn"}
        if args.tasks:
            options["tasks"] = args.tasks
        if args.attack != "none":
            name, _, count = args.attack.partition(":")
            if not count.isdigit():
                raise ConfigError(f"--attack expects NAME:COUNT (e.g. ipm:7), got {args.attack!r}")
            options.update(attack=name, num_byzantine=int(count))
        cls = MetaTrainConfig
    cfg = parse(cls, apply_overrides(options, args.overrides))
    result = meta_train(cfg, out_dir=args.out, resume=args.resume, progress=True,
                        compile=compile, threads=args.threads)
    print(json.dumps(result.summary, indent=2))
    print(f"use it: metagg run CONFIG --set aggregator={args.kind}:{args.out}")
    return 0
