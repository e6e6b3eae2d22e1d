"""The `metagg` command line.

    metagg demo                                   # mean vs median on digits, table + plot
    metagg run CONFIG.yaml --set rounds=300 --out runs/x [--resume]
    metagg compare CONFIG.yaml --aggregators mean,median --seeds 3 --out runs/cmp
    metagg meta-train rnn --task digits-mlp20 --workers 10 --out runs/rnn
    metagg tune CONFIG.yaml --baseline slowmo --budget 300 --out runs/tune
    metagg launch CONFIG.yaml --workers 10 --out runs/ps     # real processes, torch.distributed
    metagg reproduce ji2019|joseph2025 --scale quick --out runs/repro
    metagg list                                   # aggregators, attacks, datasets, models
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import yaml

from metagg import __version__
from metagg.checkpoint import CheckpointError
from metagg.config import ConfigError, build_dataclass, load_config

__all__ = ["main"]

DEMO_AGGREGATORS = ("mean", "median")
# kept here so that `metagg --help` does not import the training stack
BASELINE_NAMES = ("fedavg", "slowmo", "fedadam", "sgd", "adam")
# --task shorthands for meta-training: (dataset, model)
META_TASKS = {
    "digits-mlp20": ("digits", "mlp:20:sigmoid"),
    "fmnist-mlp20": ("fashion_mnist", "mlp:20:sigmoid"),
    "fmnist8x8-mlp20": ("fashion_mnist@8", "mlp:20:sigmoid"),
}


def _add_config_args(p: argparse.ArgumentParser, *, config_required: bool = True) -> None:
    p.add_argument("config", nargs=None if config_required else "?", default=None,
                   help="YAML config file (see configs/); omitted = built-in defaults")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set rounds=300 --set optimizer.lr=0.5 "
                        "(repeatable; values are YAML)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="metagg",
        description="Learned and robust aggregation for distributed training.",
    )
    parser.add_argument("--version", action="version", version=f"metagg {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("run", help="train once with one aggregator (simulated workers)",
                       description="Train with simulated workers and write metrics.jsonl, "
                                   "summary.json, curves.png and checkpoints to --out.")
    _add_config_args(p, config_required=False)
    p.add_argument("--out", type=Path, default=None, help="output directory (default: none)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the checkpoint in --out (same metrics as an "
                        "uninterrupted run)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    p = sub.add_parser("compare", help="several aggregators x seeds on one setting",
                       description="Run the same setting for several aggregators and seeds; "
                                   "write results.csv, results.md (mean ± std) and curves.png.")
    _add_config_args(p, config_required=False)
    p.add_argument("--aggregators", required=True,
                   help="comma-separated aggregator names, e.g. mean,median,krum")
    p.add_argument("--attacks", default=None,
                   help="comma-separated attack settings name:count[:key=value], e.g. "
                        "none,sign_flip:3,alie:7,ipm:3:eps=100 (default: the config's attack); "
                        "gives an aggregator x attack accuracy table")
    p.add_argument("--aggregator-options", default=None, metavar="YAML",
                   help="per-aggregator options as a YAML mapping, e.g. "
                        "'{centered_clip: {tau: 0.3, iters: 3}}'")
    p.add_argument("--seeds", type=int, default=3, help="number of seeds (default 3)")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted table in --out: finished runs are kept, a "
                        "started one continues from its checkpoint")
    p.add_argument("--out", type=Path, required=True, help="output directory")

    p = sub.add_parser("demo", help="quick demo: mean vs coordinate median on digits",
                       description="10 simulated workers train an MLP on the built-in digits "
                                   "data with mean and with coordinate-median aggregation; "
                                   "prints a table and writes a learning-curve plot.")
    p.add_argument("--out", type=Path, default=Path("runs/demo"),
                   help="output directory (default runs/demo)")
    p.add_argument("--rounds", type=int, default=300, help="rounds per run (default 300)")

    from metagg.learned.meta_pes import add_meta_train_pes_arguments

    p = sub.add_parser(
        "meta-train", help="meta-train a learned aggregator (rnn/arnn, lagg/lopt)",
        description="Meta-train a learned aggregator and write the best one "
                    "(aggregator.safetensors + .json) to --out; use it with "
                    "--set aggregator=KIND:OUT.")
    kinds = p.add_subparsers(dest="kind", metavar="KIND", required=True)
    for kind, what in (("rnn", "the coordinatewise LSTM/GRU aggregator (Ji et al. 2019)"),
                       ("arnn", "the RNN that also sees each worker's trusted-sample loss")):
        q = kinds.add_parser(kind, help=f"{what}, by truncated BPTT",
                             description=f"Meta-train {what} by truncated BPTT.")
        q.add_argument("--task", default="digits-mlp20", choices=sorted(META_TASKS),
                       help="dataset + worker model (default digits-mlp20)")
        q.add_argument("--workers", type=int, default=10,
                       help="number of workers M (default 10)")
        q.add_argument("--iterations", type=int, default=300,
                       help="meta-iterations (default 300)")
        q.add_argument("--attack", default="none", metavar="NAME[,NAME...]:B",
                       help="train against an attack, e.g. ipm:7, or a mixture "
                            "ipm,sign_flip,none:7 (default none)")
        q.add_argument("--set", dest="overrides", action="append", default=[],
                       metavar="KEY=VALUE",
                       help="any other MetaTrainConfig field, e.g. --set cell=gru "
                            "--set unroll=50")
        q.add_argument("--threads", type=int, default=1,
                       help="torch threads (default 1: as fast for small models, robust "
                            "to load)")
        q.add_argument("--resume", action="store_true",
                       help="continue an interrupted run from --out's meta_checkpoint (same "
                            "options; --iterations may be raised)")
        q.add_argument("--out", type=Path, required=True, help="output directory")
    for kind, what in (("lagg", "LAgg-A (sees every worker's update; fixed K)"),
                       ("lopt", "LOpt-A (sees the mean update; any K)")):
        q = kinds.add_parser(kind, help=f"{what}, by persistent evolution strategies",
                             description=f"Meta-train {what} (Joseph et al. 2025) by truncated "
                                         "PES with vmapped antithetic perturbations.")
        add_meta_train_pes_arguments(q)

    p = sub.add_parser("zoo", help="pretrained aggregators shipped in the package",
                       description="List the pretrained learned aggregators shipped with "
                                   "metagg; use one with --set aggregator=KIND:pretrained/NAME.")
    p.add_argument("action", choices=["list"], help="what to do")

    sub.add_parser("list", help="list aggregators, attacks, datasets, partitions, models")

    p = sub.add_parser(
        "data", help="where the datasets are; download or check one",
        description="list: where each dataset would be loaded from, or how to get it; "
                    "download NAME: fetch Fashion-MNIST, MNIST or CIFAR-10 with checksums "
                    "(needs network); check NAME: load it and print its sizes.")
    p.add_argument("action", choices=["list", "download", "check"], nargs="?", default="list")
    p.add_argument("name", nargs="?", help="dataset (download/check): fashion_mnist, mnist, "
                                           "cifar10 or digits")
    p.add_argument("--data-dir", default=None,
                   help="folder to search first (DIR and DIR/NAME); downloads go to "
                        "DIR/NAME (default: $METAGG_DATA_DIR/NAME, else ~/.cache/metagg/NAME)")

    from metagg.runtime.launch import add_launch_arguments

    p = sub.add_parser(
        "launch", help="train with a real parameter server + worker processes on this machine",
        description="Start 1 server + M worker processes (torch.distributed, gloo on "
                    "127.0.0.1) running the config: same metrics as `metagg run`; a worker "
                    "that dies or misses --round-timeout is left out of that round; if the "
                    "server dies the group restarts from the last checkpoint. For many "
                    "machines use torchrun -m metagg.runtime.ps (see README).")
    add_launch_arguments(p)

    p = sub.add_parser(
        "tune", help="grid-search a baseline (FedAvg, SlowMo, server Adam, SGD, Adam)",
        description="Grid-search a baseline on the config's task as Joseph et al. (2025) "
                    "do: every grid point trains for --budget rounds and is scored by its "
                    "final training loss (mean over --seeds). Writes trials.csv, summary.json "
                    "and best.yaml (a config you can `metagg run`). Grids: local lr "
                    "{1,.5,.3,.1}; server lr 1..1e-5; SlowMo beta {.99..55}; H {4,8,16,32}.")
    _add_config_args(p, config_required=False)
    p.add_argument("--baseline", "--aggregator", dest="baseline", required=True,
                   choices=sorted(BASELINE_NAMES), help="which baseline to tune")
    p.add_argument("--budget", type=int, required=True,
                   help="communication rounds per trial (the round the score is taken at)")
    p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                   help="replace or fix a grid axis, e.g. --grid workers.local_steps=4 "
                        "--grid optimizer.lr=0.3,0.1 (repeatable)")
    p.add_argument("--seeds", type=int, default=1, help="seeds per grid point (default 1)")
    p.add_argument("--metric", default="train_loss",
                   choices=["train_loss", "test_loss", "test_accuracy"],
                   help="what to optimise (default train_loss, as the paper)")
    p.add_argument("--max-trials", type=int, default=None,
                   help="sample this many grid points (seeded) if the grid is larger")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: fastest for small models)")
    p.add_argument("--resume", action="store_true",
                   help="keep the trials an interrupted search in --out finished")
    p.add_argument("--out", type=Path, required=True, help="output directory")

    p = sub.add_parser("reproduce", help="reproduce a paper's figures and tables",
                       description="One command per paper: runs the experiments and writes "
                                   "figures (PNG), tables (CSV) and report.md to --out.")
    papers = p.add_subparsers(dest="paper", metavar="PAPER", required=True)
    from metagg.experiments.ji2019 import add_reproduce_ji2019_arguments

    q = papers.add_parser(
        "ji2019", help="learned gradient aggregation, figures 4-7 (Ji et al. 2019)",
        description="Figures 4 (RNN/ARNN vs tuned SGD/Adam averaging), 5 (transfer to other "
                    "models and class subsets), 6 (ARNN under Byzantine attack) and 7 (§5.5 "
                    "heterogeneous worker models) with the shipped aggregators; Fashion-MNIST "
                    "and digits stand in for MNIST/CIFAR when those are not on disk.")
    add_reproduce_ji2019_arguments(q)
    q = papers.add_parser(
        "joseph2025", help="LAgg-A / LOpt-A vs tuned FedAvg, SlowMo, Adam (Joseph et al. 2025)",
        description="Tune the baselines on the 8x8 Fashion-MNIST task, run the learned "
                    "optimizers and the tuned baselines on held-out seeds, and report rounds "
                    "to reach the best baseline's loss, plus generalisation to 784-128-128 "
                    "(and conv-c10 when CIFAR-10 is on disk: then hours on a CPU), other K "
                    "and H. quick: ~300 rounds, 3 seeds; full: 1000 rounds, 10 seeds.")
    q.add_argument("--scale", choices=["quick", "full"], default="quick",
                   help="how much to run (default quick)")
    q.add_argument("--lagg", default=None,
                   help="LAgg-A to evaluate, e.g. lagg:runs/lagg (default: the shipped one)")
    q.add_argument("--lopt", default=None,
                   help="LOpt-A to evaluate, e.g. lopt:runs/lopt (default: the shipped one)")
    q.add_argument("--no-generalization", dest="generalization", action="store_false",
                   help="only the meta-training task (skip 784-128-128, conv-c10, other K/H)")
    q.add_argument("--resume", action="store_true",
                   help="keep the tuning trials and evaluation runs an interrupted run in "
                        "--out finished")
    q.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    q.add_argument("--out", type=Path, required=True, help="output directory")

    return parser


def _print_results(out: Path) -> None:
    print((out / "results.md").read_text())
    print(f"wrote {out / 'results.csv'}, {out / 'results.md'}, {out / 'curves.png'}")


def cmd_run(args: argparse.Namespace) -> int:
    from metagg.simulation import Simulation

    cfg = load_config(args.config, args.overrides)
    if args.resume and args.out is None:
        raise ConfigError("--resume needs --out DIR (the directory holding the checkpoint)")
    sim = Simulation(cfg)
    summary = sim.run(args.out, resume=args.resume,
                      progress=None if not args.no_progress else False)
    print(json.dumps(summary, indent=2))
    if args.out is not None:
        print(f"wrote {args.out}/metrics.jsonl, summary.json, curves.png, checkpoint.*")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from metagg.compare import compare

    cfg = load_config(args.config, args.overrides)
    names = [a.strip() for a in args.aggregators.split(",") if a.strip()]
    if not names:
        raise ConfigError("--aggregators: give at least one name")
    for name in names:  # fail before any run starts
        load_config(args.config, [*args.overrides, f"aggregator.name={name}"])
    if args.seeds < 1:
        raise ConfigError(f"--seeds must be >= 1, got {args.seeds}")

    attacks = None
    if args.attacks:
        from metagg.compare import parse_attack_setting

        attacks = [a.strip() for a in args.attacks.split(",") if a.strip()]
        for a in attacks:  # fail before any run starts
            name, b, _ = parse_attack_setting(a)
            load_config(args.config, [*args.overrides, f"attack.name={name}",
                                      f"attack.num_byzantine={b}"])

    def report(agg: str, attack: str, seed: int, s: dict | None) -> None:
        where = f"  {agg:<18} {attack:<16} seed {seed}:"
        if s is None:
            print(f"{where} n/a (rule undefined here)", flush=True)
            return
        print(f"{where} test acc {100 * s['final_test_accuracy']:.1f} %, "
              f"train loss {s['final_train_loss']:.4f} ({s['wall_s']:.1f} s)", flush=True)

    agg_options = {}
    if args.aggregator_options:
        import yaml

        agg_options = yaml.safe_load(args.aggregator_options)
        if not isinstance(agg_options, dict) or not all(
                isinstance(v, dict) for v in agg_options.values()):
            raise ConfigError("--aggregator-options: expected a mapping name -> {option: value}")
        unknown = sorted(set(agg_options) - set(names))
        if unknown:
            raise ConfigError(f"--aggregator-options: {unknown} not in --aggregators")
    compare(cfg, names, seeds=args.seeds, out_dir=args.out, attacks=attacks,
            aggregator_options=agg_options, on_run=report, resume=args.resume)
    _print_results(args.out)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from metagg.compare import compare

    cfg = load_config(None, [f"rounds={args.rounds}", "eval_every=10"])
    print(f"metagg demo: {cfg.workers.num_workers} workers, {cfg.model} on digits, "
          f"{cfg.rounds} rounds, server SGD lr {cfg.optimizer.lr:g}", flush=True)
    start = time.perf_counter()
    compare(cfg, DEMO_AGGREGATORS, seeds=1, out_dir=args.out)
    _print_results(args.out)
    print(f"demo finished in {time.perf_counter() - start:.1f} s")
    return 0


def cmd_meta_train(args: argparse.Namespace) -> int:

    if args.kind in ("lagg", "lopt"):
        from metagg.learned.meta_pes import cmd_meta_train_pes

        return cmd_meta_train_pes(args)

    from metagg.data import load_dataset
    from metagg.learned import MetaTrainConfig, meta_train

    dataset, model = META_TASKS[args.task]
    image_size = None
    if "@" in dataset:
        dataset, size = dataset.split("@")
        image_size = int(size)
    options: dict = {"dataset": dataset, "model": model, "num_workers": args.workers,
                     "iterations": args.iterations, "arnn": args.kind == "arnn",
                     "out_dir": str(args.out)}
    if args.attack != "none":
        name, _, count = args.attack.partition(":")
        if not count.isdigit():
            raise ConfigError(f"--attack expects NAME:COUNT (e.g. ipm:7), got {args.attack!r}")
        options.update(attack=name, num_byzantine=int(count))
    cfg = build_dataclass(MetaTrainConfig, options, args.overrides, "meta-train")
    data = load_dataset(cfg.dataset, data_dir=cfg.data_dir, image_size=image_size)
    result = meta_train(cfg, data=data, threads=args.threads, resume=args.resume)
    print(json.dumps({"best_iteration": result.best_iteration, "best_score": result.best_score,
                      "path": str(result.path)}, indent=2))
    print(f"use it: metagg run CONFIG --set aggregator={args.kind}:{args.out}")
    return 0


def cmd_launch(args: argparse.Namespace) -> int:
    from metagg.runtime.launch import cmd_launch as launch

    return launch(args)


def cmd_tune(args: argparse.Namespace) -> int:
    import torch

    from metagg.tune import parse_grid, tune

    cfg = load_config(args.config, args.overrides)
    torch.set_num_threads(max(1, args.threads))

    def report(row: dict) -> None:
        point = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
                          for k, v in row.items()
                          if k not in ("trial", args.metric, "std", "seeds", "diverged", "wall_s"))
        score = "diverged" if row["diverged"] else f"{args.metric} {row[args.metric]:.4f}"
        print(f"  trial {row['trial']:>3}: {point}: {score} ({row['wall_s']:.1f} s)", flush=True)

    result = tune(cfg, args.baseline, budget=args.budget, out_dir=args.out, seeds=args.seeds,
                  grid=parse_grid(args.grid), metric=args.metric, max_trials=args.max_trials,
                  on_trial=report, resume=args.resume)
    best = ", ".join(f"{k}={v}" for k, v in result["best"].items())
    print(f"best {args.baseline} ({result['trials']} trials): {best} -> "
          f"{args.metric} {result['score']:.4f}")
    print(f"wrote {args.out}/trials.csv, summary.json, best.yaml")
    return 0


def cmd_reproduce(args: argparse.Namespace) -> int:
    if args.paper == "ji2019":
        from metagg.experiments.ji2019 import cmd_reproduce_ji2019

        return cmd_reproduce_ji2019(args)
    import torch

    from metagg.experiments import joseph2025 as j

    torch.set_num_threads(max(1, args.threads))
    j.reproduce_joseph2025(args.out, scale=args.scale, lagg=args.lagg or j.LAGG_PRETRAINED,
                           lopt=args.lopt or j.LOPT_PRETRAINED,
                           generalization=args.generalization, resume=args.resume)
    print((args.out / "report.md").read_text())
    return 0


def cmd_zoo(args: argparse.Namespace) -> int:
    from metagg.compare import format_table
    from metagg.learned.zoo import zoo_rows

    rows = zoo_rows()
    if not rows:
        print("no pretrained aggregators shipped")
        return 0
    print(format_table(list(rows[0]), [list(r.values()) for r in rows]))
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from metagg.aggregators.optimizers import OPTIMIZERS
    from metagg.aggregators.registry import aggregator_names
    from metagg.attacks import ATTACKS
    from metagg.data import DATASETS, PARTITIONS
    from metagg.models import MODEL_HELP

    print("aggregators:", ", ".join(aggregator_names()))
    print("server optimizers:", ", ".join(OPTIMIZERS))
    print("attacks:", ", ".join(ATTACKS))
    print("datasets:", ", ".join(DATASETS))
    print("partitions:", ", ".join(PARTITIONS))
    print(MODEL_HELP)
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    from metagg.data import load_dataset, sources

    files = ("fashion_mnist", "mnist", "cifar10")
    if args.action == "list":
        print(f"{'digits':<14} built in (scikit-learn's 8x8 digits)")
        for name in files:
            found, dirs = sources.locate(name, args.data_dir)
            if found is not None:
                print(f"{name:<14} {found}")
            else:
                print(f"{name:<14} missing (searched {', '.join(map(str, dirs))}); "
                      f"`metagg data download {name}` with network, or put the files in one "
                      "of those folders")
        print(f"{'npz':<14} your own arrays: data.name=npz, data.path=FILE.npz")
        return 0
    if args.name is None:
        raise ConfigError(f"metagg data {args.action}: name a dataset ({', '.join(files)})")
    from metagg.data.datasets import normalize_name

    name = normalize_name(args.name)
    data_dir = args.data_dir
    if args.action == "download" and data_dir is not None:
        # into DIR/NAME: MNIST and Fashion-MNIST files have the same names
        data_dir = str(Path(data_dir) / name)
    ds = load_dataset(name, data_dir=data_dir, download=args.action == "download")
    where = sources.locate(name, data_dir)[0] if name in files else "built in"
    print(f"{ds.name}: {len(ds.y_train)} train + {len(ds.y_test)} test examples of shape "
          f"{tuple(ds.input_shape)}, {ds.num_classes} classes ({where})")
    return 0


COMMANDS = {"run": cmd_run, "compare": cmd_compare, "demo": cmd_demo,
            "meta-train": cmd_meta_train, "tune": cmd_tune,
            "launch": cmd_launch, "reproduce": cmd_reproduce, "zoo": cmd_zoo, "list": cmd_list,
            "data": cmd_data}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return COMMANDS[args.command](args)
    except (ConfigError, CheckpointError, OSError, ValueError, yaml.YAMLError) as exc:
        # User errors (bad config, data, files, YAML): one line, no traceback.
        message = " ".join(str(exc).split())
        print(f"metagg {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
