"""The server: Flower's loop with `metagg.integrations.flower.AggregatorStrategy`.

Each round the clients' models go to the metagg rule named in the run config (median by
default) instead of Flower's average; θ is evaluated on the held-out digits after every
round, and the accuracies are logged (and written to `summary`, if set).
"""

from __future__ import annotations

import json
import os
from logging import INFO
from pathlib import Path

from flwr.app import Context
from flwr.common import log, ndarrays_to_parameters
from flwr.server import ServerApp, ServerAppComponents, ServerConfig

from metagg.integrations.flower import AggregatorStrategy
from metagg_flower.task import initial_model, load_test, loss_grads_accuracy


def server_fn(context: Context) -> ServerAppComponents:
    cfg = context.run_config
    clients = int(cfg["num-clients"])
    x_test, y_test = load_test()
    accuracies: list[float] = []

    def evaluate(server_round, arrays, config):
        loss, _, accuracy = loss_grads_accuracy(arrays, x_test, y_test)
        accuracies.append(accuracy)
        log(INFO, "metagg %s: round %d, test accuracy %.3f", strategy.aggregator.name,
            server_round, accuracy)
        if cfg["summary"]:
            write_summary(Path(str(cfg["summary"])), {
                "aggregator": strategy.aggregator.name, "f": int(cfg["f"]),
                "clients": clients, "num_byzantine": int(cfg["num-byzantine"]),
                "rounds": server_round, "test_accuracy": accuracies,
                "skipped_rounds": strategy.skipped_rounds,
                "dropped_updates": strategy.dropped_updates})
        return loss, {"accuracy": accuracy}

    # Checked here, as `metagg run` checks a config: f < 0 or too few clients for the
    # rule is a ConfigError now, not a crash or a silently skipped round later.
    strategy = AggregatorStrategy(
        str(cfg["aggregator"]), f=int(cfg["f"]), num_workers=clients,
        initial_parameters=ndarrays_to_parameters(initial_model()),
        min_fit_clients=clients, min_available_clients=clients,
        fraction_evaluate=0.0,  # the server evaluates θ itself, on held-out digits
        evaluate_fn=evaluate,
    )
    return ServerAppComponents(strategy=strategy,
                               config=ServerConfig(num_rounds=int(cfg["num-server-rounds"])))


def write_summary(path: Path, summary: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(summary, indent=2))
    os.replace(tmp, path)


app = ServerApp(server_fn=server_fn)
