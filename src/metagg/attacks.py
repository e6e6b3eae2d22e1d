"""Byzantine behaviours.

An attack is omniscient: it sees every worker's honest update for the round
(Byzantine workers compute one too), which workers it controls, and the round
context, and returns the forged rows. Data-level attacks (label flip) are a
property of the workers instead and forge nothing here.

    attack = make_attack("alie", z=1.5)
    forged = attack.forge(honest, byzantine_ids, ctx, generator)   # [b, d]

White-box attacks also get the server's aggregator and its current state, by keyword:
`forge(..., defence=Defence(aggregator, state))`.

Definitions and defaults follow ../shared/specs/byzantine.md.
"""

from __future__ import annotations

import math
import statistics
from typing import Any, NamedTuple

import torch

from metagg.robust import pairwise_sq_distances

__all__ = ["ATTACKS", "Attack", "Defence", "make_attack"]


class Defence(NamedTuple):
    """What a white-box attack knows of the server: its aggregator and that one's state."""

    aggregator: Any  # a metagg.aggregators.base.Aggregator
    state: Any


class Attack:
    """Base class; subclasses override `forge`."""

    name = "none"
    #: Byzantine workers send nothing (the server sees them as missing).
    drops_workers = False
    #: Byzantine workers train on flipped labels; `forge` is not called.
    flips_labels = False

    def forge(
        self,
        honest: torch.Tensor,
        byzantine: torch.Tensor,
        ctx: Any,
        generator: torch.Generator,
        *,
        defence: Defence | None = None,
    ) -> torch.Tensor:
        """Return forged updates [b, d] for the workers in `byzantine` (int64 [b]).

        `honest` [M, d] holds every worker's honest update, Byzantine ones included;
        `ctx` is the round's `RoundContext`; `defence` the server's aggregator, given to
        every attack and used by the white-box ones.
        """
        return honest[byzantine]

    @staticmethod
    def honest_rows(honest: torch.Tensor, byzantine: torch.Tensor) -> torch.Tensor:
        keep = torch.ones(honest.shape[0], dtype=torch.bool, device=honest.device)
        keep[byzantine] = False
        return honest[keep]

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class SignFlip(Attack):
    """−scale · (the worker's own honest update)."""

    name = "sign_flip"

    def __init__(self, scale: float = 1.0):
        self.scale = scale

    def forge(self, honest, byzantine, ctx, generator, *, defence=None):
        return -self.scale * honest[byzantine]


class Gaussian(Attack):
    """N(0, σ² I) noise, σ = 200 (Blanchard et al. 2017)."""

    name = "gaussian"

    def __init__(self, sigma: float = 200.0):
        self.sigma = sigma

    def forge(self, honest, byzantine, ctx, generator, *, defence=None):
        shape = (len(byzantine), honest.shape[1])
        noise = torch.randn(shape, generator=generator, dtype=honest.dtype)
        return self.sigma * noise.to(honest.device)


class Zero(Attack):
    """All-zero updates."""

    name = "zero"

    def forge(self, honest, byzantine, ctx, generator, *, defence=None):
        return honest.new_zeros(len(byzantine), honest.shape[1])


class Crash(Attack):
    """Byzantine workers send nothing: the server sees them as missing."""

    name = "crash"
    drops_workers = True


class LabelFlip(Attack):
    """Byzantine workers compute honestly on labels y → C − 1 − y."""

    name = "label_flip"
    flips_labels = True


class ALIE(Attack):
    """"A little is enough" (Baruch et al. 2019): μ − z·σ per coordinate over honest rows.

    `z` is a number (default 1.5), or "auto" for the paper's
    z_max = Φ⁻¹((n − s)/n) with s = ⌊n/2 + 1⌋ − b, falling back to 1.5 where that
    is undefined (e.g. b = 7 of n = 10).
    """

    name = "alie"

    def __init__(self, z: float | str = 1.5):
        if not (z == "auto" or isinstance(z, int | float)):
            raise ValueError(f"alie: z must be a number or 'auto', got {z!r}")
        self.z = z

    def z_value(self, n: int, b: int) -> float:
        if self.z != "auto":
            return float(self.z)
        s = n // 2 + 1 - b
        p = (n - s) / n
        return statistics.NormalDist().inv_cdf(p) if 0 < p < 1 else 1.5

    def forge(self, honest, byzantine, ctx, generator, *, defence=None):
        good = self.honest_rows(honest, byzantine)
        mu = good.mean(0)
        sigma = good.std(0, unbiased=False) if len(good) > 1 else torch.zeros_like(mu)
        z = self.z_value(honest.shape[0], len(byzantine))
        return (mu - z * sigma).expand(len(byzantine), -1).clone()


