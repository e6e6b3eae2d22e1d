"""The learned trust-weighted robust aggregation rule (`trust:PATH`): per-worker
scale-free features from the server's trusted sample → gates → a clipped weighted sum."""

from metagg.learned.trust.io import FORMAT, build_trust_rule, load_trust, save_trust
from metagg.learned.trust.model import (
    FEATURE_NAMES,
    TrustConfig,
    TrustRule,
    TrustState,
    initial_phi,
)

__all__ = [
    "FEATURE_NAMES",
    "FORMAT",
    "TrustConfig",
    "TrustRule",
    "TrustState",
    "build_trust_rule",
    "initial_phi",
    "load_trust",
    "save_trust",
]
