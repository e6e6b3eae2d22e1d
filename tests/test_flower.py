"""metagg aggregators as a Flower strategy (metagg.integrations.flower).

Unit tests call `aggregate_fit` with fabricated FitRes objects; one test runs
Flower's own server loop in-process (no Ray); the Ray simulation test is slow.
"""

import pytest

pytest.importorskip("flwr")

import importlib
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch
from flwr.client import Client, NumPyClient
from flwr.common import (
    Code,
    DisconnectRes,
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    GetParametersIns,
    GetParametersRes,
    GetPropertiesIns,
    GetPropertiesRes,
    ReconnectIns,
    Status,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.server import Server, ServerConfig, SimpleClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import FedAvg
from sklearn.datasets import load_digits

from metagg.aggregators.base import Aggregator, RoundContext
from metagg.aggregators.optimizers import momentum
from metagg.checkpoint import CheckpointError
from metagg.config import ConfigError
from metagg.integrations.flower import AggregatorStrategy
from metagg.layout import ParamLayout
from metagg.tasks import Task, TrustedData

SHAPES = [(3, 2), (2,)]


class LocalProxy(ClientProxy):
    """A Flower client proxy that calls a `Client` in this process (no network, no Ray)."""

    def __init__(self, cid: str, client: Client | None = None):
        super().__init__(cid)
        self.client = client

    def get_properties(self, ins: GetPropertiesIns, timeout, group_id) -> GetPropertiesRes:
        return self.client.get_properties(ins)

    def get_parameters(self, ins: GetParametersIns, timeout, group_id) -> GetParametersRes:
        return self.client.get_parameters(ins)

    def fit(self, ins: FitIns, timeout, group_id) -> FitRes:
        return self.client.fit(ins)

    def evaluate(self, ins: EvaluateIns, timeout, group_id) -> EvaluateRes:
        return self.client.evaluate(ins)

    def reconnect(self, ins: ReconnectIns, timeout, group_id) -> DisconnectRes:
        return DisconnectRes(reason="")


def arrays(seed: int = 0, shift: float = 0.0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s).astype(np.float32) + np.float32(shift) for s in SHAPES]


def fit_results(models, cids=None, counts=None) -> list[tuple[ClientProxy, FitRes]]:
    cids = cids or [f"c{k}" for k in range(len(models))]
    counts = counts or [10] * len(models)
    return [
        (LocalProxy(cid), FitRes(Status(Code.OK, ""), ndarrays_to_parameters(m), n, {}))
        for cid, m, n in zip(cids, models, counts, strict=True)
    ]


def strategy(name="mean", theta=None, **kwargs) -> AggregatorStrategy:
    theta = arrays(0) if theta is None else theta
    return AggregatorStrategy(name, initial_parameters=ndarrays_to_parameters(theta), **kwargs)


def unpack(params) -> list[np.ndarray]:
    return parameters_to_ndarrays(params)


def assert_arrays_close(got, want, atol=1e-6):
    assert [a.shape for a in got] == [w.shape for w in want]
    for a, w in zip(got, want, strict=True):
        np.testing.assert_allclose(a, w, atol=atol, rtol=0)


# ---------------------------------------------------------------------- aggregate_fit
def test_mean_with_sgd_lr1_is_fedavg_for_equal_example_counts():
    models = [arrays(k + 1) for k in range(4)]
    params, metrics = strategy("mean").aggregate_fit(1, fit_results(models), [])
    fedavg, _ = FedAvg(inplace=False).aggregate_fit(1, fit_results(models), [])
    assert_arrays_close(unpack(params), unpack(fedavg))
    assert [a.dtype for a in unpack(params)] == [np.float32, np.float32]
    assert metrics == {"num_updates": 4, "dropped_malformed": 0, "dropped_nonfinite": 0,
                       "failures": 0, "skipped": 0}


