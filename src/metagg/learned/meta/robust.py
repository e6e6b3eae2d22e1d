"""Antithetic evolution strategies for the learned trust rule, over a mixture of attacks.

    est = TrustES(MetaTrainTrustConfig(), data)     # run by metagg.learned.meta.loop
    out = est.estimate(phi, (), step)               # Estimate(grad, (), metrics)

Why ES and the simulator rather than BPTT or PES: the rule's forward pass has ranks and a
median, and the attacks (min-max's γ search, the white-box attacker's inner Adam, label
flipping) are not differentiable end to end; ES needs only the final loss. Each inner run
is an ordinary `Simulation` (gradient mode), so meta-training sees exactly what
`metagg run` / `compare` will: the same attacks, worker momentum, partitions and trusted
sample, and a `whitebox` attacker that optimises its rows through the current rule.

Pair k of outer step t takes everything from generator (seed, ROBUST_DRAW, t·pairs + k):
ε, the setting, momentum, partition and the model seed; both runs of a pair share them
(antithetic, common random numbers). So a run resumed from any checkpoint reproduces the
uninterrupted one. Validation runs every distinct setting of the mixture (with and without
worker momentum when it is trained with some; on IID and, with `validate_dirichlet`,
Dirichlet shards) on held-out model seeds; its score is the mean log final training loss.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch

from metagg.aggregators.base import Aggregator, RuleAggregator
from metagg.aggregators.optimizers import sgd
from metagg.config import load_config
from metagg.config.meta import MetaTrainTrustConfig, dataset_spec, parse_settings
from metagg.data import Dataset
from metagg.learned.meta.envs import load_task_data
from metagg.learned.meta.estimators import Estimate, validation_seeds
from metagg.learned.trust import TrustConfig, TrustRule, initial_phi, save_trust
from metagg.seeding import MetaStream, derive_generator
from metagg.simulation import Simulation

__all__ = ["Setting", "TrustES"]

MOMENTUM = 0.9  # the workers' momentum when a setting has it
ALPHA = 0.5  # Dirichlet concentration when a setting has it


class Setting(NamedTuple):
    """One inner run's conditions."""

    attack: str
    num_byzantine: int
    momentum: float
    partition: str
    seed: int
    dataset: str = ""  # "": the config's only dataset

    @property
    def label(self) -> str:
        extra = (" mom" if self.momentum else "") + (" dir" if self.partition != "iid" else "")
        where = f"{self.dataset} " if self.dataset else ""
        return f"{where}{self.attack}:{self.num_byzantine}{extra}"


