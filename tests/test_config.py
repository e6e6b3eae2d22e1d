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
