"""Learned aggregators: the RNN / ARNN of Ji et al. (2019) (BPTT) and LAgg-A / LOpt-A of
Joseph et al. (2025) (PES), their storage and meta-training.

    from metagg.learned import meta_train_rnn, load_aggregator
    result = meta_train_rnn(iterations=300, out_dir="runs/rnn-digits")
    agg = load_aggregator("runs/rnn-digits")       # or aggregator "rnn:runs/rnn-digits"
"""

from metagg.learned.lagg import LAggA, LAggConfig, LOptA, load_lagg, save_lagg
from metagg.learned.meta_bptt import (
    MetaEnv,
    MetaTrainConfig,
    MetaTrainResult,
    evaluate_aggregator,
    meta_train,
    meta_train_rnn,
)
from metagg.learned.meta_pes import MetaTrainPESConfig, meta_train_pes
from metagg.learned.rnn import (
    CoordinateRNN,
    RNNAggregator,
    RNNConfig,
    RNNState,
    gradient_features,
    log_norm_feature,
    loss_features,
)
from metagg.learned.store import load_aggregator, read_aggregator_info, save_aggregator

__all__ = [
    "CoordinateRNN",
    "LAggA",
    "LAggConfig",
    "LOptA",
    "MetaEnv",
    "MetaTrainConfig",
    "MetaTrainPESConfig",
    "MetaTrainResult",
    "RNNAggregator",
    "RNNConfig",
    "RNNState",
    "evaluate_aggregator",
    "gradient_features",
    "load_aggregator",
    "load_lagg",
    "log_norm_feature",
    "loss_features",
    "meta_train",
    "meta_train_pes",
    "meta_train_rnn",
    "read_aggregator_info",
    "save_aggregator",
    "save_lagg",
]