def test_mean_is_unweighted_by_example_count():
    """metagg rules treat clients alike; FedAvg weights by num_examples."""
    models = [arrays(1), arrays(2)]
    params, _ = strategy("mean").aggregate_fit(1, fit_results(models, counts=[1, 99]), [])
    fedavg, _ = FedAvg(inplace=False).aggregate_fit(1, fit_results(models, counts=[1, 99]), [])
    plain = [(a + b) / 2 for a, b in zip(*models, strict=True)]
    assert_arrays_close(unpack(params), plain)
    assert not np.allclose(unpack(params)[0], unpack(fedavg)[0], atol=1e-3)


def test_median_rejects_a_huge_outlier_client():
    theta = arrays(0)
    honest = [[a - 0.1 + 0.01 * k for a in theta] for k in range(4)]
    evil = [a + 1e6 for a in theta]
    results = fit_results([*honest, evil])
    med, _ = strategy("median", theta=theta).aggregate_fit(1, results, [])
    mean, _ = strategy("mean", theta=theta).aggregate_fit(1, results, [])
    for got, t in zip(unpack(med), theta, strict=True):
        assert np.abs(got - (t - 0.085)).max() < 0.02
    assert np.abs(unpack(mean)[0] - theta[0]).min() > 1e4


def test_nonfinite_clients_are_dropped_and_counted(caplog):
    theta = arrays(0)
    good = arrays(1)
    nan = arrays(2)
    nan[0][1, 1] = np.nan
    inf = arrays(3)
    inf[1][0] = np.inf
    s = strategy("mean", theta=theta)
    with caplog.at_level(logging.WARNING, logger="metagg"):
        params, metrics = s.aggregate_fit(1, fit_results([nan, good, inf]), [])
    assert metrics["dropped_nonfinite"] == 2 and metrics["num_updates"] == 1
    assert_arrays_close(unpack(params), good)
    assert s.dropped_updates == 2
    assert "non-finite" in caplog.text


def test_wrong_shapes_are_dropped_and_an_all_wrong_round_is_skipped(caplog):
    theta, good = arrays(0), arrays(1)
    transposed = [good[0].T.copy(), good[1]]
    missing = [good[0]]
    s = strategy("mean", theta=theta)
    with caplog.at_level(logging.WARNING, logger="metagg"):
        params, metrics = s.aggregate_fit(1, fit_results([transposed, good, missing]), [])
    assert metrics["dropped_malformed"] == 2 and metrics["num_updates"] == 1
    assert_arrays_close(unpack(params), good)
    assert "expected [(3, 2), (2,)]" in caplog.text and "client c0" in caplog.text

    # one bad client alone must not crash the server: the round is skipped, θ kept
    with caplog.at_level(logging.WARNING, logger="metagg"):
        params, metrics = s.aggregate_fit(2, fit_results([transposed, missing]), [])
    assert params is None and metrics["dropped_malformed"] == 2 and metrics["skipped"] == 1
    assert s.skipped_rounds == 1 and s.dropped_updates == 4
    assert "no client returned parameters" in caplog.text
    with pytest.raises(ValueError, match="changed shape"):
        s.configure_fit(3, ndarrays_to_parameters(missing), SimpleClientManager())


def test_server_momentum_state_persists_across_rounds():
    theta0 = arrays(0)
    c = [np.full(s, 0.5, np.float32) for s in SHAPES]
    s = strategy("mean", theta=theta0, optimizer=momentum(1.0, beta=0.5))
    expected = [a.copy() for a in theta0]
    for rnd, velocity in ((1, 1.0), (2, 1.5), (3, 1.75)):
        current = s.current_arrays()
        models = [[a - ci for a, ci in zip(current, c, strict=True)] for _ in range(3)]
        params, _ = s.aggregate_fit(rnd, fit_results(models), [])
        expected = [e - velocity * ci for e, ci in zip(expected, c, strict=True)]
        assert_arrays_close(unpack(params), expected, atol=1e-5)
    assert torch.allclose(s.state.optimizer.velocity, torch.full((8,), 0.875))


