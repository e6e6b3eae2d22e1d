"""The run configuration: what `metagg run`, `compare`, `tune` and `launch` read.

    cfg = load_config("configs/digits.yaml", overrides=["rounds=300", "aggregator=median"])

Every key has a default, so an empty file is a valid run; every error is one line
naming the key and what is allowed, all of them reported at once (`metagg.config.engine`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from metagg.aggregators.optimizers import OPTIMIZERS
from metagg.aggregators.registry import check_aggregator_name
from metagg.attacks import ATTACKS
from metagg.config.engine import (
    ConfigError,
    Section,
    apply_overrides,
    option,
    parse,
    problem_of,
    to_dict,
)
from metagg.data import DATASETS, PARTITIONS
from metagg.data.datasets import normalize_name
from metagg.models import parse_model_spec

__all__ = [
    "AggregatorConfig",
    "AttackConfig",
    "DataConfig",
    "OptimizerConfig",
    "RunConfig",
    "WorkersConfig",
    "config_from_dict",
    "config_to_dict",
    "load_config",
    "save_config",
    "seed_problem",
]

MAX_SEED = 2**63 - 1


def seed_problem(seed: int) -> str | None:
    """Why `seed` cannot seed torch's generators (None if it can)."""
    if not 0 <= seed <= MAX_SEED:
        return f"must be an integer in [0, 2**63 - 1], got {seed}"
    return None


def _dataset_problem(name: str) -> str | None:
    try:
        normalize_name(name)
    except ValueError as exc:
        if name.lower().startswith("synthetic"):
            return str(exc)
        return f"unknown value {name!r}; allowed: {', '.join(DATASETS)}, fmnist"
    return None


@dataclass
class DataConfig(Section):
    name: str = option("digits", check=_dataset_problem)  # built in, no download
    path: str | None = None  # .npz file for name=npz; a UTF-8 text file for name=text
    data_dir: str | None = None  # where IDX / CIFAR files live
    classes: list[int] | None = None  # keep only these classes (CIFAR-2 style)
    image_size: int | None = option(None, gt=0)  # downsample images (8 -> 8x8 Fashion-MNIST)
    partition: str = option("iid", choices=PARTITIONS)  # iid | dirichlet | shards
    alpha: float = option(0.5, gt=0)  # Dirichlet concentration (smaller = more label skew)
    shards_per_worker: int = option(2, gt=0)  # for partition=shards
    seq_len: int = option(32, gt=0)  # characters per sequence, name=text only
    # the class count of the data as loaded (before `classes`); null = the dataset's own
    # (10 for the image sets) or, for npz / tables, the largest label + 1
    num_classes: int | None = option(None, ge=1)

    def problems(self) -> list[str]:
        name = self.name.lower()
        if name == "npz" and not self.path:
            return ["path: required when data.name is npz"]
        if name == "text" and self.partition != "iid":
            return ["partition: text sequences have no single label to skew by; use iid"]
        return []


@dataclass
class WorkersConfig(Section):
    num_workers: int = option(10, gt=0)  # the papers use 10 (Ji) and 8 (Joseph)
    # gradient: send g_k; local_sgd: H local steps, send θ - θ_k
    mode: str = option("gradient", choices=("gradient", "local_sgd"))
    batch_size: int = option(32, gt=0)
    local_steps: int = option(1, gt=0)  # H, local-SGD mode only
    local_lr: float = option(0.5, gt=0)  # local SGD learning rate (0.5 in the LAgg-A reference)
    failure_prob: float = option(0.0, ge=0, lt=1)  # chance a worker misses a round
    # Worker momentum (Karimireddy et al. 2021): each honest worker sends an EMA
    # m ← β·m + (1 − β)·u of its updates (m starts at its first update) instead of u.
    # Averaging out minibatch noise before aggregation is what lets robust rules
    # tell honest updates from forged ones. 0 = off.
    momentum: float = option(0.0, ge=0, lt=1)

    def problems(self) -> list[str]:
        if self.mode == "gradient" and self.local_steps != 1:
            return ["local_steps: must be 1 in gradient mode (use mode: local_sgd)"]
        return []


@dataclass
class OptimizerConfig(Section):
    name: str = option("sgd", choices=OPTIMIZERS)  # sgd | momentum | adam | slowmo | prodigy
    lr: float = option(1.0, gt=0)  # sigmoid MLPs on digits like large steps
    beta: float = option(0.9, ge=0, lt=1)  # momentum / Adam beta1 / SlowMo beta
    beta2: float = option(0.999, ge=0, lt=1)  # Adam
    eps: float = option(1e-8, gt=0)  # Adam
    nesterov: bool = False  # momentum


@dataclass
class AggregatorConfig(Section):
    # see `metagg list`; learned ones as "rnn:PATH" / "lagg:PATH"
    name: str = option("mean", check=check_aggregator_name)
    f: int | None = option(None, ge=0)  # Byzantine count the rule assumes; None = attack's
    options: dict[str, Any] = option(factory=dict)  # rule-specific keyword arguments


@dataclass
class AttackConfig(Section):
    name: str = option("none", choices=ATTACKS)  # see metagg.attacks.ATTACKS
    num_byzantine: int = option(0, ge=0)
    # first: workers 0..b-1 are Byzantine; random: a seeded subset
    selection: str = option("first", choices=("first", "random"))
    options: dict[str, Any] = option(factory=dict)  # attack keyword arguments

    def problems(self) -> list[str]:
        if self.name != "none" and self.num_byzantine == 0:
            return [f"num_byzantine: attack {self.name!r} needs num_byzantine >= 1"]
        return []


@dataclass
class RunConfig(Section):
    seed: int = option(0, check=seed_problem)
    rounds: int = option(200, gt=0)
    model: str = option("mlp:20:sigmoid", check=problem_of(parse_model_spec))  # metagg.models
    data: DataConfig = option(factory=DataConfig)
    workers: WorkersConfig = option(factory=WorkersConfig)
    optimizer: OptimizerConfig = option(factory=OptimizerConfig)
    aggregator: AggregatorConfig = option(factory=AggregatorConfig)
    attack: AttackConfig = option(factory=AttackConfig)
    # server-held sample for Zeno / FLTrust / ARNN (0 = none)
    trusted_samples: int = option(100, ge=0)
    eval_every: int = option(10, gt=0)  # rounds between evaluations (and metrics rows)
    eval_train_samples: int | None = option(10000, gt=0)  # cap on train examples for train_loss
    # rounds between checkpoints when --out is given (0 = end only)
    checkpoint_every: int = option(50, ge=0)

    def problems(self) -> list[str]:
        m = self.workers.num_workers
        if not self.attack.num_byzantine <= m:
            return [f"attack.num_byzantine: must be in [0, workers.num_workers={m}], "
                    f"got {self.attack.num_byzantine}"]
        return []


def config_from_dict(data: dict[str, Any] | None) -> RunConfig:
    """Build and validate a RunConfig; raise ConfigError listing every problem."""
    return parse(RunConfig, data)


def config_to_dict(cfg: Any) -> dict[str, Any]:
    return to_dict(cfg)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML config (or the defaults when `path` is None) and apply overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({exc})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
    apply_overrides(data, overrides or [])
    return config_from_dict(data)


def save_config(cfg: RunConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
