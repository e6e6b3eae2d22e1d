"""The clients: local SGD on a shard of digits; the first `num-byzantine` ones attack."""

from __future__ import annotations

import numpy as np
from flwr.app import Context
from flwr.client import ClientApp, NumPyClient

from metagg_flower.task import load_partition, loss_grads_accuracy, train


class DigitsClient(NumPyClient):
    """Returns its locally trained model θ_k (the server turns it into θ − θ_k).

    A Byzantine client sign-flips: it sends θ − s·(θ_k − θ), its honest update
    reversed and scaled by s, which pulls a plain average uphill (s > clients − 1)."""

    def __init__(self, x: np.ndarray, y: np.ndarray, *, steps: int, lr: float,
                 attack_scale: float | None):
        self.x, self.y, self.steps, self.lr = x, y, steps, lr
        self.attack_scale = attack_scale  # None: honest

    def fit(self, parameters, config):
        # an aggregator that chooses the clients' lr sends it with θ
        lr = float(config.get("local_lr", self.lr))
        trained, loss = train(parameters, self.x, self.y, steps=self.steps, lr=lr)
        if self.attack_scale is not None:
            s = np.float32(self.attack_scale)
            trained = [p - s * (t - p) for p, t in zip(parameters, trained, strict=True)]
        return trained, len(self.y), {"loss": loss}

    def evaluate(self, parameters, config):
        loss, _, accuracy = loss_grads_accuracy(parameters, self.x, self.y)
        return loss, len(self.y), {"accuracy": accuracy}


def client_fn(context: Context):
    partition = int(context.node_config["partition-id"])
    x, y = load_partition(partition, int(context.node_config["num-partitions"]))
    cfg = context.run_config
    byzantine = partition < int(cfg["num-byzantine"])
    return DigitsClient(x, y, steps=int(cfg["local-steps"]), lr=float(cfg["local-lr"]),
                        attack_scale=float(cfg["attack-scale"]) if byzantine else None,
                        ).to_client()


app = ClientApp(client_fn=client_fn)