def test_saved_and_loaded_strategy_continues_like_an_uninterrupted_one(tmp_path):
    c = [np.full(sh, 0.5, np.float32) for sh in SHAPES]

    def one_round(s, rnd):
        current = s.current_arrays()
        models = [[a - (k + 1) * ci for a, ci in zip(current, c, strict=True)]
                  for k in range(3)]
        params, _ = s.aggregate_fit(rnd, fit_results(models, cids=["b", "a", "c"]), [])
        return unpack(params)

    straight = strategy("mean", optimizer=momentum(1.0, beta=0.5))
    stopped = strategy("mean", optimizer=momentum(1.0, beta=0.5))
    for rnd in (1, 2):
        one_round(straight, rnd)
        one_round(stopped, rnd)
    stopped.save(tmp_path / "strategy")
    resumed = strategy("mean", theta=arrays(5), optimizer=momentum(1.0, beta=0.5))
    resumed.load(tmp_path / "strategy")
    assert resumed.worker_ids == straight.worker_ids
    assert_arrays_close(resumed.current_arrays(), straight.current_arrays(), atol=0)
    # a restarted Flower server counts rounds from 1 again; the strategy's rounds go on
    assert_arrays_close(one_round(resumed, 1), one_round(straight, 3), atol=0)
    assert resumed.rounds_done == straight.rounds_done == 3
    with pytest.raises(CheckpointError, match="aggregator 'mean'"):
        strategy("median").load(tmp_path / "strategy")
    with pytest.raises(CheckpointError, match="does not fit"):  # momentum state, plain SGD
        strategy("mean").load(tmp_path / "strategy")
    with pytest.raises(CheckpointError, match="num_workers=3"):
        strategy("mean", optimizer=momentum(1.0, beta=0.5), num_workers=5).load(
            tmp_path / "strategy")
    with pytest.raises(ValueError, match="nothing to save"):
        AggregatorStrategy("mean").save(tmp_path / "empty")


def test_too_few_updates_keeps_theta_and_logs(caplog):
    """Five clients sampled (enough for krum, f=1), two failed: a transient shortfall."""
    theta = arrays(0)
    s = strategy("krum", theta=theta, f=1, num_workers=5)  # krum with f=1 needs 5 updates
    died = [RuntimeError("client died")] * 2
    with caplog.at_level(logging.WARNING, logger="metagg"):
        params, metrics = s.aggregate_fit(1, fit_results([arrays(k) for k in range(3)]), died)
    assert params is None and metrics["skipped"] == 1
    assert "skipped" in caplog.text and s.skipped_rounds == 1
    assert_arrays_close(s.current_arrays(), theta)
    params, metrics = s.aggregate_fit(2, fit_results([arrays(k) for k in range(5)]), [])
    assert params is not None and metrics["skipped"] == 0


def test_a_round_that_samples_too_few_clients_for_the_rule_is_an_error():
    """krum with f=3 needs 9 clients: a round of 5 could never aggregate (it used to be
    skipped, and so was every later one, and the run ended 'successfully')."""
    s = strategy("krum", f=3)
    with pytest.raises(ConfigError, match=r"krum with f=3 needs at least 9 clients "
                                          r"\(n > 2f \+ 2\), but round 1 sampled 5"):
        s.aggregate_fit(1, fit_results([arrays(k) for k in range(5)]), [])
    assert s.skipped_rounds == 0 and s.rounds_done == 0
    # failed clients were sampled too: 7 answers + 2 failures = 9 is enough to try
    params, metrics = strategy("krum", f=3).aggregate_fit(
        1, fit_results([arrays(k) for k in range(7)]), [RuntimeError("died")] * 2)
    assert params is None and metrics["skipped"] == 1 and metrics["num_updates"] == 7


def test_failures_are_counted_and_accept_failures_is_honoured():
    results = fit_results([arrays(1), arrays(2)])
    params, metrics = strategy().aggregate_fit(1, results, [RuntimeError("client died")])
    assert params is not None and metrics["failures"] == 1
    params, metrics = strategy(accept_failures=False).aggregate_fit(
        1, results, [RuntimeError("client died")])
    assert params is None and metrics["failures"] == 1 and metrics["skipped"] == 1


