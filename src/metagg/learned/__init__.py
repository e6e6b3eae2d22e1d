"""Learned aggregators: the RNN / ARNN of Ji et al. (2019) (meta-trained by BPTT),
LAgg-A / LOpt-A of Joseph et al. (2025) (by PES) and the robust trust rule (by ES over an
attack mixture), their files and meta-training.

    from metagg.learned import meta_train_rnn, load_aggregator
    result = meta_train_rnn(iterations=300, out_dir="runs/rnn-digits")
    agg = load_aggregator("runs/rnn-digits")       # or aggregator "rnn:runs/rnn-digits"

Layout: `features` (the inputs), `rnn/`, `lagg/` and `trust/` (each: φ and its step, the
aggregator, files), `store` / `zoo` (files of any kind, the shipped ones), `meta/`
(envs, estimators, the outer loop, evaluation).
"""

from metagg.config.meta import MetaTrainConfig, MetaTrainPESConfig, MetaTrainTrustConfig
from metagg.learned.lagg import LAggA, LAggConfig, LOptA, load_lagg, save_lagg
from metagg.learned.meta import (
    GradientEnv,
    HeteroEnv,
    LocalSGDEnv,
    MetaTrainResult,
    evaluate_aggregator,
    meta_train,
    meta_train_pes,
    meta_train_rnn,
    meta_train_trust,
)
from metagg.learned.rnn import CoordinateRNN, RNNAggregator, RNNConfig, RNNState, load_rnn, save_rnn
from metagg.learned.store import read_aggregator_info
from metagg.learned.trust import TrustConfig, TrustRule, load_trust, save_trust
from metagg.learned.zoo import load_aggregator, save_aggregator

__all__ = [
    "CoordinateRNN",
    "GradientEnv",
    "HeteroEnv",
    "LAggA",
    "LAggConfig",
    "LOptA",
    "LocalSGDEnv",
    "MetaTrainConfig",
    "MetaTrainPESConfig",
    "MetaTrainResult",
    "MetaTrainTrustConfig",
    "RNNAggregator",
    "RNNConfig",
    "RNNState",
    "TrustConfig",
    "TrustRule",
    "evaluate_aggregator",
    "load_aggregator",
    "load_lagg",
    "load_rnn",
    "load_trust",
    "meta_train",
    "meta_train_pes",
    "meta_train_rnn",
    "meta_train_trust",
    "read_aggregator_info",
    "save_aggregator",
    "save_lagg",
    "save_rnn",
    "save_trust",
]
