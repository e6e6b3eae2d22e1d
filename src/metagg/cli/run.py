"""`metagg run`, `compare`, `demo`, `tune`, `list`, `data` and `zoo`."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import re
import time
from pathlib import Path
from typing import Any

from metagg.compiling import add_compile_arg, set_compile
from metagg.config import ConfigError, load_config
from metagg.threads import add_threads_arg, apply_threads

__all__ = ["add_config_args", "add_parsers"]

DEMO_AGGREGATORS = ("mean", "median")
# kept here so that `metagg --help` does not import the tuning code
BASELINE_NAMES = ("fedavg", "slowmo", "fedadam", "sgd", "adam")


def add_config_args(p: argparse.ArgumentParser, *, config_required: bool = True) -> None:
    """The config file and its `--set KEY=VALUE` overrides."""
    p.add_argument("config", nargs=None if config_required else "?", default=None,
                   help="YAML config file (see configs/); omitted = built-in defaults")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set rounds=300 --set optimizer.lr=0.5 "
                        "(repeatable; values are YAML)")


def add_parsers(sub: Any) -> None:
    p = sub.add_parser("run", help="train once with one aggregator (simulated workers)",
                       description="Train with simulated workers and write metrics.jsonl, "
                                   "summary.json, curves.png and checkpoints to --out.")
    add_config_args(p, config_required=False)
    p.add_argument("--out", type=Path, default=None, help="output directory (default: none)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the checkpoint in --out (same metrics as an "
                        "uninterrupted run)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the results already in --out (default: refuse)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_threads_arg(p)
    add_compile_arg(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("compare", help="several aggregators x seeds on one setting",
                       description="Run the same setting for several aggregators and seeds; "
                                   "write results.csv, results.md (mean ± std) and curves.png.")
    add_config_args(p, config_required=False)
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
    p.add_argument("--overwrite", action="store_true",
                   help="replace the results already in --out (default: refuse)")
    p.add_argument("--out", type=Path, required=True, help="output directory")
    add_threads_arg(p)
    add_compile_arg(p)
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("demo", help="quick demo: mean vs coordinate median on digits",
                       description="10 simulated workers train an MLP on the built-in digits "
                                   "data with mean and with coordinate-median aggregation; "
                                   "prints a table and writes a learning-curve plot.")
    p.add_argument("--out", type=Path, default=Path("runs/demo"),
                   help="output directory (default runs/demo)")
    p.add_argument("--rounds", type=int, default=300, help="rounds per run (default 300)")
    add_threads_arg(p)
    add_compile_arg(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("zoo", help="pretrained aggregators shipped in the package",
                       description="List the pretrained learned aggregators shipped with "
                                   "metagg; use one with --set aggregator=KIND:pretrained/NAME.")
    p.add_argument("action", choices=["list"], help="what to do")
    p.set_defaults(func=cmd_zoo)

    p = sub.add_parser("list", help="aggregators and attacks with their options; data, models")
    p.set_defaults(func=cmd_list)

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
    p.set_defaults(func=cmd_data)

    p = sub.add_parser(
        "tune", help="grid-search a baseline (fedavg, slowmo, fedadam, sgd, adam)",
        description="Grid-search a baseline on the config's task as Joseph et al. (2025) "
                    "do: every grid point trains for --budget rounds and is scored by its "
                    "final training loss (mean over --seeds). Writes trials.csv, summary.json "
                    "and best.yaml (a config you can `metagg run`). Grids: local lr "
                    "{1,.5,.3,.1}; server lr 1..1e-5; SlowMo beta {.99,.95,.9,.8,.7,.55}; "
                    "H {4,8,16,32}.")
    add_config_args(p, config_required=False)
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
    add_threads_arg(p)
    add_compile_arg(p)
    p.add_argument("--resume", action="store_true",
                   help="keep the trials an interrupted search in --out finished")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the results already in --out (default: refuse)")
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.set_defaults(func=cmd_tune)


def refuse_to_overwrite(out: Path | None, results: tuple[str, ...],
                        args: argparse.Namespace) -> None:
    """A ConfigError if `out` already holds results and neither --resume nor --overwrite
    says what to do with them (they could be another config's, hours of work)."""
    if out is None or args.resume or args.overwrite:
        return
    found = [pattern for pattern in results if next(out.glob(pattern), None) is not None]
    if found:
        raise ConfigError(
            f"{out} already holds results ({', '.join(found)}); use --resume to continue "
            "that run, --overwrite to replace it, or another --out")


def _print_results(out: Path) -> None:
    print((out / "results.md").read_text())
    print(f"wrote {out / 'results.csv'}, {out / 'results.md'}, {out / 'curves.png'}")


def cmd_run(args: argparse.Namespace) -> int:
    from metagg.simulation import Simulation

    cfg = load_config(args.config, args.overrides)
    if args.resume and args.out is None:
        raise ConfigError("--resume needs --out DIR (the directory holding the checkpoint)")
    refuse_to_overwrite(args.out, ("summary.json", "metrics.jsonl", "checkpoint.json"), args)
    apply_threads(args.threads)
    set_compile(args.compile)
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
    refuse_to_overwrite(args.out, ("results.csv", "*/*/seed*/checkpoint.json"), args)

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
    apply_threads(args.threads)
    set_compile(args.compile)
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
    apply_threads(args.threads)
    set_compile(args.compile)
    compare(cfg, DEMO_AGGREGATORS, seeds=1, out_dir=args.out)
    _print_results(args.out)
    print(f"demo finished in {time.perf_counter() - start:.1f} s")
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from metagg.tune import parse_grid, tune

    cfg = load_config(args.config, args.overrides)
    refuse_to_overwrite(args.out, ("trials.jsonl", "summary.json"), args)
    apply_threads(args.threads)
    set_compile(args.compile)

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
    from metagg.aggregators.preagg import PRE_AGGREGATIONS
    from metagg.aggregators.registry import aggregator_names, aggregator_spec
    from metagg.attacks import ATTACKS, make_attack
    from metagg.config import OptimizerConfig
    from metagg.data import DATASETS, PARTITIONS
    from metagg.models import MODEL_HELP

    print("aggregators: aggregator.name (learned ones as KIND:PATH); a rule's options go in "
          "aggregator.options, e.g. --set aggregator.options.tau=5")
    print("  aggregator.f is the number of Byzantine workers a rule assumes; null (the "
          "default) means attack.num_byzantine")
    for name in aggregator_names():
        spec = aggregator_spec(name)
        print(f"  {name:<{LIST_WIDTH}}{re.sub(OPTIONS_IN_SUMMARY, '', spec.summary)}")
        print(f"  {'':<{LIST_WIDTH}}{_aggregator_options(spec)}")
    print("  pre-aggregation, before any rule (PRE+RULE, e.g. nnm+krum, bucketing+median):")
    pre_help = {"nnm": "nearest-neighbour mixing; needs n > 2f (allow_unsafe: n >= f + 1)",
                "bucketing": "the rule sees the means of shuffled buckets; options: "
                             "bucket_size=2 (the rule's bound on n is multiplied by it)"}
    for pre in PRE_AGGREGATIONS:
        print(f"  {pre:<{LIST_WIDTH}}{pre_help.get(pre, '')}")
    defaults = ", ".join(f"{f.name}={_option_value(f.default)}"
                         for f in dataclasses.fields(OptimizerConfig) if f.name != "name")
    print(f"server optimizers: optimizer.name = {', '.join(OPTIMIZERS)}; defaults {defaults}")
    print("attacks: attack.name; attack.num_byzantine workers attack, chosen by "
          "attack.selection; options go in attack.options")
    for name in ATTACKS:
        cls = type(make_attack(name))
        doc = (cls.__doc__ or "").strip().splitlines()[0] if name != "none" else "no attack"
        doc = doc.removesuffix(".")
        print(f"  {name:<{LIST_WIDTH}}{doc}")
        options = _signature_options(cls)
        if options:
            print(f"  {'':<{LIST_WIDTH}}options: {options}")
    print("datasets:", ", ".join(DATASETS))
    print("partitions:", ", ".join(PARTITIONS))
    print(MODEL_HELP)
    return 0


LIST_WIDTH = 18  # name column of `metagg list`
# the summaries of some rules name their options; `list` prints them with defaults
OPTIONS_IN_SUMMARY = r"\s*\(options: [^)]*\)"
# a rule's arguments that the registry fills in (options may override), and from what;
# f itself is aggregator.f, never an option
FILLED_BY_METAGG = {"discard": "f", "seed": "the run's seed"}
# what a null default means, where the rule's summary does not say
NULL_MEANS = {"rho": "gamma / 200", "batch": "the whole trusted sample", "m": "n − f"}


def _aggregator_options(spec: Any) -> str:
    """A registry entry's requirement, options and defaults, as one line of `metagg list`."""
    parts = []
    if spec.requirement:
        bound = f"needs {spec.requirement}"
        unsafe = _linear_bound(spec.fewest_unsafe)
        parts.append(f"{bound} (allow_unsafe: n >= {unsafe})" if unsafe else bound)
    if spec.uses_trusted_data:
        parts.append("uses the server's trusted sample (trusted_samples)")
    if spec.rule is not None:
        rule = spec.rule(0, 0, {})
        kernel = getattr(rule, "kernel", None)  # a metagg.robust kernel, or a rule class
        options = _signature_options(kernel if kernel is not None else type(rule),
                                     skip_first=kernel is not None)
        parts.append(f"options: {options}" if options else "no options")
    elif spec.learned_rule is not None:
        from metagg.learned.trust import TrustConfig

        config = ", ".join(f"{f.name}={_option_value(f.default)}"
                           for f in dataclasses.fields(TrustConfig))
        parts.append(f"{spec.name}:PATH takes no options; an untrained one takes init=true, "
                     f"init_seed=0, {config}")
    elif spec.build.startswith("metagg.learned.rnn"):
        from metagg.learned.rnn.io import load_rnn

        parts.append(f"options: {_signature_options(load_rnn, skip_first=True)}")
    else:
        from metagg.learned.lagg.model import LAggConfig

        config = ", ".join(f"{f.name}={_option_value(f.default)}"
                           for f in dataclasses.fields(LAggConfig) if f.name != "kind")
        parts.append(f"{spec.name}:PATH takes no options; an untrained one takes init=true, "
                     f"init_seed=0, {config}")
    return "; ".join(parts)


def _signature_options(fn: Any, skip_first: bool = False) -> str:
    """`name=default` for each option `fn` takes (tensors and the update matrix skipped;
    arguments metagg fills in say from what)."""
    params = list(inspect.signature(fn).parameters.values())[int(skip_first):]
    out = []
    for p in params:
        if (p.name == "f" or "Tensor" in str(p.annotation)
                or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD)):
            continue
        if p.name in FILLED_BY_METAGG:
            out.append(f"{p.name}={FILLED_BY_METAGG[p.name]}")
        elif p.default is None and p.name in NULL_MEANS:
            out.append(f"{p.name}=null ({NULL_MEANS[p.name]})")
        else:
            out.append(f"{p.name}={_option_value(p.default)}")
    return ", ".join(out)