class Spy(Aggregator):
    """Records each round's context; steps by the mean update."""

    name = "spy"

    def __init__(self):
        self.contexts: list[RoundContext] = []
        self.init_workers: int | None = None

    def init(self, layout: ParamLayout, num_workers: int):
        self.init_workers = num_workers
        return torch.zeros(())

    def step(self, state, updates, ctx):
        self.contexts.append(ctx)
        return updates.mean(0), state + 1


def test_worker_ids_are_stable_client_ids_and_context_is_filled():
    theta = arrays(0)
    spy = Spy()
    s = AggregatorStrategy(spy, initial_parameters=ndarrays_to_parameters(theta), num_workers=4)
    s.aggregate_fit(1, fit_results([arrays(1)] * 3, cids=["n7", "n3", "n9"],
                                   counts=[5, 6, 7]), [])
    nan = arrays(2)
    nan[1][0] = np.nan
    s.aggregate_fit(2, fit_results([arrays(1), nan, arrays(3)], cids=["n9", "n8", "n7"]), [])
    first, second = spy.contexts
    assert spy.init_workers == 4 and first.num_workers == 4
    # ids in order of first appearance, results taken in client-id order (n3, n7, n9)
    assert first.worker_ids.tolist() == [0, 1, 2]
    assert first.num_examples.tolist() == [6, 5, 7]
    assert second.worker_ids.tolist() == [1, 2]  # n8 (id 3) sent NaN and was dropped
    assert (first.round, second.round) == (0, 1)
    assert first.mode == "local_sgd"
    assert torch.equal(first.params, torch.from_numpy(np.concatenate([a.ravel() for a in theta])))
    assert s.state == 2
    assert s.worker_ids == {"n3": 0, "n7": 1, "n9": 2, "n8": 3}


class LrSpy(Spy):
    """A Spy that asks the clients for a local lr of 0.1 · (rounds aggregated + 1)."""

    def requested_local_lr(self, state, ctx):
        return 0.1 * (float(state) + 1)


def test_an_aggregator_chosen_local_lr_goes_out_in_the_fit_config():
    spy = LrSpy()
    s = AggregatorStrategy(spy, initial_parameters=ndarrays_to_parameters(arrays(0)),
                           local_lr=0.7)
    manager = SimpleClientManager()
    for k in range(3):
        manager.register(LocalProxy(f"c{k}"))
    for rnd in (1, 2):
        instructions = s.configure_fit(rnd, s.current_parameters(), manager)
        assert [ins.config["local_lr"] for _, ins in instructions] == \
            pytest.approx([0.1 * rnd] * 3)
        s.aggregate_fit(rnd, fit_results([arrays(k) for k in range(3)]), [])
        assert spy.contexts[-1].local_lr == pytest.approx(0.1 * rnd)  # told to the rule too
    # an aggregator that asks for nothing leaves the config alone
    plain = AggregatorStrategy(Spy(), initial_parameters=ndarrays_to_parameters(arrays(0)))
    assert all("local_lr" not in ins.config
               for _, ins in plain.configure_fit(1, plain.current_parameters(), manager))


def test_more_clients_than_num_workers_is_a_clear_error():
    s = AggregatorStrategy(Spy(), initial_parameters=ndarrays_to_parameters(arrays(0)))
    s.aggregate_fit(1, fit_results([arrays(1)] * 2, cids=["a", "b"]), [])
    with pytest.raises(ValueError, match="pass num_workers="):
        s.aggregate_fit(2, fit_results([arrays(1)], cids=["c"]), [])


def test_learned_rnn_aggregator_runs_with_a_subset_of_clients():
    theta = arrays(0)
    s = strategy("rnn:pretrained/digits-mlp20-lstm", theta=theta, num_workers=10)
    cids = [f"node{k}" for k in range(10)]
    params, metrics = s.aggregate_fit(1, fit_results([[a - 0.1 for a in theta]] * 10, cids=cids),
                                      [])
    assert metrics["num_updates"] == 10
    assert all(np.isfinite(a).all() for a in unpack(params))
    assert not np.allclose(unpack(params)[0], theta[0])
    subset = [cids[k] for k in (7, 2, 5)]
    params, metrics = s.aggregate_fit(2, fit_results([arrays(1)] * 3, cids=subset), [])
    assert params is not None and metrics["num_updates"] == 3
    assert s.state.h.abs().sum() > 0


