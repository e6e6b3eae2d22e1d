"""Meta-training learned aggregators: envs (where), estimators (BPTT, PES), the outer loop,
evaluation, and the entry points (`train`)."""

from metagg.learned.meta.envs import (
    GradientEnv,
    HeteroConfig,
    HeteroEnv,
    LocalSGDEnv,
    MetaEnv,
    TaskEnvs,
    task_envs,
)
from metagg.learned.meta.estimators import BPTT, Estimate, Estimator
from metagg.learned.meta.evaluate import evaluate_aggregator, score, validate
from metagg.learned.meta.loop import LoopSettings, MetaTrainResult, run_outer_loop
from metagg.learned.meta.pes import PES
from metagg.learned.meta.robust import TrustES
from metagg.learned.meta.train import meta_train, meta_train_pes, meta_train_rnn, meta_train_trust

__all__ = [
    "BPTT",
    "PES",
    "Estimate",
    "Estimator",
    "GradientEnv",
    "HeteroConfig",
    "HeteroEnv",
    "LocalSGDEnv",
    "LoopSettings",
    "MetaEnv",
    "MetaTrainResult",
    "TaskEnvs",
    "TrustES",
    "evaluate_aggregator",
    "meta_train",
    "meta_train_pes",
    "meta_train_rnn",
    "meta_train_trust",
    "run_outer_loop",
    "score",
    "task_envs",
    "validate",
]
