"""The ceiling of "a perfect filter plus a share of the server's own update".

    python docs/experiments/trust-reference-workers/oracle.py digits 3,7 out.json

Per setting of the quick robustness benchmark (IID / Dirichlet α 0.5 × worker momentum
0 / 0.9, 150 rounds, seed 0, its MLP and 100 trusted samples) and Byzantine count b: the
b Byzantine workers crash (their rows never arrive) and the server steps along
(1 − λ)·(the honest rows' mean) + λ·r, r its own update on the trusted sample (a
momentum of it when the workers send momenta, as the trust rule and FLTrust use), for
λ = 0, 0.25, 0.5, 0.75, 1. λ = 0 is the benchmark's perfect filter; the best λ is what a
rule that finds every honest row and mixes in r could reach. Prints and writes the final
test accuracies.
"""

from __future__ import annotations

import json
import sys
from typing import NamedTuple

import torch

from metagg.aggregators.rules import momentum_reference
from metagg.config import config_from_dict, config_to_dict
from metagg.config.engine import apply_overrides
from metagg.experiments.robustness import setting_config
from metagg.simulation import Simulation, load_run_dataset

SHARES = (0.0, 0.25, 0.5, 0.75, 1.0)


class _State(NamedTuple):
    reference: torch.Tensor
    started: torch.Tensor


class HonestPlusReference:
    """(1 − λ)·mean(rows) + λ·r: with the Byzantine rows crashed, the rows are the honest."""

    def __init__(self, share: float):
        self.share = share

    def init(self, layout, num_workers):
        return _State(torch.zeros(layout.size), torch.tensor(False))

    def __call__(self, state, updates, ctx):
        reference, state = momentum_reference(state, ctx)
        mixed = (1 - self.share) * updates.mean(0) + self.share * reference.to(updates.dtype)
        return mixed, state


def final_accuracy(dataset: str, partition: str, momentum: float, byzantine: int,
                   share: float, data) -> float:
    cfg = setting_config(dataset, partition, momentum, rounds=150)
    cfg = config_from_dict(apply_overrides(config_to_dict(cfg), [
        "aggregator.name=fltrust", "attack.name=crash", f"attack.num_byzantine={byzantine}"]))
    sim = Simulation(cfg, dataset=data)
    sim.aggregator.rule = HonestPlusReference(share)  # fltrust: a rule given the trusted data
    for _ in range(cfg.rounds):
        sim.step()
    return sim.evaluate()["test_accuracy"]


def main(dataset: str, counts: list[int], out: str) -> None:
    torch.set_num_threads(1)
    data = load_run_dataset(setting_config(dataset, "iid", 0.0, 150))  # the partition: later
    rows = []
    for partition in ("iid", "dirichlet"):
        for momentum in (0.0, 0.9):
            for b in counts:
                accs = [final_accuracy(dataset, partition, momentum, b, s, data) for s in SHARES]
                rows.append({"partition": partition, "momentum": momentum, "byzantine": b,
                             "accuracy": dict(zip(map(str, SHARES), accs, strict=True))})
                print(f"{dataset} {partition} momentum {momentum} {b}/10: "
                      + ", ".join(f"λ {s:g} {100 * a:.1f}" for s, a in zip(SHARES, accs,
                                                                          strict=True)),
                      flush=True)
    with open(out, "w") as fh:
        json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main(sys.argv[1], [int(c) for c in sys.argv[2].split(",")], sys.argv[3])