def test_trusted_data_aggregator_fltrust():
    model = torch.nn.Linear(4, 3)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 4, generator=g), torch.randint(0, 3, (64,), generator=g)
    trusted = TrustedData(Task(model, num_classes=3), x, y)
    theta = [np.zeros((3, 4), np.float32), np.zeros(3, np.float32)]
    flat = torch.zeros(15)
    grad = trusted.grad(flat).numpy()
    honest = [[t - 0.5 * grad[s.slice].reshape(s.shape) for t, s in zip(theta, trusted.task.layout,
                                                                         strict=True)]] * 3
    evil = [t + 1e3 * grad[s.slice].reshape(s.shape) for t, s in zip(theta, trusted.task.layout,
                                                                     strict=True)]
    results = fit_results([*honest, evil])
    s = strategy("fltrust", theta=theta, trusted=trusted, local_lr=0.5)
    s.aggregate_fit(1, results, [])
    mean = strategy("mean", theta=theta)
    mean.aggregate_fit(1, results, [])
    assert float(trusted.loss(s.params)) < float(trusted.loss(flat)) < float(
        trusted.loss(mean.params))
    with pytest.raises(ValueError, match="needs the server's trusted data"):
        strategy("fltrust", theta=theta)
    with pytest.raises(ValueError, match="trusted task's model has tensors"):
        strategy("fltrust", theta=arrays(0), trusted=trusted)


def test_constructor_checks_its_arguments():
    with pytest.raises(ValueError, match="aggregator names"):
        AggregatorStrategy(Spy(), f=1)
    with pytest.raises(ValueError, match="unknown value 'nope'"):
        AggregatorStrategy("nope")
    with pytest.raises(ValueError, match="no global parameters"):
        AggregatorStrategy("mean").aggregate_fit(1, fit_results([arrays(1)]), [])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"f": -1}, "f: must be >= 0, got -1"),  # used to crash the server at round 1
        ({"f": 1.5}, "f: expected an integer, got 1.5"),
        ({"f": 3, "num_workers": 5}, "krum with f=3 needs at least 9 clients (n > 2f + 2), "
                                     "got num_workers=5"),
        ({"options": {"nope": 1}}, "bad options"),
    ],
)
def test_bad_f_is_a_config_error_at_construction(kwargs, message):
    with pytest.raises(ConfigError) as info:
        strategy("krum", **kwargs)
    assert message in str(info.value)


