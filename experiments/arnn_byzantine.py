"""Ji et al. (2019) figure 6 on digits: mean, Krum, RNN and ARNN under Byzantine workers.

    . .venv/bin/activate
    # 1. meta-train the four shipped ARNN-LSTM aggregators (one thread, ~5-8 min each)
    python experiments/arnn_byzantine.py train --name digits-mlp20-arnn-lstm \\
        --iterations 200 --out runs/arnn/digits-mlp20-arnn-lstm
    python experiments/arnn_byzantine.py train --name digits-mlp20-arnn-lstm-ipm7 \\
        --attack ipm:7:eps=0.1 --iterations 250 --out runs/arnn/digits-mlp20-arnn-lstm-ipm7
    python experiments/arnn_byzantine.py train --name digits-mlp20-arnn-lstm-signflip7 \\
        --attack sign_flip:7:scale=4 --iterations 200 \\
        --out runs/arnn/digits-mlp20-arnn-lstm-signflip7
    python experiments/arnn_byzantine.py train --name digits-mlp20-arnn-lstm-alie7 \\
        --attack alie:7:z=1.5 --iterations 200 --out runs/arnn/digits-mlp20-arnn-lstm-alie7
    # (shipped by copying aggregator.{json,safetensors} to src/metagg/zoo/NAME/)
    # 2. evaluate on held-out model seeds 100..104, 300 rounds (~8 min on one busy core)
    python experiments/arnn_byzantine.py evaluate --out runs/arnn-byzantine

Setting (Ji §5.4): digits, MLP 64-20-10 sigmoid, 10 IID workers, batch 32, gradient
mode; workers 0..b-1 are Byzantine. Attacks: IPM ε = 0.1 (colluding: every attacker
sends −0.1 × the honest mean), ALIE z = 1.5 (colluding), sign flip scale 4 (each
attacker sends −4 × its own gradient; independent), Gaussian σ = 200; each at 3/10
and 7/10, plus no attack. Aggregators: mean + SGD lr 1; Krum with f = b
(`allow_unsafe` at 7/10, outside Krum's n > 2f + 2); Zeno and FLTrust (both use the
server's 100 trusted samples, as ARNN does); the shipped RNN
(`rnn:pretrained/digits-mlp20-lstm`) and the four ARNNs (`arnn:pretrained/...`:
trained without attack, under IPM 7/10, sign flip 7/10 and ALIE 7/10).

Evaluation seeds: `metagg.simulation.Simulation` seeds the model init, the data
partition, the minibatch stream and the trusted sample with `seed`. Meta-training
draws its model inits / minibatch streams from `derive_seed(0, 0|1, k)` (32-bit
hashes) and partitions with seed 0; the evaluation seeds (default 100..104) are
checked to be disjoint from every training / validation seed of the aggregators
evaluated (see `check_disjoint`).

Outputs in --out: results.csv (one row per aggregator × setting × seed), table.md
(mean ± std final test accuracy and train loss), curves.json, figure6.png (test
accuracy vs round under IPM at 0, 3/10 and 7/10).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from metagg.config import config_from_dict
from metagg.learned.meta_bptt import derive_seed, meta_train_rnn
from metagg.learned.store import resolve_path
from metagg.simulation import Simulation

RNN = "rnn:pretrained/digits-mlp20-lstm"
ARNN = "arnn:pretrained/digits-mlp20-arnn-lstm"
ARNN_IPM7 = "arnn:pretrained/digits-mlp20-arnn-lstm-ipm7"
ARNN_SF7 = "arnn:pretrained/digits-mlp20-arnn-lstm-signflip7"
ARNN_ALIE7 = "arnn:pretrained/digits-mlp20-arnn-lstm-alie7"

# (label, attack name, number of Byzantine workers, attack options)
SETTINGS: list[tuple[str, str, int, dict[str, Any]]] = [
    ("none", "none", 0, {}),
    ("ipm 3/10", "ipm", 3, {"eps": 0.1}),
    ("ipm 7/10", "ipm", 7, {"eps": 0.1}),
    ("alie 3/10", "alie", 3, {"z": 1.5}),
    ("alie 7/10", "alie", 7, {"z": 1.5}),
    ("sign_flip 3/10", "sign_flip", 3, {"scale": 4.0}),
    ("sign_flip 7/10", "sign_flip", 7, {"scale": 4.0}),
    ("gaussian 3/10", "gaussian", 3, {"sigma": 200.0}),
    ("gaussian 7/10", "gaussian", 7, {"sigma": 200.0}),
]


def parse_attack(spec: str) -> tuple[str, int, dict[str, float]]:
    """'ipm:7:eps=0.1' -> ('ipm', 7, {'eps': 0.1}); 'none' -> ('none', 0, {})."""
    parts = spec.split(":")
    if parts[0] == "none":
        return "none", 0, {}
    if len(parts) < 2:
        raise ValueError(f"attack {spec!r}: expected NAME:B[:key=value...], e.g. ipm:7:eps=0.1")
    opts = {}
    for kv in parts[2:]:
        key, _, value = kv.partition("=")
        opts[key] = float(value)
    return parts[0], int(parts[1]), opts


def aggregators(arnn: str, arnn_byz: str, arnn_sf: str, arnn_alie: str) -> dict[str, str]:
    """Label -> aggregator name (as in a RunConfig)."""
    return {"mean": "mean", "krum": "krum", "zeno": "zeno", "fltrust": "fltrust",
            "rnn": RNN, "arnn": arnn, "arnn-ipm7": arnn_byz, "arnn-signflip7": arnn_sf,
            "arnn-alie7": arnn_alie}


def run_config(agg: str, attack: str, b: int, attack_options: dict[str, Any], seed: int,
               rounds: int, eval_every: int) -> dict[str, Any]:
    """The RunConfig dict of one evaluation run (server SGD lr 1 for the rules)."""
    agg_cfg: dict[str, Any] = {"name": agg}
    if agg == "krum":
        agg_cfg.update(f=b, options={"allow_unsafe": True} if 2 * b + 3 > 10 else {})
    return {"seed": seed, "rounds": rounds, "eval_every": eval_every, "model": "mlp:20:sigmoid",
            "data": {"name": "digits", "partition": "iid"},
            "workers": {"num_workers": 10, "batch_size": 32, "mode": "gradient"},
            "optimizer": {"name": "sgd", "lr": 1.0}, "aggregator": agg_cfg,
            "attack": {"name": attack, "num_byzantine": b, "options": attack_options},
            "trusted_samples": 100, "checkpoint_every": 0}


def simulate(cfg: dict[str, Any]) -> list[dict[str, float]]:
    """Run one Simulation; rows {round, train_loss, test_accuracy} every eval_every rounds."""
    sim = Simulation(config_from_dict(cfg))
    every = cfg["eval_every"]
    rows = [{"round": 0, **sim.evaluate()}]
    while sim.round < cfg["rounds"]:
        sim.step()
        if sim.round % every == 0 or sim.round == cfg["rounds"]:
            rows.append({"round": sim.round, **sim.evaluate()})
    return [{k: r[k] for k in ("round", "train_loss", "test_accuracy")} for r in rows]


def check_disjoint(seeds: list[int], names: list[str]) -> None:
    """Raise if an evaluation seed was a meta-training or validation seed of a learned one.

    Meta-training (`metagg.learned.meta_bptt`) uses model / minibatch seeds
    derive_seed(seed, 0, k) for k < iterations, validation seeds derive_seed(seed, 1, j),
    and `seed` itself for the partition and the trusted sample.
    """
    for name in names:
        kind, _, path = name.partition(":")
        if kind not in ("rnn", "arnn"):
            continue
        info = json.loads(resolve_path(path).with_suffix(".json").read_text())["trained_on"]
        used = {derive_seed(info["seed"], stream, k) for stream in (0, 1)
                for k in range(max(info["iterations"], info["validation_seeds"]))}
        used.add(info["seed"])
        clash = sorted(set(seeds) & used)
        if clash:
            raise ValueError(f"evaluation seeds {clash} were used to meta-train {name}")


def mean_std(values: list[float], scale: float = 1.0, fmt: str = ".1f") -> str:
    v = np.asarray(values, dtype=float) * scale
    if not np.isfinite(v).all():
        return "diverged"
    return f"{v.mean():{fmt}} ± {v.std():{fmt}}"


def evaluate(args: argparse.Namespace) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    seeds = list(range(args.seed0, args.seed0 + args.seeds))
    every = aggregators(args.arnn, args.arnn_byz, args.arnn_sf, args.arnn_alie)
    unknown = sorted(set(args.aggregators.split(",")) - set(every))
    if unknown:
        raise SystemExit(f"unknown aggregator label(s) {unknown}; known: {', '.join(every)}")
    aggs = {k: v for k, v in every.items() if k in args.aggregators.split(",")}
    check_disjoint(seeds, list(aggs.values()))
    settings = [s for s in SETTINGS if args.settings == "all" or s[0] in args.settings.split(",")]
    records: list[dict[str, Any]] = []
    curves: dict[str, dict[str, list[list[float]]]] = {}
    start = time.perf_counter()
    for label, attack, b, opts in settings:
        for agg_label, agg in aggs.items():
            t0 = time.perf_counter()
            for seed in seeds:
                rows = simulate(run_config(agg, attack, b, opts, seed, args.rounds,
                                           args.eval_every))
                last = rows[-1]
                records.append({"setting": label, "aggregator": agg_label, "name": agg,
                                "seed": seed, "rounds": last["round"],
                                "test_accuracy": last["test_accuracy"],
                                "train_loss": last["train_loss"]})
                curves.setdefault(label, {}).setdefault(agg_label, []).append(
                    [r["test_accuracy"] for r in rows])
            accs = [r["test_accuracy"] for r in records[-len(seeds):]]
            print(f"{label:16s} {agg_label:10s} acc {mean_std(accs, 100)}  "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
    rounds_axis = list(range(0, args.rounds + 1, args.eval_every))
    if rounds_axis[-1] != args.rounds:
        rounds_axis.append(args.rounds)
    with open(out / "results.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(records[0]))
        w.writeheader()
        w.writerows(records)
    (out / "curves.json").write_text(json.dumps({"rounds": rounds_axis, "curves": curves}))
    table = markdown_table(records, [s[0] for s in settings], list(aggs), seeds, args.rounds)
    (out / "table.md").write_text(table)
    print(table)
    plot_figure6(curves, rounds_axis, out / "figure6.png")
    print(f"evaluation took {time.perf_counter() - start:.0f} s; wrote {out}")


def markdown_table(records: list[dict[str, Any]], settings: list[str], aggs: list[str],
                   seeds: list[int], rounds: int) -> str:
    """Two tables (test accuracy %, train loss): rows aggregators, columns settings."""
    def cell(agg: str, setting: str, key: str) -> str:
        vals = [r[key] for r in records if r["aggregator"] == agg and r["setting"] == setting]
        if not vals:
            return "–"
        return mean_std(vals, 100, ".1f") if key == "test_accuracy" else mean_std(vals, 1, ".3f")

    lines = []
    for key, title in (("test_accuracy", "final test accuracy (%)"),
                       ("train_loss", "final train loss")):
        lines += [f"digits, mlp:20:sigmoid, 10 workers, {rounds} rounds, held-out seeds "
                  f"{seeds}; mean ± std over seeds; cells: {title}", "",
                  "| aggregator | " + " | ".join(settings) + " |",
                  "|---|" + "---|" * len(settings)]
        lines += [f"| {a} | " + " | ".join(cell(a, s, key) for s in settings) + " |"
                  for a in aggs]
        lines.append("")
    return "\n".join(lines)


def plot_figure6(curves: dict[str, dict[str, list[list[float]]]], rounds: list[int],
                 path: Path) -> None:
    """Ji figure 6 style: test accuracy vs round, one panel per IPM setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [s for s in ("none", "ipm 3/10", "ipm 7/10") if s in curves]
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.6), sharey=True,
                             squeeze=False)
    for ax, setting in zip(axes[0], panels, strict=True):
        for agg in ("mean", "krum", "rnn", "arnn", "arnn-ipm7", "arnn-signflip7"):
            if agg not in curves[setting]:
                continue
            acc = np.asarray(curves[setting][agg], dtype=float) * 100
            ax.plot(rounds, acc.mean(0), label=agg)
            ax.fill_between(rounds, acc.min(0), acc.max(0), alpha=0.15)
        ax.set_title({"none": "10 honest"}.get(setting, f"{setting} Byzantine (IPM ε=0.1)"))
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("test accuracy (%)")
    axes[0][-1].legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def train(args: argparse.Namespace) -> None:
    attack, b, opts = parse_attack(args.attack)
    t = time.perf_counter()
    r = meta_train_rnn(arnn=True, cell=args.cell, attack=attack, num_byzantine=b,
                       attack_options=opts, iterations=args.iterations, seed=args.meta_seed,
                       validate_every=args.validate_every, long_horizon=args.long_horizon,
                       patience=0, out_dir=args.out, progress=False, threads=1)
    print(json.dumps({"name": args.name, "best_iteration": r.best_iteration,
                      "best_score": r.best_score, "wall_s": round(time.perf_counter() - t, 1)}))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="what", required=True)
    tr = sub.add_parser("train", help="meta-train an ARNN-LSTM on digits")
    tr.add_argument("--name", required=True, help="label for the log line")
    tr.add_argument("--out", required=True)
    tr.add_argument("--attack", default="none",
                    help="none or NAME:B[:key=value], e.g. ipm:7:eps=0.1")
    tr.add_argument("--iterations", type=int, default=200)
    tr.add_argument("--cell", default="lstm")
    tr.add_argument("--meta-seed", type=int, default=0)
    tr.add_argument("--validate-every", type=int, default=25)
    tr.add_argument("--long-horizon", type=int, default=3, help="also validate at this × T rounds")
    ev = sub.add_parser("evaluate", help="figure 6 table, CSV and PNG")
    ev.add_argument("--out", required=True)
    ev.add_argument("--seeds", type=int, default=5)
    ev.add_argument("--seed0", type=int, default=100, help="first held-out model seed")
    ev.add_argument("--rounds", type=int, default=300)
    ev.add_argument("--eval-every", type=int, default=20)
    ev.add_argument("--arnn", default=ARNN)
    ev.add_argument("--arnn-byz", default=ARNN_IPM7, help="the IPM 7/10-trained ARNN")
    ev.add_argument("--arnn-sf", default=ARNN_SF7, help="the sign-flip 7/10-trained ARNN")
    ev.add_argument("--arnn-alie", default=ARNN_ALIE7, help="the ALIE 7/10-trained ARNN")
    ev.add_argument("--aggregators",
                    default="mean,krum,rnn,arnn,arnn-ipm7,arnn-signflip7,arnn-alie7,zeno,fltrust")
    ev.add_argument("--settings", default="all", help="comma list of setting labels, or all")
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # d = 1510: one thread is as fast and shares the machine
    (train if args.what == "train" else evaluate)(args)


if __name__ == "__main__":
    main(sys.argv[1:])
