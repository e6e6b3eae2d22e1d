import pytest
import yaml

from metagg.config import ConfigError, RunConfig, apply_overrides, config_from_dict, load_config


def test_defaults_are_valid():
    cfg = config_from_dict({})
    assert isinstance(cfg, RunConfig)
    assert cfg.data.name == "digits" and cfg.workers.num_workers == 10


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"rounds": 50, "workers": {"num_workers": 4}}))
    cfg = load_config(path, ["optimizer.lr=0.25", "aggregator=median", "data.classes=[0, 1]"])
    assert cfg.rounds == 50 and cfg.workers.num_workers == 4
    assert cfg.optimizer.lr == 0.25
    assert cfg.aggregator.name == "median"
    assert cfg.data.classes == [0, 1]


def test_string_section_then_subkey():
    data = apply_overrides({"aggregator": "krum"}, ["aggregator.f=2"])
    assert data == {"aggregator": {"name": "krum", "f": 2}}


def test_int_accepted_for_float():
    assert config_from_dict({"optimizer": {"lr": 1}}).optimizer.lr == 1.0


@pytest.mark.parametrize(
    "data,message",
    [
        ({"roundz": 3}, "unknown key roundz; allowed: seed, rounds"),
        ({"workers": {"num_worker": 3}}, "unknown key workers.num_worker"),
        ({"rounds": "many"}, "rounds: expected an integer"),
        ({"rounds": 0}, "rounds: must be > 0"),
        ({"optimizer": {"name": "lion"}}, "optimizer.name: unknown value 'lion'; allowed: sgd"),
        ({"aggregator": "avg"}, "aggregator.name: unknown value 'avg'; allowed:"),
        ({"data": {"partition": "noniid"}}, "data.partition: unknown value 'noniid'"),
        ({"data": {"name": "imagenet"}}, "data.name: unknown value 'imagenet'"),
        ({"workers": {"mode": "async"}}, "workers.mode: unknown value 'async'"),
        ({"workers": {"local_steps": 4}}, "must be 1 in gradient mode"),
        ({"model": "mlp:20:swish"}, "model: unknown activation 'swish'"),
        ({"attack": {"name": "alie"}}, "needs num_byzantine >= 1"),
        ({"attack": {"name": "alie", "num_byzantine": 11}}, "attack.num_byzantine: must be in"),
        ({"workers": {"failure_prob": 1.0}}, "failure_prob: must be in [0, 1)"),
        ({"optimizer": {"nesterov": "yes"}}, "expected true or false"),
    ],
)
def test_errors_name_key_and_allowed(data, message):
    with pytest.raises(ConfigError) as exc:
        config_from_dict(data)
    assert message in str(exc.value)
    assert "\n" not in str(exc.value)


def test_all_errors_reported_at_once():
    with pytest.raises(ConfigError) as exc:
        config_from_dict({"a": 1, "b": 2, "workers": {"c": 3}})
    msg = str(exc.value)
    assert "unknown key a" in msg and "unknown key b" in msg and "workers.c" in msg


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("rounds: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["rounds"])


def test_shipped_configs_load():
    from pathlib import Path

    configs = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))
    assert configs, "no shipped configs found"
    for path in configs:
        first = path.read_text().splitlines()[0]
        assert first.startswith("# metagg "), f"{path.name}: first line must be its command"
        load_config(path)


def test_override_reads_exponent_notation_as_a_number():
    # YAML 1.1 reads "1e-2" as a string; on a command line it means 0.01
    cfg = load_config(None, ["optimizer.lr=1e-2", "aggregator.name=median"])
    assert cfg.optimizer.lr == 0.01
    assert cfg.aggregator.name == "median"  # strings that are not numbers stay strings


# --------------------------------------------------------------------------- the engine


@pytest.mark.parametrize("data,message", [
    ({"optimizer": {"lr": float("inf")}}, "optimizer.lr: expected a finite number, got inf"),
    ({"workers": {"local_lr": float("nan")}}, "workers.local_lr: expected a finite number"),
    ({"seed": 99999999999999999999}, "seed: must be an integer in [0, 2**63 - 1]"),
    ({"seed": -1}, "seed: must be an integer in [0, 2**63 - 1], got -1"),
])
def test_non_finite_numbers_and_seed_range_name_their_key(data, message):
    with pytest.raises(ConfigError) as exc:
        config_from_dict(data)
    assert message in str(exc.value)


def test_yaml_inf_in_an_override_is_refused():
    with pytest.raises(ConfigError, match=r"optimizer\.lr: expected a finite number"):
        load_config(None, ["optimizer.lr=1e400"])


def test_meta_configs_use_the_same_engine():
    from metagg.config import parse
    from metagg.config.meta import MetaTrainConfig, MetaTrainPESConfig

    with pytest.raises(ConfigError) as exc:
        parse(MetaTrainPESConfig, {"pairs": 0, "sigma": -1.0, "kindd": "lagg"})
    msg = str(exc.value)
    assert "unknown key kindd; allowed: kind," in msg  # every problem at once
    with pytest.raises(ConfigError) as exc:
        MetaTrainPESConfig(pairs=0, sigma=-1.0)  # built in Python: checked too
    assert "pairs: must be >= 1, got 0" in str(exc.value)
    assert "sigma: must be > 0, got -1.0" in str(exc.value)
    cfg = parse(MetaTrainConfig, {"dataset": "fashion_mnist@8", "iterations": 2})
    assert cfg.to_dict()["dataset"] == "fashion_mnist@8"  # NAME@SIZE kept as written
    with pytest.raises(ConfigError, match="expected NAME@SIZE with an integer SIZE"):
        MetaTrainConfig(dataset="digits@big")
    assert parse(MetaTrainPESConfig, {"validation_rounds": [8, 4]}).validation_rounds == (4, 8)


def test_architecture_configs_use_the_engine():
    from metagg.learned.lagg import LAggConfig
    from metagg.learned.rnn import RNNConfig

    with pytest.raises(ConfigError, match=r"cell: unknown value 'rnn'; allowed: lstm, gru"):
        RNNConfig(num_workers=3, cell="rnn")
    with pytest.raises(ConfigError, match="num_workers: must be 0 for lopt"):
        LAggConfig(kind="lopt", num_workers=4)
    assert LAggConfig(kind="lagg", num_workers=4, residual_scale=1).residual_scale == 1.0
