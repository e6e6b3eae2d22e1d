"""End-to-end robustness on digits, 10 workers, 300 rounds (the issue's scenarios).

The thresholds below are the claims, set from seeds 0-2 (the numbers below); the tests
run seed 4, which was never used to set them (so they can fail on a behaviour that only
held for the seeds they were tuned on). At held-out seeds 3 and 4: sign flip ×4 at 3/10
costs Krum ≤ 0.8, median 4.2, trimmed mean 6.4 and centered clipping 6.1 points with raw
gradients, ≤ 4.7 for all four with worker momentum; Zeno 89-95 %, FLTrust under ALIE 92 %,
FLTrust with momentum 87-97 %; Krum, median and geometric median 9 % under IPM 7/10.

- sign flip ×4 by 3 of 10 (−4·g: enough to make the mean ascend): mean collapses.
  Workers sending raw minibatch gradients: Krum and median stay within 5 points of
  their no-attack run, trimmed mean and centered clipping (τ = 0.3, 3 iterations)
  within 8 (they lose 5.1 and 4.7 on average over seeds 0-2: a 4-of-10 trimmed
  estimate of noisy gradients is biased towards zero). With worker momentum 0.9
  (Karimireddy et al. 2021) all four stay within 5 (seeds 0-2: at most 3.7 for
  trimmed mean, 3.9 for centered clipping with τ = 0.1).
- a colluding Byzantine majority (7 of 10): Zeno, which scores updates on the
  server's trusted sample, still learns (≥ 80 %) under IPM ε = 0.1 and ALIE; FLTrust
  under ALIE, and with worker momentum under sign flip ×4, IPM and ALIE (91-96 %,
  seeds 0-2; with raw gradients it reaches only 48-66 % under sign flip ×4);
  Krum, median and geometric median are fooled (< 20 % under IPM).
"""

import pytest

from metagg.config import config_from_dict
from metagg.simulation import Simulation

pytestmark = pytest.mark.usefixtures("one_thread")

ROUNDS = 300
SEED = 4  # held out: the thresholds were set from seeds 0-2
SIGN_FLIP = ("sign_flip", 3, {"scale": 4.0})
CC = {"tau": 0.3, "iters": 3}
CC_MOMENTUM = {"tau": 0.1}  # momenta are less spread out than raw gradients: smaller τ


def accuracy(digits, aggregator, attack=("none", 0, {}), momentum=0.0, **options):
    name, b, attack_options = attack
    cfg = config_from_dict({
        "rounds": ROUNDS, "eval_every": ROUNDS, "seed": SEED, "workers": {"momentum": momentum},
        "aggregator": {"name": aggregator, "options": options},
        "attack": {"name": name, "num_byzantine": b, "options": attack_options},
    })
    return Simulation(cfg, dataset=digits).run()["final_test_accuracy"]


def test_mean_collapses_under_sign_flip(digits):
    assert accuracy(digits, "mean") >= 0.9
    assert accuracy(digits, "mean", SIGN_FLIP) < 0.2


@pytest.mark.parametrize(
    "rule,options,margin",
    [("krum", {}, 0.05), ("median", {}, 0.05), ("trimmed_mean", {}, 0.08),
     ("centered_clip", CC, 0.08)],
)
def test_robust_rules_survive_sign_flip(digits, rule, options, margin):
    clean = accuracy(digits, rule, **options)
    assert accuracy(digits, rule, SIGN_FLIP, **options) >= clean - margin


@pytest.mark.parametrize(
    "rule,options",
    [("krum", {}), ("median", {}), ("trimmed_mean", {}), ("centered_clip", CC_MOMENTUM)],
)
def test_robust_rules_with_worker_momentum_stay_within_5_points(digits, rule, options):
    clean = accuracy(digits, rule, momentum=0.9, **options)
    assert accuracy(digits, rule, SIGN_FLIP, momentum=0.9, **options) >= clean - 0.05


@pytest.mark.parametrize("attack", [("ipm", 7, {}), ("alie", 7, {})])
def test_zeno_survives_colluding_majority(digits, attack):
    assert accuracy(digits, "zeno", attack) >= 0.80


def test_fltrust_survives_alie_majority(digits):
    assert accuracy(digits, "fltrust", ("alie", 7, {})) >= 0.80


@pytest.mark.parametrize("attack", [("sign_flip", 7, {"scale": 4.0}), ("ipm", 7, {}),
                                    ("alie", 7, {})])
def test_fltrust_with_worker_momentum_survives_colluding_majority(digits, attack):
    assert accuracy(digits, "fltrust", attack, momentum=0.9) >= 0.80


@pytest.mark.parametrize("rule", ["krum", "median", "geometric_median"])
def test_distance_rules_fooled_by_colluding_majority(digits, rule):
    assert accuracy(digits, rule, ("ipm", 7, {}), allow_unsafe=True) < 0.2
