"""`metagg reproduce ji2019|joseph2025|generalization|robustness`: the papers' experiments,
the held-out suite and the robustness benchmark (`metagg.experiments`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from metagg.compiling import add_compile_arg, compiling_during
from metagg.threads import add_threads_arg, threads_during

__all__ = ["add_parsers"]

# kept here so that `metagg --help` does not import the experiments
JI2019_FIGURES = ("4", "5", "6", "7")
JI2019_SCALES = ("quick", "full", "tiny")  # tiny: the tests' scale, not advertised
HETERO_RNN = "digits-hetero4x3-mlp20-lstm"  # figure 7's zoo aggregator
JOSEPH2025 = ("Tune the baselines on the 8x8 Fashion-MNIST task, run the learned optimizers "
              "and the tuned baselines on held-out seeds, and report rounds to reach the best "
              "baseline's loss, plus generalisation to 784-128-128 (and conv-c10 when CIFAR-10 "
              "is on disk: then hours on a CPU), other K and H. quick: ~300 rounds, 3 seeds; "
              "full: 1000 rounds, 10 seeds.")
# not auto: the committed reports say "torch threads: 1"
THREADS_WHY = "the committed reports' count; a rerun then matches them bit for bit"


def add_parsers(sub: Any) -> None:
    p = sub.add_parser("reproduce", help="reproduce a paper's figures and tables",
                       description="One command per paper: runs the experiments and writes "
                                   "figures (PNG), tables (CSV) and report.md to --out.")
    papers = p.add_subparsers(dest="paper", metavar="PAPER", required=True)
    q = papers.add_parser(
        "ji2019", help="learned gradient aggregation, figures 4-7 (Ji et al. 2019)",
        description="Figures 4 (RNN/ARNN vs tuned SGD/Adam averaging), 5 (transfer to other "
                    "models and class subsets), 6 (ARNN under Byzantine attack) and 7 (§5.5 "
                    "heterogeneous worker models) with the shipped aggregators; Fashion-MNIST "
                    "and digits stand in for MNIST/CIFAR when those are not on disk.")
    q.add_argument("--scale", choices=JI2019_SCALES, default="quick", metavar="{quick,full}",
                   help="quick: 1-2 seeds, short runs, a few minutes on 2 cores "
                        "(default); full: 5 seeds, paper-length runs (long)")
    q.add_argument("--out", type=Path, required=True, help="output directory")
    q.add_argument("--figures", default=",".join(JI2019_FIGURES),
                   help="comma-separated subset of 4,5,6,7 (default all)")
    q.add_argument("--meta-train", action="store_true",
                   help="meta-train the aggregators the zoo lacks (GRU variants, a "
                        "Fashion-MNIST RNN, the 12-input RNN of figure 7) into "
                        "OUT/aggregators")
    q.add_argument("--hetero-rnn", default=None, metavar="PATH",
                   help="a 12-input RNN aggregator for figure 7 (default: the zoo's "
                        f"{HETERO_RNN}, then OUT/aggregators/{HETERO_RNN})")
    q.add_argument("--data-dir", default=None, help="where Fashion-MNIST's files are")
    add_threads_arg(q, default=1, note=THREADS_WHY)
    add_compile_arg(q)
    q.set_defaults(func=cmd_reproduce_ji2019)
    q = papers.add_parser("joseph2025", description=JOSEPH2025,
                          help="LAgg-A / LOpt-A vs tuned FedAvg, SlowMo, Adam "
                               "(Joseph et al. 2025)")
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
    add_threads_arg(q, default=1, note=THREADS_WHY)
    add_compile_arg(q)
    q.add_argument("--out", type=Path, required=True, help="output directory")
    q.set_defaults(func=cmd_reproduce_joseph2025)
    _add_generalization(papers)
    _add_robustness(papers)


def _add_robustness(papers: Any) -> None:
    q = papers.add_parser(
        "robustness", help="every robust rule x every attack x Byzantine fraction, IID and "
                           "Dirichlet, worker momentum on and off",
        description="Runs `metagg compare` tables for every setting (dataset x partition x "
                    "worker momentum): the robust rules (mean, median, trimmed mean, Krum, "
                    "Multi-Krum, GM, Bulyan, CC, NNM+Krum, bucketing+median, Zeno, FLTrust) "
                    "and the shipped learned ones against every attack at each Byzantine fraction; "
                    "writes a heatmap per setting, results.csv and report.md with each "
                    "rule's worst case. quick: digits, 0/3/7 of 10, 150 rounds, 1 seed "
                    "(~15-25 min on 2 cores); full: + Fashion-MNIST and breast cancer, "
                    "0/1/3/7, 300 rounds, 3 seeds (hours).")
    q.add_argument("--scale", choices=["quick", "full"], default="quick",
                   help="how much to run (default quick)")
    q.add_argument("--learned", default=None, metavar="SPEC[,SPEC...]",
                   help="the learned aggregators to include (default: the shipped ARNN "
                        "arnn:pretrained/digits-mlp20-arnn-lstm and trust:pretrained/robust); "
                        "'none' leaves them out")
    q.add_argument("--datasets", default=None, metavar="NAME[,NAME...]",
                   help="replace the scale's datasets, e.g. fashion_mnist")
    q.add_argument("--rules", default=None, metavar="RULE[,RULE...]",
                   help="replace the scale's rules (the learned ones are added), e.g. "
                        "mean,zeno,fltrust")
    _add_run_args(q, "keep the runs an interrupted benchmark in --out finished",
                  cmd_reproduce_robustness)


def _names(text: str | None) -> tuple[str, ...] | None:
    return None if text is None else tuple(s.strip() for s in text.split(",") if s.strip())


def cmd_reproduce_robustness(args: argparse.Namespace) -> int:
    """`metagg reproduce robustness ...`: run, print the worst cases, return 0."""
    from metagg.experiments.robustness import LEARNED, reproduce_robustness

    learned = LEARNED if args.learned is None else (
        () if args.learned.lower() == "none" else _names(args.learned))
    with threads_during(args.threads), compiling_during(args.compile):
        summary = reproduce_robustness(args.out, scale=args.scale, learned=learned,
                                       resume=args.resume, datasets=_names(args.datasets),
                                       rules=_names(args.rules))
    for w in summary["worst"]:
        print(f"{w['rule']:<40} worst {100 * w['worst_accuracy']:5.1f} %  ({w['setting']}; "
              f"{w['attack']})")
    print(f"wrote {args.out}/report.md, heatmap-*.png, results.csv")
    return 0


def _add_generalization(papers: Any) -> None:
    q = papers.add_parser(
        "generalization", help="learned aggregators on held-out tasks vs baselines tuned there",
        description="For every task of the held-out suite (`metagg tasks`): tune every "
                    "baseline there, run it and the learned aggregators (no per-task tuning) "
                    "on held-out seeds to 4R rounds, and report per-task rounds-to-target "
                    "speed-ups, loss ratios at R and 4R, seed spread, and their geometric "
                    "mean / IQM over tasks; an RNN aggregator (--rnn) in gradient mode "
                    "against tuned mean + server SGD / Adam. quick: the 4 held-out tasks "
                    "that need no download, R = 100, 2 seeds (~10-20 min on 2 cores); "
                    "full: all 7 tasks, R = 300, 5 seeds, the paper's grids (many CPU hours).")
    q.add_argument("--scale", choices=["quick", "full"], default="quick",
                   help="how much to run (default quick)")
    q.add_argument("--lagg", default=None,
                   help="LAgg-A to evaluate (default lagg:pretrained/general, the shipped "
                        "general weights); 'none' skips it")
    q.add_argument("--lopt", default=None,
                   help="LOpt-A to evaluate (default lopt:pretrained/general where general "
                        "LOpt-A weights ship, none until then); 'none' skips it")
    q.add_argument("--rnn", default="none", metavar="SPEC",
                   help="an RNN aggregator to evaluate in gradient mode against tuned mean + "
                        "server SGD / Adam, e.g. rnn:docs/meta-training/general-rnn-r1 "
                        "(default none)")
    q.add_argument("--seeds", type=int, default=None, metavar="N",
                   help="evaluation seeds 0..N-1 (default: the scale's, quick 2, full 5); "
                        "more seeds where runs end far apart (breast cancer)")
    q.add_argument("--tasks", default=None, metavar="NAME[,NAME...]",
                   help="only these of the scale's tasks, by dataset (digits, "
                        "breast_cancer, synthetic, fashion_mnist, wine, text) or full name "
                        "(default: all of them)")
    _add_run_args(q, "keep the tuning trials and runs an interrupted run in --out finished",
                  cmd_reproduce_generalization)


def _add_run_args(q: argparse.ArgumentParser, resume: str, func: Any) -> None:
    """--resume (with its help), --threads (default 1), --compile, --out; the command."""
    q.add_argument("--resume", action="store_true", help=resume)
    add_threads_arg(q, default=1, note=THREADS_WHY)
    add_compile_arg(q)
    q.add_argument("--out", type=Path, required=True, help="output directory")
    q.set_defaults(func=func)


def cmd_reproduce_generalization(args: argparse.Namespace) -> int:
    """`metagg reproduce generalization ...`: run, print report.md, return 0."""
    from metagg.config import ConfigError
    from metagg.experiments.generalization import reproduce_generalization
    from metagg.learned.store import pretrained_names

    shipped = pretrained_names()
    lopt = args.lopt
    if lopt is None:  # the default: the general LOpt-A once one ships
        lopt = "lopt:pretrained/general" if "general-lopt" in shipped else "none"
        if lopt == "none":
            print("LOpt-A: no general weights ship yet; skipped (--lopt lopt:PATH judges "
                  "one)", file=sys.stderr)
    specs = {"--lagg": args.lagg or "lagg:pretrained/general", "--lopt": lopt,
             "--rnn": args.rnn}
    learned = {label: specs[flag] for label, flag in (("LAgg-A", "--lagg"),
                                                      ("LOpt-A", "--lopt"), ("RNN", "--rnn"))
               if specs[flag].lower() != "none"}
    for flag, kind in (("--lagg", "lagg"), ("--lopt", "lopt"), ("--rnn", "rnn")):
        spec = specs[flag]
        if spec.lower() != "none" and spec.partition(":")[0] != kind:
            raise ConfigError(f"{flag} takes a {kind}:PATH aggregator, got {spec!r}")
    missing = [f"{label} {spec}" for label, spec in learned.items()
               if spec.endswith(":pretrained/general")
               and f"general-{spec.partition(':')[0]}" not in shipped]
    if missing:  # a kind whose general weights do not ship: say what to pass instead
        raise ConfigError(
            f"{', '.join(missing)}: no general weights ship yet for this kind; pass your "
            f"own, e.g. --lagg lagg:runs/g (from `metagg meta-train lagg --tasks ...`), "
            f"or 'none'")
    with threads_during(args.threads), compiling_during(args.compile):
        tasks = [t.strip() for t in (args.tasks or "").split(",") if t.strip()]
        reproduce_generalization(args.out, scale=args.scale, learned=learned,
                                 resume=args.resume, seeds=args.seeds, tasks=tasks or None)
    print((args.out / "report.md").read_text())
    return 0


def cmd_reproduce_ji2019(args: argparse.Namespace) -> int:
    """`metagg reproduce ji2019 ...`: run, print where report.md is, return 0."""
    from metagg.experiments.ji2019 import reproduce_ji2019

    figures = [f.strip() for f in args.figures.split(",") if f.strip()]
    subset = set(figures) != set(JI2019_FIGURES)
    command = " ".join(["metagg reproduce ji2019", f"--scale {args.scale}", f"--out {args.out}"]
                       + ([f"--figures {args.figures}"] if subset else [])
                       + (["--meta-train"] if args.meta_train else [])
                       + ([f"--hetero-rnn {args.hetero_rnn}"] if args.hetero_rnn else []))
    with threads_during(args.threads), compiling_during(args.compile):
        report = reproduce_ji2019(args.out, args.scale, figures=figures,
                                  meta_train=args.meta_train, hetero_rnn=args.hetero_rnn,
                                  data_dir=args.data_dir, threads=None, command=command)
    print(report.read_text())
    print(f"wrote {report.parent}/report.md, figure*.png, figure*.csv, tuning.csv")
    return 0


def cmd_reproduce_joseph2025(args: argparse.Namespace) -> int:
    """`metagg reproduce joseph2025 ...`: run, print report.md, return 0."""
    from metagg.experiments import joseph2025 as j

    with threads_during(args.threads), compiling_during(args.compile):
        j.reproduce_joseph2025(args.out, scale=args.scale, lagg=args.lagg or j.LAGG_PRETRAINED,
                               lopt=args.lopt or j.LOPT_PRETRAINED,
                               generalization=args.generalization, resume=args.resume)
    print((args.out / "report.md").read_text())
    return 0


