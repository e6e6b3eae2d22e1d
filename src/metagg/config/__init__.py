"""Configuration: one validated-dataclass engine (`engine`) for every config metagg reads —
the run (`run`: `metagg run`, `compare`, `tune`, `launch`) and meta-training (`meta`).

    cfg = load_config("configs/digits.yaml", overrides=["rounds=300", "aggregator=median"])

Every error is one line naming the key and what is allowed; unknown keys are errors
(never silently dropped), and all of them are reported at once.
"""

from metagg.config.engine import (
    ConfigError,
    Section,
    apply_overrides,
    option,
    parse,
    parse_value,
    to_dict,
)
from metagg.config.run import (
    AggregatorConfig,
    AttackConfig,
    DataConfig,
    OptimizerConfig,
    RunConfig,
    WorkersConfig,
    config_from_dict,
    config_to_dict,
    load_config,
    save_config,
)

__all__ = [
    "AggregatorConfig",
    "AttackConfig",
    "ConfigError",
    "DataConfig",
    "OptimizerConfig",
    "RunConfig",
    "Section",
    "WorkersConfig",
    "apply_overrides",
    "config_from_dict",
    "config_to_dict",
    "load_config",
    "option",
    "parse",
    "parse_value",
    "save_config",
    "to_dict",
]