def _option_value(value: Any) -> str:
    """A default as a config writes it (true, null, 1e-08, [0.1, 0.3])."""
    if value is inspect.Parameter.empty or value is dataclasses.MISSING:
        return "(required)"
    if isinstance(value, bool):
        return str(value).lower()
    if value is None:
        return "null"
    if isinstance(value, tuple | list):
        return "[" + ", ".join(_option_value(v) for v in value) + "]"
    return str(value)


def _linear_bound(fewest: Any) -> str | None:
    """'f + 3' for `lambda f: f + 3` (the registry's bounds are linear in f), else None."""
    if fewest is None:
        return None
    b, a = fewest(0), fewest(1) - fewest(0)
    if fewest(2) != 2 * a + b:
        return None
    slope = {0: "", 1: "f"}.get(a, f"{a}f")
    return f"{slope} + {b}" if slope and b else slope or str(b)


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
        print(f"{'text':<14} built in (characters of six free-software licence texts); "
              "your own: data.name=text, data.path=FILE.txt")
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
    if ds.tokens:
        print(f"{ds.name}: {len(ds.y_train)} train + {len(ds.y_test)} test sequences of "
              f"{ds.input_shape[0]} characters, vocabulary {ds.num_classes} ({where})")
        return 0
    print(f"{ds.name}: {len(ds.y_train)} train + {len(ds.y_test)} test examples of shape "
          f"{tuple(ds.input_shape)}, {ds.num_classes} classes ({where})")
    return 0