class TrustES:
    """Antithetic ES on the trust rule's φ (the outer loop's estimator protocol)."""

    name = "antithetic_es"
    kind = "trust"
    score_definition = "mean over validation settings and seeds of log(final train loss)"

    def __init__(self, cfg: MetaTrainTrustConfig, data: Dataset | None = None):
        self.cfg = cfg
        self.trust = TrustConfig(hidden=cfg.hidden, probe=cfg.probe, budget=cfg.budget,
                                 reference_share=cfg.reference_share,
                                 reference_workers=cfg.reference_workers,
                                 peer_weight=cfg.peer_weight)
        self.dim = self.trust.layout.size
        # several datasets ("digits,fashion_mnist"): each pair draws one; validation runs all
        self.datasets = cfg.datasets()
        if data is not None and len(self.datasets) > 1:
            raise ValueError("pass data only with one dataset in the config")
        self.data = {name: data if data is not None else load_task_data(name, cfg.data_dir)
                     for name in self.datasets}
        self.mixture = parse_settings(cfg.settings)
        seeds = validation_seeds(cfg.seed, int(MetaStream.ROBUST_VALID), cfg.validation_seeds)
        momenta = (0.0, MOMENTUM) if cfg.momentum_prob > 0 else (0.0,)
        tags = self.datasets if len(self.datasets) > 1 else [""]
        partitions = ("iid", "dirichlet") if cfg.validate_dirichlet else ("iid",)
        self.validation = [Setting(a, b, m, p, s, d) for d in tags
                           for a, b in dict.fromkeys(self.mixture)
                           for p in partitions for m in momenta for s in seeds]
        self.validation_labels = [f"{v.label} #{j % len(seeds)}" if len(seeds) > 1
                                  else v.label for j, v in enumerate(self.validation)]

    # ------------------------------------------------------------------ φ
    def init_phi(self, seed: int) -> torch.Tensor:
        return initial_phi(self.trust, seed)

    def phi_of(self, agg: Any) -> torch.Tensor:
        rule = agg.rule if isinstance(agg, RuleAggregator) else agg
        # φ means the same with or without the budget: a start may switch it on
        if not isinstance(rule, TrustRule) or rule.config.layout != self.trust.layout:
            raise ValueError(f"{agg!r} is not a trust rule with {self.trust}")
        return rule.phi.detach().float().clone()

    # ------------------------------------------------------------------ steps
    def init_state(self) -> tuple:
        return ()

    def resumable(self, step: int) -> bool:
        return True  # every step is self-contained

    def checkpoint_state(self, state: Any) -> tuple:
        return ()

    def restore_state(self, tensors: Any) -> tuple:
        return ()

    def progress(self, step: int) -> dict[str, Any]:
        return {}

    def draw(self, step: int, k: int) -> tuple[torch.Tensor, Setting]:
        """Pair k of outer step `step`: its noise ε [dim] and its setting."""
        cfg = self.cfg
        g = derive_generator(cfg.seed, int(MetaStream.ROBUST_DRAW), step * cfg.pairs + k)
        eps = torch.randn(self.dim, generator=g)
        attack, b = self.mixture[int(torch.randint(len(self.mixture), (1,), generator=g))]
        u = torch.rand(2, generator=g)
        momentum = MOMENTUM if float(u[0]) < cfg.momentum_prob else 0.0
        partition = "dirichlet" if float(u[1]) < cfg.dirichlet_prob else "iid"
        seed = int(torch.randint(1 << 30, (1,), generator=g))
        dataset = ""
        if len(self.datasets) > 1:  # drawn last: one-dataset runs keep their draws
            dataset = self.datasets[int(torch.randint(len(self.datasets), (1,), generator=g))]
        return eps, Setting(attack, b, momentum, partition, seed, dataset)

    def estimate(self, phi: torch.Tensor, state: Any, step: int) -> Estimate:
        sigma, grad, losses = self.cfg.sigma, torch.zeros(self.dim), []
        for k in range(self.cfg.pairs):
            eps, setting = self.draw(step, k)
            plus = math.log(self.final_loss(phi + sigma * eps, setting))
            minus = math.log(self.final_loss(phi - sigma * eps, setting))
            grad += (plus - minus) / (2 * sigma) * eps
            losses.append((plus + minus) / 2)
        return Estimate(grad / self.cfg.pairs, state,
                        {"meta_loss": sum(losses) / len(losses)})

    # ------------------------------------------------------------------ inner runs
    def simulation(self, phi: torch.Tensor, setting: Setting) -> Simulation:
        """The simulator of one inner run, its aggregator the trust rule holding φ."""
        cfg = self.cfg
        options = cfg.attack_options.get(setting.attack, {})
        dataset = setting.dataset or self.datasets[0]
        overrides = [f"rounds={cfg.rounds}", f"seed={setting.seed}",
                     f"model={cfg.model}", f"data.name={dataset_spec(dataset)[0]}",
                     f"data.partition={setting.partition}", f"data.alpha={ALPHA}",
                     f"workers.num_workers={cfg.num_workers}",
                     f"workers.batch_size={cfg.batch_size}", f"workers.momentum={setting.momentum}",
                     f"trusted_samples={cfg.trusted_samples}", f"optimizer.lr={cfg.server_lr}",
                     "aggregator.name=trust", "aggregator.options={init: true}",
                     f"attack.name={setting.attack}",
                     f"attack.num_byzantine={setting.num_byzantine}",
                     *(f"attack.options.{k}={v}" for k, v in options.items())]
        sim = Simulation(load_config(None, overrides), dataset=self.data[dataset])
        sim.aggregator.rule = TrustRule(self.trust, phi, setting.num_byzantine)
        return sim

    def run(self, phi: torch.Tensor, setting: Setting) -> dict[str, float]:
        """The inner run's final evaluation, its train_loss capped (a diverged run: the cap)."""
        sim = self.simulation(phi, setting)
        for _ in range(self.cfg.rounds):
            sim.step()
        res = sim.evaluate()
        loss, cap = res["train_loss"], self.cfg.loss_cap
        return {**res, "train_loss": min(loss, cap) if math.isfinite(loss) else cap}

    def final_loss(self, phi: torch.Tensor, setting: Setting) -> float:
        return self.run(phi, setting)["train_loss"]

    # ------------------------------------------------------------------ validation, files
    def validate(self, phi: torch.Tensor) -> tuple[float, dict[str, Any]]:
        logs, means = [], {}
        for setting, label in zip(self.validation, self.validation_labels, strict=True):
            res = self.run(phi, setting)
            loss = res["train_loss"]
            logs.append(math.log(loss))
            means[f"{label}/loss"] = loss
            means[f"{label}/acc"] = res["test_accuracy"]
        accs = [v for k, v in means.items() if k.endswith("/acc")]
        means["worst_acc"] = min(accs)
        means["mean_acc"] = sum(accs) / len(accs)
        return sum(logs) / len(logs), means

    def baselines(self) -> dict[str, Any]:
        return {}

    def aggregator(self, phi: torch.Tensor) -> Aggregator:
        """The rule holding its own copy of φ, followed by SGD at the server lr."""
        return RuleAggregator("trust", TrustRule(self.trust, phi.detach().clone()),
                              sgd(self.cfg.server_lr), uses_trusted_data=True)

    def save(self, out: Any, phi: torch.Tensor, trained_on: dict[str, Any],
             validation: dict[str, Any]) -> Any:
        return save_trust(out, self.trust, phi, trained_on=trained_on, validation=validation)
