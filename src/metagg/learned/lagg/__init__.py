"""LOpt-A and LAgg-A (Joseph et al. 2025): `model` (φ and the pure step), `aggregator`
(the step on the server), `io` (files)."""

from metagg.learned.lagg.aggregator import LAggA, LearnedAdaAggregator, LOptA, learned_ada
from metagg.learned.lagg.io import load_lagg, save_lagg
from metagg.learned.lagg.model import AdaMLP, FlatPhi, LAggConfig, ada_step

__all__ = [
    "AdaMLP",
    "FlatPhi",
    "LAggA",
    "LAggConfig",
    "LOptA",
    "LearnedAdaAggregator",
    "ada_step",
    "learned_ada",
    "load_lagg",
    "save_lagg",
]
