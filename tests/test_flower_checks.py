"""The Flower adapter's argument and client-count checks (metagg.integrations.checks).

They need no flwr, so they run everywhere (CI does not install flwr); the Flower side
of the same checks is in tests/test_flower.py.
"""

import pytest

from metagg.aggregators.base import Aggregator
from metagg.aggregators.registry import aggregator_spec
from metagg.config import ConfigError, OptimizerConfig
from metagg.integrations.checks import build_checked_aggregator, check_enough_clients


def problems(**kwargs) -> list[str]:
    with pytest.raises(ConfigError) as info:
        build_checked_aggregator(**kwargs)
    return info.value.problems


def test_negative_f_is_refused_like_a_config():
    # it used to be accepted and crash the Flower server at round 1
    assert problems(aggregator="krum", f=-1) == ["f: must be >= 0, got -1"]


def test_every_problem_is_reported_at_once_with_argument_names():
    got = problems(aggregator="nope", f=-2)
    assert len(got) == 2
    assert got[0].startswith("aggregator: unknown value 'nope'; allowed: ")
    assert got[1] == "f: must be >= 0, got -2"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"f": None}, "f: expected an integer >= 0"),
        ({"f": True}, "f: expected an integer, got True"),
        ({"options": {"nope": 1}}, "bad options"),
        ({"options": [1]}, "options: expected a mapping"),
        ({"num_workers": 0}, "num_workers: must be an integer >= 1, got 0"),
    ],
)
def test_bad_arguments(kwargs, message):
    assert message in "; ".join(problems(aggregator="krum", **kwargs))


@pytest.mark.parametrize(
    ("name", "f", "need", "unsafe"),
    [("krum", 3, 9, True), ("trimmed_mean", 2, 5, False), ("bulyan", 1, 7, True),
     ("nnm+median", 2, 5, True), ("bucketing+krum", 1, 10, True)],
)
def test_too_few_workers_for_f_is_refused_with_the_rule_guarantee(name, f, need, unsafe):
    """The bound is the registry's min_updates(f), as `metagg run` checks num_workers."""
    assert build_checked_aggregator(name, f=f, num_workers=need).min_updates == need
    (msg,) = problems(aggregator=name, f=f, num_workers=need - 1)
    assert msg.startswith(f"{name} with f={f} needs at least {need} clients (n ")
    assert f"got num_workers={need - 1}: lower f or use more clients" in msg
    assert ("allow_unsafe" in msg) == unsafe


def test_allow_unsafe_lowers_the_bound_to_where_the_rule_is_defined():
    spec = aggregator_spec("krum")
    assert spec.min_updates(3, unsafe=True) == 6 < spec.min_updates(3) == 9
    agg = build_checked_aggregator("krum", f=3, options={"allow_unsafe": True}, num_workers=6)
    assert agg.min_updates == 6
    (msg,) = problems(aggregator="krum", f=3, options={"allow_unsafe": True}, num_workers=5)
    assert "needs at least 6 clients" in msg and "pass options" not in msg


def test_check_enough_clients_at_round_time():
    agg = build_checked_aggregator("krum", f=3)  # the federation's size is not known yet
    check_enough_clients(agg, 9, f=3)
    with pytest.raises(ConfigError) as info:
        check_enough_clients(agg, 5, f=3, where="AggregatorStrategy",
                             got="but round 1 sampled 5")
    assert str(info.value).startswith(
        "AggregatorStrategy: krum with f=3 needs at least 9 clients (n > 2f + 2), but round "
        "1 sampled 5: lower f or use more clients, or pass options={'allow_unsafe': True}")
    # rules without a bound run on any non-empty round
    check_enough_clients(build_checked_aggregator("median", f=4), 1, f=4)


def test_names_instances_and_optimizer_configs():
    agg = build_checked_aggregator("mean", optimizer=OptimizerConfig(name="momentum", lr=0.5))
    assert agg.name == "mean"
    assert type(agg.optimizer.init(3)).__name__ == "MomentumState"
    assert build_checked_aggregator(agg) is agg
    assert isinstance(agg, Aggregator)
    assert problems(aggregator=agg, f=1) == [
        "f, optimizer and options apply to aggregator names; an Aggregator instance is used "
        "as it is"]
    with pytest.raises(TypeError, match="a name or an Aggregator"):
        build_checked_aggregator(3)
