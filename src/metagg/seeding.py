"""Every random stream of metagg, derived in one place from (seed, stream, index).

A run is a function of its config and seed, and a killed run resumes bit for bit, because
nothing random is drawn from a global generator: each draw uses a generator made here
for one named stream and one index (a round, a meta-training step, a worker group).
Streams are independent of each other (`numpy.random.SeedSequence` hashes the triple),
so adding a stream never changes the numbers of another.

    g = round_generator(seed, t, RoundStream.BATCHES)      # round t's minibatches
    s = derive_seed(seed, MetaStream.TRAIN_INIT, k)        # meta-iteration k's model init

Two run-level draws predate this module and keep their historical seeds (seed + 7919,
seed + 104729) so that shipped results and pretrained aggregators' validation numbers
reproduce: the random choice of Byzantine workers and the server's trusted sample
(followed by the train-loss evaluation subset, from the same generator).
"""

from __future__ import annotations

from enum import IntEnum

import numpy as np
import torch

__all__ = [
    "MetaStream",
    "RoundStream",
    "byzantine_generator",
    "derive_generator",
    "derive_seed",
    "round_generator",
    "server_sample_generator",
]


class RoundStream(IntEnum):
    """Per-round streams of a training run (simulator, runtime, Flower, meta-training)."""

    BATCHES = 0  # every worker's minibatch indices
    FAILURES = 1  # which workers miss the round
    ATTACK = 2  # the attack's own randomness (e.g. Gaussian noise)
    AGGREGATOR = 3  # the rule's own randomness (Zeno's subsample, bucketing's shuffle)


class MetaStream(IntEnum):
    """Streams of meta-training, indexed by meta-iteration, inner run or validation seed."""

    TRAIN_INIT = 0  # model init + minibatch seed of a training inner problem
    VALID_INIT = 1  # held-out model seeds of validation
    PES_NOISE = 2  # the antithetic perturbations of a PES step
    RUN_LENGTH = 3  # the length of a PES inner run
    TASK_SAMPLE = 4  # which task of a task family an inner problem runs on
    VALID_TASKS = 5  # the tasks multi-task meta-training validates on
    LR_AUGMENT = 6  # a PES inner run's task augmentation (its workers' lr factor), by run seed
    HETERO_TRAIN_INIT = 10  # heterogeneous-worker meta-training (apart from the above, so
    HETERO_VALID_INIT = 11  # that its seeds never collide with a homogeneous run's)
    HETERO_GROUP_INIT = 17  # a worker group's private coordinates, indexed by group
    ROBUST_DRAW = 20  # robust ES: an antithetic pair's noise and setting, by step·pairs + k
    ROBUST_VALID = 21  # robust ES: the validation runs' seeds


def _state(seed: int, stream: int, index: int, words: int) -> np.ndarray:
    return np.random.SeedSequence([int(seed), int(stream), int(index)]).generate_state(words,
                                                                            dtype=np.uint32)


def derive_seed(seed: int, stream: int, index: int) -> int:
    """An integer seed for (run seed, stream, index), independent across streams."""
    return int(_state(seed, stream, index, 1)[0])


def derive_generator(seed: int, stream: int, index: int) -> torch.Generator:
    """A CPU generator for (run seed, stream, index), independent of every other."""
    state = _state(seed, stream, index, 2)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def round_generator(seed: int, round: int, stream: RoundStream) -> torch.Generator:
    """The generator of one round's stream; a round is a pure function of (seed, round)."""
    return derive_generator(seed, round, stream)


def byzantine_generator(seed: int) -> torch.Generator:
    """Draws which workers are Byzantine (attack.selection = random)."""
    return torch.Generator().manual_seed(seed + 7919)


def server_sample_generator(seed: int) -> torch.Generator:
    """Draws the server's trusted sample, then the train-loss evaluation subset."""
    return torch.Generator().manual_seed(seed + 104729)