class IPM(Attack):
    """Inner product manipulation (Xie et al. 2020): −ε · mean of honest rows."""

    name = "ipm"

    def __init__(self, eps: float = 0.1):
        self.eps = eps

    def forge(self, honest, byzantine, ctx, generator, *, defence=None):
        good = self.honest_rows(honest, byzantine)
        return (-self.eps * good.mean(0)).expand(len(byzantine), -1).clone()


class Mimic(Attack):
    """Every Byzantine worker copies one honest worker's update (the first honest one)."""

    name = "mimic"

    def forge(self, honest, byzantine, ctx, generator, *, defence=None):
        good = self.honest_rows(honest, byzantine)
        return good[:1].expand(len(byzantine), -1).clone()


class Adaptive(Attack):
    """An attack that knows the aggregator (white box).

    All Byzantine workers send −c · (mean of honest updates); c is chosen each round
    from `scales` to minimise ⟨step, μ⟩, where step is what the server's aggregator
    (run on a copy of its state) would output and μ the honest mean. Since the server
    does θ ← θ − step and μ estimates the gradient, this maximises the first-order
    increase of the loss. Needs `defence` (the simulator and the runtime give it).
    """

    name = "adaptive"

    def __init__(self, scales: tuple[float, ...] = (0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0)):
        if not scales or any(s <= 0 for s in scales):
            raise ValueError(f"adaptive: scales must be positive numbers, got {scales}")
        self.scales = tuple(float(s) for s in scales)

    def forge(self, honest, byzantine, ctx, generator, *, defence=None):
        if defence is None:
            raise ValueError("adaptive attack needs the server's aggregator (white-box access)")
        agg, state = defence
        mu = self.honest_rows(honest, byzantine).mean(0)
        best, best_score = None, float("inf")
        for c in self.scales:
            forged = (-c * mu).expand(len(byzantine), -1)
            candidate = honest.index_put((byzantine,), forged)
            try:
                with torch.no_grad():
                    step, _ = agg.step(state, candidate, ctx)
            except ValueError:
                continue  # e.g. a rule that refuses this input: try another scale
            score = float(step @ mu)
            if score < best_score:
                best, best_score = forged, score
        if best is None:
            best = (-mu).expand(len(byzantine), -1)
        return best.clone()


class WhiteBox(Adaptive):
    """Forged rows optimised by gradient through the server's aggregator (white box).

    The forged rows Z [b, d] start at −μ (IPM with ε = 1, μ the honest mean) and take
    `steps` Adam steps of size `lr` × the honest rows' RMS to minimise ⟨step(Z), μ/‖μ‖⟩,
    where step(Z) is what the server's aggregator, in its current state, would output on
    the round's rows with Z in the Byzantine slots: the server does θ ← θ − step, so
    this maximises the loss's first-order increase. Each Byzantine row is its own
    variable (LAgg-A sees every worker's channel).

    Needs an aggregator whose step autograd can differentiate in its inputs
    (`Aggregator.differentiable_step`: the rules' torch kernels, LAgg-A, LOpt-A, the
    RNN / ARNN); where it returns None (a kernel computed outside autograd) the attack
    runs `adaptive`'s search over scales instead. `last_method` says which ("gradient"
    or "search"). The best Z seen is sent.
    """

    name = "whitebox"

    def __init__(self, steps: int = 20, lr: float = 0.5,
                 scales: tuple[float, ...] = (0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0)):
        super().__init__(scales)
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"whitebox: steps must be an integer >= 1, got {steps!r}")
        if not lr > 0:
            raise ValueError(f"whitebox: lr must be > 0, got {lr!r}")
        self.steps, self.lr = steps, float(lr)
        self.last_method = ""

    def forge(self, honest, byzantine, ctx, generator, *, defence=None):
        if defence is None:
            raise ValueError("whitebox attack needs the server's aggregator (white-box access)")
        agg, state = defence
        good = self.honest_rows(honest, byzantine)
        mu = good.mean(0)
        direction = mu / mu.norm().clamp_min(1e-30)
        z = (-mu).expand(len(byzantine), -1).clone().requires_grad_(True)

        def score(rows: torch.Tensor) -> torch.Tensor | None:
            step = agg.differentiable_step(state, honest.index_put((byzantine,), rows), ctx)
            return None if step is None else step @ direction

        first = score(z)
        if first is None:
            self.last_method = "search"
            return super().forge(honest, byzantine, ctx, generator, defence=defence)
        self.last_method = "gradient"
        scale = float(good.square().mean().sqrt()) or 1.0
        opt = torch.optim.Adam([z], lr=self.lr * scale)
        best, best_score, current = z.detach().clone(), float(first.detach()), first
        for _ in range(self.steps):
            opt.zero_grad()
            current.backward()
            # a kink of the aggregator (sqrt at 0 in a spread feature) can give inf·0
            z.grad.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
            opt.step()
            current = score(z)
            if current is None:  # the rule left autograd here (e.g. a degenerate input)
                break
            value = float(current.detach())
            if value < best_score:  # a NaN never is
                best, best_score = z.detach().clone(), value
        return best


