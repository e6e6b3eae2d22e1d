"""Run configuration: dataclasses, YAML files, `--set key=value` overrides, validation.

    cfg = load_config("configs/digits.yaml", overrides=["rounds=300", "aggregator=median"])

Every error is one line naming the key and what is allowed; unknown keys are
errors (never silently dropped), and all of them are reported at once.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "AggregatorConfig",
    "AttackConfig",
    "ConfigError",
    "DataConfig",
    "OptimizerConfig",
    "RunConfig",
    "WorkersConfig",
    "apply_overrides",
    "build_dataclass",
    "config_from_dict",
    "config_to_dict",
    "load_config",
    "parse_value",
    "save_config",
]


class ConfigError(ValueError):
    """A bad configuration: unknown key, wrong type or value out of range."""


@dataclass
class DataConfig:
    name: str = "digits"  # built in, no download; see metagg.data.DATASETS
    path: str | None = None  # .npz file for name=npz
    data_dir: str | None = None  # where IDX / CIFAR files live
    classes: list[int] | None = None  # keep only these classes (CIFAR-2 style)
    image_size: int | None = None  # downsample images (8 -> 8x8 Fashion-MNIST)
    partition: str = "iid"  # iid | dirichlet | shards
    alpha: float = 0.5  # Dirichlet concentration (smaller = more label skew)
    shards_per_worker: int = 2  # for partition=shards


@dataclass
class WorkersConfig:
    num_workers: int = 10  # the papers use 10 (Ji) and 8 (Joseph)
    mode: str = "gradient"  # gradient: send g_k; local_sgd: H local steps, send θ - θ_k
    batch_size: int = 32
    local_steps: int = 1  # H, local-SGD mode only
    local_lr: float = 0.5  # local SGD learning rate (0.5 in the LAgg-A reference)
    failure_prob: float = 0.0  # chance a worker misses a round (crash / straggler)
    # Worker momentum (Karimireddy et al. 2021): each honest worker sends an EMA
    # m ← β·m + (1 − β)·u of its updates (m starts at its first update) instead of u.
    # Averaging out minibatch noise before aggregation is what lets robust rules
    # tell honest updates from forged ones. 0 = off.
    momentum: float = 0.0


@dataclass
class OptimizerConfig:
    name: str = "sgd"  # server optimizer: sgd | momentum | adam | slowmo
    lr: float = 1.0  # sigmoid MLPs on digits like large steps
    beta: float = 0.9  # momentum / Adam beta1 / SlowMo beta
    beta2: float = 0.999  # Adam
    eps: float = 1e-8  # Adam
    nesterov: bool = False  # momentum


@dataclass
class AggregatorConfig:
    name: str = "mean"  # see `metagg list`; learned ones as "rnn:PATH" / "lagg:PATH"
    f: int | None = None  # Byzantine count the rule assumes; None = attack.num_byzantine
    options: dict[str, Any] = field(default_factory=dict)  # rule-specific keyword arguments


@dataclass
class AttackConfig:
    name: str = "none"  # see metagg.attacks.ATTACKS
    num_byzantine: int = 0
    selection: str = "first"  # first: workers 0..b-1 are Byzantine; random: seeded subset
    options: dict[str, Any] = field(default_factory=dict)  # attack keyword arguments


@dataclass
class RunConfig:
    seed: int = 0
    rounds: int = 200
    model: str = "mlp:20:sigmoid"  # see metagg.models
    data: DataConfig = field(default_factory=DataConfig)
    workers: WorkersConfig = field(default_factory=WorkersConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    aggregator: AggregatorConfig = field(default_factory=AggregatorConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)
    trusted_samples: int = 100  # server-held sample for Zeno / FLTrust / ARNN (0 = none)
    eval_every: int = 10  # rounds between evaluations (and metrics rows)
    eval_train_samples: int | None = 10000  # cap on train examples for train_loss
    checkpoint_every: int = 50  # rounds between checkpoints when --out is given (0 = end only)


# --------------------------------------------------------------------------- parsing


def _allowed_keys(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _coerce(value: Any, tp: Any, key: str, errors: list[str]) -> Any:
    """Check/convert one value against a type hint; append an error and return None if bad."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key, errors)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, str):  # "aggregator=median" sets the section's name
            value = {"name": value}
        if not isinstance(value, dict):
            errors.append(f"{key}: expected a mapping, got {value!r}")
            return None
        return _from_dict(tp, value, key + ".", errors)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list | tuple):
            errors.append(f"{key}: expected a list, got {value!r}")
            return None
        return [_coerce(v, item_tp, f"{key}[{i}]", errors) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            errors.append(f"{key}: expected a mapping, got {value!r}")
            return None
        return dict(value)
    if tp in _SCALARS:
        what, accepts = _SCALARS[tp]
        if not accepts(value):
            errors.append(f"{key}: expected {what}, got {value!r}")
            return value
        return float(value) if tp is float else value
    return value


# type -> (what the error calls it, accepts(value)); bools are not numbers here.
_SCALARS: dict[type, tuple[str, typing.Callable[[Any], bool]]] = {
    bool: ("true or false", lambda v: isinstance(v, bool)),
    int: ("an integer", lambda v: isinstance(v, int) and not isinstance(v, bool)),
    float: ("a number", lambda v: isinstance(v, int | float) and not isinstance(v, bool)),
    str: ("a string", lambda v: isinstance(v, str)),
}


def _from_dict(cls: type, data: dict[str, Any], prefix: str, errors: list[str]) -> Any:
    hints = typing.get_type_hints(cls)
    allowed = _allowed_keys(cls)
    kwargs = {}
    for key, value in data.items():
        if key not in allowed:
            errors.append(f"unknown key {prefix}{key!s}; allowed: {', '.join(allowed)}")
            continue
        kwargs[key] = _coerce(value, hints[key], prefix + key, errors)
    return cls(**kwargs)


def config_from_dict(data: dict[str, Any] | None) -> RunConfig:
    """Build and validate a RunConfig; raise ConfigError listing every problem."""
    errors: list[str] = []
    cfg = _from_dict(RunConfig, data or {}, "", errors)
    if not errors:
        errors.extend(validate(cfg))
    if errors:
        raise ConfigError("; ".join(errors))
    return cfg


def config_to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def _set_path(data: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = data
    for k in keys[:-1]:
        child = node.get(k)
        if isinstance(child, str):  # "aggregator: median" then --set aggregator.f=2
            child = {"name": child}
        if child is None:
            child = {}
        if not isinstance(child, dict):
            raise ConfigError(f"--set {dotted}: {k} is not a section")
        node[k] = child
        node = child
    node[keys[-1]] = value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `key.sub=value` strings (values parsed as YAML) to a config dict."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        key, raw = item.split("=", 1)
        _set_path(data, key.strip(), parse_value(raw))
    return data


def build_dataclass(cls: type, options: dict[str, Any], overrides: list[str], what: str) -> Any:
    """`cls(**options)` after `--set KEY=VALUE` overrides of its fields; one-line errors."""
    fields = {f.name for f in dataclasses.fields(cls)}
    options = dict(options)
    for item in overrides:
        key, eq, raw = item.partition("=")
        key = key.strip()
        if not eq or key not in fields:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE with KEY one of "
                              f"{', '.join(sorted(fields))}")
        options[key] = parse_value(raw)
    try:
        return cls(**options)
    except TypeError as exc:
        raise ConfigError(f"{what}: {exc}") from None


def parse_value(raw: str) -> Any:
    """A command-line value as YAML, except that "1e-2" is a number (YAML 1.1 says str)."""
    if raw == "":
        return None
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    return value


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


# --------------------------------------------------------------------------- validation


def _choice(errors: list[str], key: str, value: str, allowed: typing.Iterable[str]) -> None:
    allowed = list(allowed)
    if value not in allowed:
        errors.append(f"{key}: unknown value {value!r}; allowed: {', '.join(allowed)}")


def validate(cfg: RunConfig) -> list[str]:
    """Range and choice checks; returns a list of one-line messages (empty if fine)."""
    from metagg.aggregators.optimizers import OPTIMIZERS
    from metagg.aggregators.registry import check_aggregator_name
    from metagg.attacks import ATTACKS
    from metagg.data import DATASETS, PARTITIONS
    from metagg.models import parse_model_spec

    errors: list[str] = []

    def positive(key: str, value: float, *, zero_ok: bool = False) -> None:
        if value < 0 or (value == 0 and not zero_ok):
            errors.append(f"{key}: must be {'>= 0' if zero_ok else '> 0'}, got {value}")

    positive("rounds", cfg.rounds)
    positive("eval_every", cfg.eval_every)
    positive("checkpoint_every", cfg.checkpoint_every, zero_ok=True)
    positive("trusted_samples", cfg.trusted_samples, zero_ok=True)
    if cfg.eval_train_samples is not None:
        positive("eval_train_samples", cfg.eval_train_samples)
    if cfg.seed < 0:
        errors.append(f"seed: must be >= 0, got {cfg.seed}")
    try:
        parse_model_spec(cfg.model)
    except ValueError as exc:
        errors.append(f"model: {exc}")

    d = cfg.data
    _choice(errors, "data.name", d.name.lower().replace("-", "_"),
            [*DATASETS, "fmnist"])
    _choice(errors, "data.partition", d.partition, PARTITIONS)
    positive("data.alpha", d.alpha)
    positive("data.shards_per_worker", d.shards_per_worker)
    if d.image_size is not None:
        positive("data.image_size", d.image_size)
    if d.name.lower() == "npz" and not d.path:
        errors.append("data.path: required when data.name is npz")

    w = cfg.workers
    positive("workers.num_workers", w.num_workers)
    _choice(errors, "workers.mode", w.mode, ["gradient", "local_sgd"])
    positive("workers.batch_size", w.batch_size)
    positive("workers.local_steps", w.local_steps)
    positive("workers.local_lr", w.local_lr)
    if not 0 <= w.failure_prob < 1:
        errors.append(f"workers.failure_prob: must be in [0, 1), got {w.failure_prob}")
    if not 0 <= w.momentum < 1:
        errors.append(f"workers.momentum: must be in [0, 1), got {w.momentum}")
    if w.mode == "gradient" and w.local_steps != 1:
        errors.append("workers.local_steps: must be 1 in gradient mode (use mode: local_sgd)")

    o = cfg.optimizer
    _choice(errors, "optimizer.name", o.name, OPTIMIZERS)
    positive("optimizer.lr", o.lr)
    for key, value in (("optimizer.beta", o.beta), ("optimizer.beta2", o.beta2)):
        if not 0 <= value < 1:
            errors.append(f"{key}: must be in [0, 1), got {value}")

    problem = check_aggregator_name(cfg.aggregator.name)
    if problem:
        errors.append(f"aggregator.name: {problem}")
    if cfg.aggregator.f is not None and cfg.aggregator.f < 0:
        errors.append(f"aggregator.f: must be >= 0, got {cfg.aggregator.f}")

    a = cfg.attack
    _choice(errors, "attack.name", a.name, ATTACKS)
    _choice(errors, "attack.selection", a.selection, ["first", "random"])
    if not 0 <= a.num_byzantine <= w.num_workers:
        errors.append(
            f"attack.num_byzantine: must be in [0, workers.num_workers={w.num_workers}], "
            f"got {a.num_byzantine}"
        )
    if a.name != "none" and a.num_byzantine == 0:
        errors.append(f"attack.num_byzantine: attack {a.name!r} needs num_byzantine >= 1")
    return errors