def test_import_without_flwr_says_how_to_install(monkeypatch):
    for name in [m for m in sys.modules if m == "flwr" or m.startswith("flwr.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.delitem(sys.modules, "metagg.integrations.flower")
    with pytest.raises(ImportError, match=r"pip install 'metagg\[flower\]'"):
        importlib.import_module("metagg.integrations.flower")


# ---------------------------------------------------------------------- end to end
def digits_split(num_clients: int):
    """sklearn's bundled digits as numpy: client shards of the first 1500, test = the rest."""
    data = load_digits()
    x = (data.data / 16.0).astype(np.float32)
    y = data.target.astype(np.int64)
    order = np.random.default_rng(0).permutation(1500)
    shards = [(x[idx], y[idx]) for idx in np.array_split(order, num_clients)]
    return shards, (x[1500:], y[1500:])


def softmax_loss_grad(params, x, y):
    w, b = params
    logits = x @ w + b
    logits -= logits.max(axis=1, keepdims=True)
    p = np.exp(logits)
    p /= p.sum(axis=1, keepdims=True)
    loss = float(-np.log(p[np.arange(len(y)), y] + 1e-12).mean())
    g = p
    g[np.arange(len(y)), y] -= 1.0
    g /= len(y)
    return loss, [x.T @ g, g.sum(axis=0)], float((logits.argmax(1) == y).mean())


class DigitsClient(NumPyClient):
    """Softmax regression on a shard of digits; 5 full-batch SGD steps per round."""

    def __init__(self, x, y, *, byzantine: bool = False, fits: list[int] | None = None,
                 index: int = 0):
        self.x, self.y, self.byzantine = x, y, byzantine
        self.fits, self.index = fits, index

    def get_parameters(self, config):
        return initial_model()

    def fit(self, parameters, config):
        if self.fits is not None:
            self.fits.append(self.index)
        params = [p.copy() for p in parameters]
        for _ in range(5):
            loss, grads, _ = softmax_loss_grad(params, self.x, self.y)
            params = [p - np.float32(0.5) * g for p, g in zip(params, grads, strict=True)]
        if self.byzantine:  # sign-flipped and blown up: ruins a plain average
            params = [np.float32(-20.0) * p for p in params]
        return params, len(self.y), {"loss": loss}

    def evaluate(self, parameters, config):
        loss, _, acc = softmax_loss_grad(parameters, self.x, self.y)
        return loss, len(self.y), {"accuracy": acc}


def initial_model() -> list[np.ndarray]:
    return [np.zeros((64, 10), np.float32), np.zeros(10, np.float32)]


def central_eval(test, accuracies):
    def evaluate_fn(server_round, arrays, config):
        loss, _, acc = softmax_loss_grad(arrays, *test)
        accuracies.append(acc)
        return loss, {"accuracy": acc}

    return evaluate_fn


def run_flower_server(aggregator: str, rounds: int = 3, *, clients: int = 4, f: int = 0,
                      fits: list[int] | None = None):
    """Flower's own Server.fit (sampling, thread pool, evaluation) with in-process clients;
    the last client is Byzantine. `fits` collects the index of every client that trained."""
    shards, test = digits_split(clients)
    accuracies: list[float] = []
    strat = AggregatorStrategy(
        aggregator, f=f, initial_parameters=ndarrays_to_parameters(initial_model()),
        min_fit_clients=clients, min_evaluate_clients=clients, min_available_clients=clients,
        evaluate_fn=central_eval(test, accuracies),
    )
    manager = SimpleClientManager()
    for k, (x, y) in enumerate(shards):
        client = DigitsClient(x, y, byzantine=(k == clients - 1), fits=fits, index=k)
        manager.register(LocalProxy(f"client{k}", client.to_client()))
    history, _ = Server(client_manager=manager, strategy=strat).fit(rounds, timeout=None)
    return accuracies, history, strat


def test_flower_server_loop_in_process_with_a_byzantine_client(monkeypatch):
    monkeypatch.setenv("FLWR_TELEMETRY_ENABLED", "0")
    accuracies, history, strat = run_flower_server("median")
    assert len(accuracies) == 4  # before training and after each of three rounds
    assert accuracies[0] < 0.2 and accuracies[-1] > 0.8
    assert history.metrics_distributed_fit["num_updates"] == [(1, 4), (2, 4), (3, 4)]
    assert history.losses_distributed  # clients evaluated θ each round
    assert len(strat.worker_ids) == 4 and strat.num_workers == 4
    plain, _, _ = run_flower_server("mean")  # the same attack ruins a plain average
    assert plain[-1] < 0.5


def test_flower_server_with_too_few_clients_for_f_fails_before_training(monkeypatch):
    """krum, f=3, five clients: Flower's server stops at round 1 with the reason, and no
    client trains (it used to skip all rounds and return normally)."""
    monkeypatch.setenv("FLWR_TELEMETRY_ENABLED", "0")
    fits: list[int] = []
    with pytest.raises(ConfigError, match=r"needs at least 9 clients .* round 1 sampled 5"):
        run_flower_server("krum", clients=5, f=3, fits=fits)
    assert fits == []


def ray_client_fn(context):
    """ClientApp factory for the Ray simulation: shard by the node's partition id."""
    shards, _ = digits_split(int(context.node_config["num-partitions"]))
    pid = int(context.node_config["partition-id"])
    x, y = shards[pid]
    return DigitsClient(x, y, byzantine=(pid == 0)).to_client()


def ray_pids() -> set[int]:
    """Ids of running Ray processes (raylet, gcs_server, ray:: workers); Linux /proc."""
    pids = set()
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cmd = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if cmd.startswith(b"ray::") or b"raylet" in cmd or b"gcs_server" in cmd:
            pids.add(int(proc.name))
    return pids


def wait_for_exit(pids: set[int], timeout: float = 30.0) -> set[int]:
    """Wait until none of `pids` runs any more; return those still running."""
    deadline = time.monotonic() + timeout
    while pids and time.monotonic() < deadline:
        pids = {p for p in pids if Path(f"/proc/{p}").exists()}
        time.sleep(0.2)
    return pids


@pytest.mark.slow
def test_flower_ray_simulation_end_to_end(monkeypatch):
    ray = pytest.importorskip("ray")
    from flwr.client import ClientApp
    from flwr.server import ServerApp, ServerAppComponents
    from flwr.simulation import run_simulation

    monkeypatch.setenv("FLWR_TELEMETRY_ENABLED", "0")
    # Flower's Ray backend exports PYTHONPATH for its workers; undo that afterwards.
    monkeypatch.setenv("PYTHONPATH", "")
    _, test = digits_split(4)
    accuracies: list[float] = []
    strat = AggregatorStrategy(
        "trimmed_mean", f=1, initial_parameters=ndarrays_to_parameters(initial_model()),
        min_fit_clients=4, min_evaluate_clients=4, min_available_clients=4,
        evaluate_fn=central_eval(test, accuracies),
    )

    def server_fn(context):
        return ServerAppComponents(strategy=strat, config=ServerConfig(num_rounds=2))

    before = ray_pids()
    try:
        run_simulation(
            server_app=ServerApp(server_fn=server_fn),
            client_app=ClientApp(client_fn=ray_client_fn),
            num_supernodes=4,
            backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                            "init_args": {"num_cpus": 2}},
        )
    finally:
        if ray.is_initialized():
            ray.shutdown()
        # Ray's workers exit a moment after the shutdown; make sure they did.
        left = wait_for_exit(ray_pids() - before)
    assert not left, f"Ray processes left running: {sorted(left)}"
    assert len(accuracies) == 3 and accuracies[-1] > 0.7
    assert len(strat.worker_ids) == 4 and strat.skipped_rounds == 0


def test_result_order_does_not_change_slots_or_the_step():
    """Flower hands results over in completion order; the outcome must not depend on it."""
    models = [arrays(k) for k in (1, 2, 3)]
    forward = strategy("rnn:pretrained/digits-mlp20-lstm", num_workers=10)
    backward = strategy("rnn:pretrained/digits-mlp20-lstm", num_workers=10)
    a, _ = forward.aggregate_fit(1, fit_results(models, cids=["a", "b", "c"]), [])
    b, _ = backward.aggregate_fit(1, fit_results(models[::-1], cids=["c", "b", "a"]), [])
    assert forward.worker_ids == backward.worker_ids
    for x, y in zip(unpack(a), unpack(b), strict=True):
        np.testing.assert_array_equal(x, y)


def test_a_loaded_strategy_numbers_rounds_on_from_where_it_stopped(tmp_path):
    first, second = Spy(), Spy()
    s = AggregatorStrategy(first, initial_parameters=ndarrays_to_parameters(arrays(0)))
    for rnd in (1, 2):
        s.aggregate_fit(rnd, fit_results([arrays(1), arrays(2)]), [])
    s.save(tmp_path / "s")
    restarted = AggregatorStrategy(second, initial_parameters=ndarrays_to_parameters(arrays(0)))
    restarted.load(tmp_path / "s")
    restarted.aggregate_fit(1, fit_results([arrays(1), arrays(2)]), [])  # Flower counts anew
    assert [c.round for c in first.contexts] == [0, 1]
    assert [c.round for c in second.contexts] == [2]