class MinMax(Attack):
    """Min-max (Shejwalkar & Houmansadr 2021): μ + γp, as far as the honest spread allows.

    Aggregator-agnostic: every Byzantine worker sends m = μ + γ·p, μ the honest mean and
    p a direction against it, with the largest γ for which m is no farther from any
    honest row than the two farthest honest rows are from each other: max_i ‖m − g_i‖ ≤
    max_ij ‖g_i − g_j‖.

    `direction`: "unit" (−μ/‖μ‖, the paper's code's default), "std" (−σ, the honest
    rows' per-coordinate std) or "sign" (−sign μ). The paper finds γ by a halving
    search; each constraint is a quadratic in γ, so here γ is their exact limit: the
    smallest of the per-row positive roots.
    """

    name = "min_max"

    def __init__(self, direction: str = "unit"):
        if direction not in DIRECTIONS:
            raise ValueError(f"{self.name}: direction must be one of {', '.join(DIRECTIONS)}, "
                             f"got {direction!r}")
        self.direction = direction

    def forge(self, honest, byzantine, ctx, generator, *, defence=None):
        good = self.honest_rows(honest, byzantine)
        mu, p = good.mean(0), perturbation(good, self.direction)
        gamma = self.gamma(good, mu, p)
        return (mu + gamma * p).expand(len(byzantine), -1).clone()

    @staticmethod
    def gamma(good: torch.Tensor, mu: torch.Tensor, p: torch.Tensor) -> float:
        """max γ ≥ 0 with ‖μ + γp − g_i‖² ≤ R² for every row i, R² = max_ij ‖g_i − g_j‖²:
        a γ² + b_i γ + c_i ≤ 0 with a = ‖p‖², b_i = 2⟨μ − g_i, p⟩, c_i = ‖μ − g_i‖² − R²
        ≤ 0 (the mean is within R of every row), so γ = min_i of the larger root."""
        a = float(p.double().square().sum())
        if len(good) < 2 or a == 0.0:
            return 0.0
        r2 = float(pairwise_sq_distances(good).max())
        diff = (mu - good).double()
        b = 2.0 * (diff @ p.double())
        c = diff.square().sum(1) - r2
        roots = (-b + (b.square() - 4.0 * a * c).clamp_min(0.0).sqrt()) / (2.0 * a)
        return max(float(roots.min()), 0.0)


class MinSum(MinMax):
    """Min-sum (Shejwalkar & Houmansadr 2021): μ + γp within the honest rows' summed spread.

    As `MinMax`, with the largest γ for which m's summed squared distance to the honest
    rows is no larger than any honest row's: Σ_i ‖m − g_i‖² ≤ max_i Σ_j ‖g_i − g_j‖². As
    Σ_i (μ − g_i) = 0 the left side is S₀ + n·γ²‖p‖²: γ = √((max_i Σ_j D_ij − S₀) /
    (n‖p‖²)).
    """

    name = "min_sum"

    @staticmethod
    def gamma(good: torch.Tensor, mu: torch.Tensor, p: torch.Tensor) -> float:
        a = float(p.double().square().sum())
        if len(good) < 2 or a == 0.0:
            return 0.0
        bound = float(pairwise_sq_distances(good).double().sum(1).max())
        s0 = float((mu - good).double().square().sum())
        return math.sqrt(max(bound - s0, 0.0) / (len(good) * a))


DIRECTIONS = ("unit", "std", "sign")


def perturbation(good: torch.Tensor, direction: str) -> torch.Tensor:
    """The optimisation attacks' direction p [d] against the honest rows `good` [n, d]."""
    mu = good.mean(0)
    if direction == "unit":
        norm = mu.norm()
        return -mu / norm if norm > 0 else torch.zeros_like(mu)
    if direction == "std":
        return -(good.std(0, unbiased=False) if len(good) > 1 else torch.zeros_like(mu))
    return -mu.sign()


_ATTACKS: dict[str, type[Attack]] = {
    cls.name: cls
    for cls in (Attack, SignFlip, Gaussian, Zero, Crash, LabelFlip, ALIE, IPM, Mimic, Adaptive,
                WhiteBox, MinMax, MinSum)
}
ATTACKS = tuple(_ATTACKS)


def make_attack(name: str, **options: Any) -> Attack:
    """Build an attack by name with keyword options (e.g. `make_attack("ipm", eps=100)`)."""
    if name not in _ATTACKS:
        raise ValueError(f"unknown attack {name!r}; allowed: {', '.join(ATTACKS)}")
    try:
        return _ATTACKS[name](**options)
    except TypeError as exc:
        raise ValueError(f"attack {name!r}: bad options {options} ({exc})") from None
