"""The coordinatewise RNN / ARNN aggregator (Ji et al. 2019): `cells` (φ), `aggregator`
(the step), `io` (files)."""

from metagg.learned.rnn.aggregator import DEFAULT_CHUNK, RNNAggregator, RNNState
from metagg.learned.rnn.cells import CoordinateRNN, RNNConfig, gru_cell, lstm_cell
from metagg.learned.rnn.io import load_rnn, save_rnn

__all__ = [
    "DEFAULT_CHUNK",
    "CoordinateRNN",
    "RNNAggregator",
    "RNNConfig",
    "RNNState",
    "gru_cell",
    "load_rnn",
    "lstm_cell",
    "save_rnn",
]
