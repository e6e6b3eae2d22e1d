"""`metagg tasks`: the task families meta-training draws from, and the held-out suite."""

from __future__ import annotations

import argparse
import json
from typing import Any

__all__ = ["add_parsers"]


def add_parsers(sub: Any) -> None:
    p = sub.add_parser(
        "tasks", help="task families for meta-training, and the held-out suite",
        description="list: each task family (what it draws, axis by axis) and the held-out "
                    "suite that no meta-training ever sees; sample: the tasks a meta-training "
                    "run with these --families and --seed draws, in order.")
    p.add_argument("action", choices=["list", "sample"], nargs="?", default="list")
    p.add_argument("--families", default="image-mlp,synthetic,lm",
                   help="comma-separated families to sample from (default: all)")
    p.add_argument("--count", type=int, default=12, help="tasks to sample (default 12)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a listing")
    p.set_defaults(func=cmd_tasks)


def cmd_tasks(args: argparse.Namespace) -> int:
    from metagg.tasks.families import FAMILIES, HELD_OUT, sample_tasks

    if args.action == "sample":
        if args.count < 1:
            raise ValueError(f"--count must be >= 1, got {args.count}")
        names = [f.strip() for f in args.families.split(",") if f.strip()]
        specs = sample_tasks(names, args.count, args.seed)
        if args.json:
            print(json.dumps([s.to_dict() for s in specs], indent=2))
        else:
            print("\n".join(s.name for s in specs))
        return 0
    if args.json:
        print(json.dumps({"families": {n: f.describe() for n, f in FAMILIES.items()},
                          "held_out": [s.to_dict() for s in HELD_OUT]}, indent=2))
        return 0
    for family in FAMILIES.values():
        data = family.datasets or (
            f"synthetic:F:C:SEED, F in {list(family.synthetic_features)}, "
            f"C in {list(family.synthetic_classes)}",)
        subsets = " (random class subsets)" if family.class_subsets else ""
        print(f"{family.name}: {family.about}")
        print(f"  data {', '.join(data)}{subsets}")
        print(f"  models {', '.join(family.models)}")
        print(f"  K {list(family.num_workers)}, H {list(family.local_steps)}, "
              f"B {list(family.batch_sizes)}, partitions {list(family.partitions)}")
    print("held out (never drawn for meta-training):")
    for spec in HELD_OUT:
        print(f"  {spec.name}")
    return 0
