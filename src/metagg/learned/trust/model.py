"""A learned trust-weighted robust aggregation rule ("trust").

    rule = TrustRule(TrustConfig(), phi)              # φ: the flat meta-parameters
    agg = RuleAggregator("trust", rule, sgd(1.0), uses_trusted_data=True)

Each round the server scores every worker's update u_i with five scale-free features
computed from its small trusted sample and the round's rows, so that no worker can
dominate them by sending a large vector:

- trusted_loss_change: asinh of the relative change of the trusted loss if u_i alone
  were applied at probe step γ (θ − γ u_i), divided by 0.1 γ. γ is small (0.1) because at
  γ = 1 noisy honest rows raise the trusted loss while tiny colluding rows do not (IPM
  at 7/10 then looks best: measured, and Zeno's authors use 0.1 for the same reason).
- cos_reference: cos(u_i, r), r the server's own update on the trusted sample, computed
  like a worker's (a momentum of it when the workers send momenta, as FLTrust does).
- log_norm_ratio: log(‖u_i‖ / ‖r‖), clipped to ±5.
- loss_change_rank: the rank of the first feature among the workers, in [0, 1].
- cos_median: cos(u_i, the coordinate-wise median of the rows).

A 5→H→1 tanh MLP with a linear skip gives a score s_i; the weight is a gate
w_i = sigmoid(s_i) / max(Σ_j sigmoid(s_j), e^ν) — not a softmax over the crowd, so seven
colluding rows do not share out the weight among themselves — each row is clipped to
e^c ‖r‖, and the direction is Σ_i w_i clip_i u_i (the server optimizer follows). The
direction is never longer than the clipped rows' weighted mean: a learned gain (tried)
sped up training on the meta-training task but amplified the rows a colluding majority
got weighted in (ALIE at 7/10 on Fashion-MNIST: 27 % with the learned gain 3.3, 64 %
with 1), so the step size stays the server optimizer's.

With a distrust budget κ (`TrustConfig.budget`) the rule uses f, the number of Byzantine
workers it is told to assume (as Zeno or Krum are): while 2f < n, the n − ⌈κf⌉
best-scored rows get gate 1 and only the rest their learned gate; with f = 0 it is the
mean (no row clipped either). Without it the gates kept about half of ten honest rows (an
effective 5 of 10), which cost 1.4 points of accuracy on IID digits and 8 with Dirichlet
data (measured against uniform weights on the same clipped rows).
With a reference share λ (`TrustConfig.reference_share`) and an assumed Byzantine
majority (2f ≥ n) the server's own update r takes a share λ of the direction, as one more
honest row would: three honest rows on skewed shards miss classes the trusted sample has,
and where the gates let colluding rows in (label flip, min-max at 7/10) r keeps the step
downhill (the shipped rule: λ = 0.5). With reference workers a
(`TrustConfig.reference_workers`, instead of λ) r counts as a honest workers' rows
whenever an attack is assumed (f > 0): its share is a / (n − f + a), which scales with
the honest rows assumed (not shipped: a = 4 raised the worst cells but cost IID cells at
3/10; docs/experiments/trust-reference-workers).
With a peer weight μ (`TrustConfig.peer_weight`) and an assumed honest majority
(0 < 2f < n) the score gains μ·(the median over the other rows of cos(u_i, u_j)): rows
that agree with the trusted sample but point away from the honest majority lose their
gate.
Everything is differentiable in the updates (the white-box attack descends through it);
the rank is piecewise constant. φ is meta-trained by antithetic evolution strategies over
a mixture of attacks (`metagg.learned.meta.robust`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

import torch

from metagg.aggregators.base import RoundContext
from metagg.aggregators.rules import momentum_reference
from metagg.layout import ParamLayout

__all__ = ["FEATURE_NAMES", "TrustConfig", "TrustRule", "TrustState", "initial_phi"]

FEATURE_NAMES = ("trusted_loss_change", "cos_reference", "log_norm_ratio",
                 "loss_change_rank", "cos_median")
_NF = len(FEATURE_NAMES)


@dataclass(frozen=True)
class TrustConfig:
    """The architecture (saved with the weights)."""

    hidden: int = 8  # the score MLP's width
    probe: float = 0.1  # γ of the trusted-loss probe θ − γ u_i
    # κ: while the honest are assumed a majority (2f < n; f = the Byzantine workers
    # assumed, as every robust rule is told) only the ⌈κf⌉ worst-scored rows keep their
    # learned gate, the others get gate 1; with no attack assumed (f = 0) the rule is the
    # mean (nothing clipped).
    # With 2f ≥ n, or None (the first shipped weights), every row is gated: the best-scored
    # rows may then be the attackers' (measured: min-max 7/10 on Dirichlet Fashion-MNIST
    # fell from 67 % to 10 % when the best three were trusted).
    budget: float | None = None
    # λ: while 2f ≥ n (an honest minority assumed) the server's own update r takes a share
    # λ of the direction, (1 − λ) Σ w_i clip_i u_i + λ r, as one more honest row would:
    # three honest rows on skewed (Dirichlet) shards miss whole classes that the trusted
    # sample has. 0: the rows only (the first shipped weights).
    reference_share: float = 0.0
    # a (instead of λ): with any attack assumed (f > 0) r counts as `a` honest workers'
    # rows, its share a / (n − f + a). The same trusted sample is worth less the more
    # honest rows there are (a = 4, n = 100, f = 30: 5 %), and a majority's rows on skewed
    # (Dirichlet) shards also miss classes: with a = 4 the worst 3/10 Dirichlet validation
    # run rose from 48.6 to 63.6 % on digits, 54.3 to 62.0 % on Fashion-MNIST, but IID
    # cells at 3/10 lost 1–2 points (docs/experiments/trust-reference-workers). None: λ.
    reference_workers: float | None = None
    # μ: while the honest are assumed a majority (0 < 2f < n) each row's score gains
    # μ·(its peer agreement: the median over the other rows of cos(u_i, u_j)), which the
    # honest majority decides. A row can look good on the trusted sample yet point away
    # from the honest rows: the white-box attack on Fashion-MNIST did, its rows scored
    # best and kept gate 1 (cos with the coordinate-wise median −0.1 to −0.4, every honest
    # row +0.3 to +0.8). Not that cosine: three identical colluding rows drag the
    # coordinate-wise median towards themselves when Dirichlet shards scatter the honest
    # rows (min-max 3/10 on Fashion-MNIST lost 4–10 points with it). With 2f ≥ n the
    # agreement may be the attackers', so it is not used. 0: off.
    peer_weight: float = 0.0

    def __post_init__(self) -> None:
        if not (isinstance(self.hidden, int) and self.hidden >= 1):
            raise ValueError(f"hidden must be an integer >= 1, got {self.hidden!r}")
        if not (isinstance(self.probe, int | float) and self.probe > 0):
            raise ValueError(f"probe must be > 0, got {self.probe!r}")
        if self.budget is not None and not (isinstance(self.budget, int | float)
                                            and not isinstance(self.budget, bool)
                                            and self.budget >= 1):
            raise ValueError(f"budget must be a number >= 1 or null, got {self.budget!r}")
        share = self.reference_share
        if isinstance(share, bool) or not isinstance(share, int | float) or not 0 <= share <= 1:
            raise ValueError(f"reference_share must be a number in [0, 1], got {share!r}")
        workers = self.reference_workers
        if workers is not None:
            if (isinstance(workers, bool) or not isinstance(workers, int | float)
                    or not 0 < workers < math.inf):
                raise ValueError(f"reference_workers must be a number > 0 or null, "
                                 f"got {workers!r}")
            if share:
                raise ValueError("set reference_share or reference_workers, not both "
                                 f"(got {share!r} and {workers!r})")
        mu = self.peer_weight
        if isinstance(mu, bool) or not isinstance(mu, int | float) or not 0 <= mu < math.inf:
            raise ValueError(f"peer_weight must be a number >= 0, got {mu!r}")

    @property
    def layout(self) -> ParamLayout:
        """Names and shapes of the meta-parameters inside the flat φ."""
        h = self.hidden
        return ParamLayout.from_shapes({
            "w1": (_NF, h), "b1": (h,), "w2": (h,), "b2": (),  # the score MLP
            "skip": (_NF,),  # linear part of the score
            "log_clip": (),  # rows clipped to e^c ‖r‖
            "log_floor": (),  # ν: weights normalised by max(Σ w, e^ν)
        })

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def initial_phi(config: TrustConfig, seed: int = 0) -> torch.Tensor:
    """A soft Zeno: the weight falls with the trusted-loss increase (skip −25 on the first
    feature), the MLP's output off (w2 = 0, its first layer random so ES can switch it
    on), rows clipped at e² ‖r‖, ν = 0."""
    g = torch.Generator().manual_seed(seed)
    layout = config.layout
    phi = torch.zeros(layout.size)
    parts = layout.unflatten(phi)
    parts["w1"].copy_(0.3 * torch.randn(parts["w1"].shape, generator=g))
    parts["b1"].copy_(0.3 * torch.randn(parts["b1"].shape, generator=g))
    parts["skip"][0] = -25.0
    parts["log_clip"].fill_(2.0)
    return phi


class TrustState(NamedTuple):
    reference: torch.Tensor  # [d] the server's momentum of its own update (worker momentum)
    started: torch.Tensor  # bool scalar: reference holds a value


def _norms(x: torch.Tensor) -> torch.Tensor:
    """Row norms with a finite gradient at 0 (the white-box attack may start there)."""
    sq = x.square().sum(-1)
    return torch.where(sq > 0, sq, 1.0).sqrt() * (sq > 0)


class TrustRule:
    """The rule (see the module docstring); `phi` is the flat float32 meta-parameter vector."""

    def __init__(self, config: TrustConfig, phi: torch.Tensor, f: int = 0):
        if phi.shape != (config.layout.size,):
            raise ValueError(f"trust: φ must have shape [{config.layout.size}] for {config}, "
                             f"got {tuple(phi.shape)}")
        if isinstance(f, bool) or not isinstance(f, int) or f < 0:
            raise ValueError(f"trust: f must be an integer >= 0, got {f!r}")
        self.config, self.phi, self.f = config, phi, f

    def init(self, layout: ParamLayout, num_workers: int) -> TrustState:
        return TrustState(torch.zeros(layout.size), torch.tensor(False))

    def features(self, updates: torch.Tensor, ctx: RoundContext,
                 reference: torch.Tensor) -> torch.Tensor:
        """[n, 5] scale-free features of the rows (FEATURE_NAMES, some rescaled to ~±1)."""
        if ctx.trusted is None:
            raise ValueError("trust needs the server's trusted data: set trusted_samples > 0")
        probe = self.config.probe
        theta = ctx.params
        u = updates.to(theta.dtype)
        n = u.shape[0]
        losses = ctx.trusted.loss(torch.cat([theta[None], theta[None] - probe * u]))
        base, after = losses[0], losses[1:]
        rel = torch.nan_to_num((after - base) / (base.abs() + 1e-8),
                               nan=1e6, posinf=1e6, neginf=-1e6)
        change = torch.asinh(rel / (0.1 * probe))
        norms = _norms(u).clamp_min(1e-12)
        ref_norm = reference.norm().clamp_min(1e-12)
        cos_ref = (u @ reference) / (norms * ref_norm)
        log_ratio = (norms / ref_norm).log().clamp(-5.0, 5.0)
        rank = change.detach().argsort().argsort().to(u.dtype) / max(n - 1, 1)
        median = u.median(0).values
        cos_med = (u @ median) / (norms * _norms(median).clamp_min(1e-12))
        return torch.stack([change / 5, cos_ref, log_ratio / 5, rank, cos_med], 1)

    def uses_agreement(self, n: int) -> bool:
        """Whether the score has its peer-agreement term for n rows (μ > 0, 0 < 2f < n)."""
        return bool(self.config.peer_weight) and 0 < 2 * self.f < n

    @staticmethod
    def agreement(updates: torch.Tensor) -> torch.Tensor:
        """[n] each row's median cosine with the other rows (n²·d: one Gram matrix)."""
        u = updates
        norms = _norms(u).clamp_min(1e-12)
        cos = (u @ u.T) / (norms[:, None] * norms[None, :])
        own = torch.eye(len(u), dtype=torch.bool, device=u.device)
        return cos.masked_fill(own, float("nan")).nanmedian(1).values

    def score(self, feats: torch.Tensor, agreement: torch.Tensor | None = None) -> torch.Tensor:
        """[n] each row's score (the MLP, its skip, and μ·agreement where `uses_agreement`)."""
        p = self.config.layout.unflatten(self.phi.to(feats.dtype))
        score = torch.tanh(feats @ p["w1"] + p["b1"]) @ p["w2"] + feats @ p["skip"] + p["b2"]
        if self.uses_agreement(len(score)):
            if agreement is None:
                raise ValueError("trust: this rule's score needs the rows' peer agreement")
            score = score + self.config.peer_weight * agreement.to(score.dtype)
        return score

    def weights(self, feats: torch.Tensor, agreement: torch.Tensor | None = None) -> torch.Tensor:
        """[n] gates, normalised by max(Σ gates, e^ν); `agreement` (`agreement()` of the
        rows) is needed where `uses_agreement`."""
        p = self.config.layout.unflatten(self.phi.to(feats.dtype))
        score = self.score(feats, agreement)
        n, kappa = len(score), self.config.budget
        gates = torch.sigmoid(score)
        suspects = n if kappa is None or 2 * self.f >= n else min(n, math.ceil(kappa * self.f))
        if suspects < n:
            # only the ⌈κf⌉ worst-scored rows can lose weight: with no attack (f = 0) this
            # is the mean, and honest rows on skewed shards are not all dropped for their skew
            trusted = score.detach().argsort(descending=True)[: n - suspects]
            gates = gates.index_put((trusted,), torch.ones_like(trusted, dtype=gates.dtype))
        return gates / torch.maximum(gates.sum(), p["log_floor"].exp())

    def __call__(self, state: TrustState, updates: torch.Tensor,
                 ctx: RoundContext) -> tuple[torch.Tensor, TrustState]:
        if self.config.budget is not None and self.f == 0:
            # no Byzantine worker assumed: the mean, as Zeno or the trimmed mean are then
            return updates.mean(0), state
        with torch.no_grad():
            reference, state = momentum_reference(state, ctx)
        reference = reference.to(ctx.params.dtype)
        u = updates.to(ctx.params.dtype)
        agreement = self.agreement(u) if self.uses_agreement(len(u)) else None
        weights = self.weights(self.features(updates, ctx, reference), agreement)
        p = self.config.layout.unflatten(self.phi.to(ctx.params.dtype))
        clip = (p["log_clip"].exp() * reference.norm() / _norms(u).clamp_min(1e-12)).clamp(max=1)
        direction = (weights * clip) @ u
        share = self.reference_share(len(u))
        if share:
            direction = (1 - share) * direction + share * reference
        return direction.to(updates.dtype), state

    def reference_share(self, n: int) -> float:
        """The share of the server's own update in the direction for n rows (module doc)."""
        workers = self.config.reference_workers
        if workers is not None:
            return workers / (max(n - self.f, 0) + workers) if self.f else 0.0
        return self.config.reference_share if 2 * self.f >= n else 0.0

