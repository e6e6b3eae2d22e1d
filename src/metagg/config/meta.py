"""Meta-training configurations and the learned architectures' choices.

    cfg = parse(MetaTrainConfig, {"iterations": 300, "attack": "ipm", "num_byzantine": 7})
    cfg = MetaTrainPESConfig(kind="lagg", steps=500)      # validated when built, too

- `MetaTrainConfig`: the RNN / ARNN aggregator by truncated BPTT (Ji et al. 2019) in
  gradient mode, optionally against an attack or a mixture of attacks.
- `MetaTrainPESConfig`: LAgg-A / LOpt-A by truncated PES (Joseph et al. 2025) in
  local-SGD mode.

Both describe a task by `dataset` ("NAME" or "NAME@SIZE": SIZE×SIZE area-downsampled
images, parsed once by `dataset_spec`) and a model spec, and the outer optimisation
(`metagg.learned.meta.loop` runs both). Defaults carry a comment saying where they come from.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from metagg.aggregators.prodigy import DEFAULT_COEF
from metagg.attacks import ATTACKS
from metagg.config.engine import ConfigError, Section, option, problem_of, to_dict
from metagg.config.run import seed_problem
from metagg.data import PARTITIONS

__all__ = [
    "CELLS",
    "KINDS",
    "OUTPUT_RULES",
    "RESIDUAL_BASES",
    "STEP_MODES",
    "MetaTrainConfig",
    "MetaTrainPESConfig",
    "MetaTrainTrustConfig",
    "dataset_spec",
]

# the RNN aggregator (metagg.learned.rnn)
CELLS = ("lstm", "gru")
OUTPUT_RULES = ("normalized", "paper", "prodigy")
# LOpt-A / LAgg-A (metagg.learned.lagg)
KINDS = ("lopt", "lagg")
STEP_MODES = ("reference", "residual", "general")
RESIDUAL_BASES = ("mean", "momentum", "prodigy")


def dataset_spec(text: str) -> tuple[str, int | None]:
    """'fashion_mnist@8' -> ('fashion_mnist', 8); 'digits' -> ('digits', None)."""
    base, at, size = text.partition("@")
    if not at:
        return text, None
    if not size.isdigit() or int(size) < 1:
        raise ConfigError(f"dataset {text!r}: expected NAME@SIZE with an integer SIZE >= 1")
    return base, int(size)


def _attack_problem(text: str) -> str | None:
    names = [a.strip() for a in text.split(",") if a.strip()] or ["none"]
    bad = [n for n in names if n not in ATTACKS]
    if bad:
        return f"unknown attack {bad[0]!r}; allowed: {', '.join(ATTACKS)} (or a mixture a,b,c)"
    return None


def _positive_ints(values: tuple[int, ...]) -> str | None:
    if not values or any(v < 1 for v in values):
        return f"must be integers >= 1, got {list(values)}"
    return None


@dataclass
class MetaTrainConfig(Section):
    """Meta-training the RNN / ARNN aggregator by truncated BPTT (saved as `trained_on`).

    Ji et al. 2019 §4.1-4.2 with L2L's recipe (Andrychowicz et al. 2016) where Ji is
    silent: fresh model init per meta-iteration, unroll T rounds truncated every K
    rounds, Adam on φ after every truncation, gradient-norm clipping.
    """

    dataset: str = option("digits", check=problem_of(dataset_spec))  # built in, no download
    data_dir: str | None = None
    model: str = "mlp:20:sigmoid"  # Ji §5.2's MNIST model
    num_workers: int = option(10, ge=1)  # M (Ji: 10)
    batch_size: int = option(32, ge=1)  # per worker
    partition: str = option("iid", choices=PARTITIONS)  # Ji: equal shards of the training set
    alpha: float = option(0.5, gt=0)  # Dirichlet concentration (partition dirichlet)
    # task families (`metagg tasks`, e.g. "image-mlp,synthetic") instead of one task: the
    # dataset, model, batch size and partition are drawn per task; M stays num_workers
    # (the RNN's input width); meta-iteration k meets training task k mod num_tasks
    tasks: str | None = None
    num_tasks: int = option(32, ge=1)  # training tasks drawn from the families
    validation_tasks: int = option(4, ge=1)  # further draws that validation scores φ on
    unroll: int = option(100, ge=1)  # T rounds per meta-iteration (L2L: 100)
    truncation: int = option(20, ge=1)  # K: BPTT truncation, an Adam step every K rounds (L2L)
    iterations: int = option(300, ge=1)  # meta-iterations (budgets in these, not minutes)
    # the round's meta-loss: "loss" (L2L: the sum of losses) or "log": log(loss + 1e-3·ln C),
    # each round and task counted by its relative progress; validation then scores the same
    meta_loss: str = option("loss", choices=("loss", "log"))
    lr: float = option(1e-3, gt=0)  # Adam on φ
    clip: float = option(1.0, gt=0)  # gradient-norm clipping of the meta-gradient
    seed: int = option(0, check=seed_problem)  # φ init, data partition, model-init streams
    cell: str = option("lstm", choices=CELLS)
    hidden: int = option(20, ge=1)  # Ji: 2 layers of 20
    layers: int = option(2, ge=1)
    # normalized (stronger than paper) | paper | prodigy (a correction on mean + Prodigy)
    output: str = option("normalized", choices=OUTPUT_RULES)
    prodigy_coef: float = option(DEFAULT_COEF, gt=0)  # output prodigy: Prodigy's d_coef
    arnn: bool = False  # feed trusted-sample loss features (Ji §4.3)
    p: float = option(10.0, gt=0)  # clamp / log-norm floor e^{-p} (L2L: 10)
    scale: float = option(0.1, gt=0)  # output scale (L2L: 0.1)
    clamp_sign: bool = True  # keep the sign of clamped entries (Ji writes +e^{-p})
    probe_lr: float = option(1.0, gt=0)  # ARNN probe step θ − probe_lr·g_m
    trusted_samples: int = option(100, ge=0)  # server's trusted sample (as RunConfig's)
    # Byzantine training: an attack from metagg.attacks.ATTACKS, or a mixture
    # "ipm,sign_flip,none" (meta-iteration k meets the (k mod n)-th; validation scores
    # the mean over all); with a mixture attack_options maps name -> options
    attack: str = option("none", check=_attack_problem)
    num_byzantine: int = option(0, ge=0)  # workers 0..b-1 are Byzantine
    attack_options: dict[str, Any] = option(factory=dict)
    validate_every: int = option(20, ge=1)  # meta-iterations between validations
    validation_seeds: int = option(3, ge=1)  # held-out model inits per validation
    long_horizon: int = option(4, ge=0)  # also validate at long_horizon·T rounds (<= 1: off)
    patience: int = option(10, ge=0)  # validations without improvement before stopping (0: never)
    out_dir: str | None = None  # where the best aggregator is written

    def problems(self) -> list[str]:
        errors = []
        if not self.num_byzantine < self.num_workers:
            errors.append(f"num_byzantine: must be in [0, num_workers={self.num_workers}), "
                          f"got {self.num_byzantine}")
        if self.attack != "none" and self.num_byzantine == 0:
            errors.append(f"num_byzantine: attack {self.attack!r} needs num_byzantine >= 1")
        names = self.attack_names()
        if len(names) > 1 and set(self.attack_options) - set(names):
            errors.append(f"attack_options: with an attack mixture, it maps attack name -> "
                          f"options; {sorted(set(self.attack_options) - set(names))} not in "
                          f"{names}")
        if self.arnn and self.trusted_samples < 1:
            errors.append("trusted_samples: arnn needs trusted_samples >= 1")
        if self.tasks is not None and len(names) > 1:
            errors.append("tasks: meta-training on task families takes one attack (or none), "
                          f"not the mixture {names}")
        return errors

    def attack_names(self) -> list[str]:
        return [a.strip() for a in self.attack.split(",") if a.strip()] or ["none"]

    def attack_settings(self) -> list[tuple[str, dict[str, Any], int]]:
        """(attack, options, num_byzantine) of each attack of the mixture (one without)."""
        names = self.attack_names()
        if len(names) == 1:
            return [(names[0], dict(self.attack_options), self.num_byzantine)]
        return [(n, dict(self.attack_options.get(n, {})),
                 0 if n == "none" else self.num_byzantine) for n in names]

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)


@dataclass
class MetaTrainPESConfig(Section):
    """Meta-training LAgg-A / LOpt-A by truncated PES (saved as the aggregator's `trained_on`).

    Defaults are the spec's recipe on its small task (8×8 Fashion-MNIST, MLP 64-32-10 ReLU,
    K = 8, H = 4, local lr 0.5, B = 128; 50-round truncations, σ = 0.01, 8 pairs, inner
    runs of 100-1000 rounds, AdamW 3e-3 → 1e-3 with 100 warm-up steps, 5 000 steps).

    `step_mode` defaults to "residual" (momentum base at the tuned SlowMo): measured on
    that task, K = 8, H = 4, after 50 outer steps the reference parameterisation still had
    validation loss 2.300 at round 300 (2.305 untrained), while the residual one starts at
    SlowMo's 0.431 and only has to improve on it. "reference" stays for the faithful variant.
    """

    kind: str = option("lagg", choices=KINDS)  # lagg (LAgg-A, fixed K) | lopt (LOpt-A)
    # NAME[@SIZE]: SIZE×SIZE area-downsampled images
    dataset: str = option("fashion_mnist@8", check=problem_of(dataset_spec))
    data_dir: str | None = None
    model: str = "mlp:32:relu"
    num_workers: int = option(8, ge=1)  # K
    local_steps: int = option(4, ge=1)  # H
    local_lr: float = option(0.5, gt=0)
    batch_size: int = option(128, ge=1)  # per worker and local step
    partition: str = option("iid", choices=PARTITIONS)
    # the learned optimizer (metagg.learned.lagg.LAggConfig)
    step_mode: str = option("residual", choices=STEP_MODES)  # reference | residual
    # mean | momentum (SlowMo) | prodigy (general mode: server Prodigy, no step size to learn)
    residual_base: str = option("momentum", choices=RESIDUAL_BASES)
    residual_scale: float = option(0.6, gt=0)  # initial α: 0.6 with momentum = tuned SlowMo
    correction_scale: float = option(1.0, ge=0)
    hidden: int = option(32, ge=1)
    # general mode: the aggregator sets the workers' local lr (starting at local_lr)
    learned_local_lr: bool = False
    local_lr_gain: float = 0.0  # the lr controller's initial gain on cos(ḡ, m)
    local_lr_range: float = option(0.0, ge=0)  # k > 1: the lr stays in [lr / k, lr · k]
    # general mode: > 0 caps the correction per tensor at this multiple of the base step
    correction_cap: float = option(0.0, ge=0)
    # task augmentation: each inner run's workers' lr (= their gradients' scale) times a
    # factor log-uniform in [1/lr_augment, lr_augment]; 1 = none
    lr_augment: float = option(1.0, ge=1)
    # meta-train only these entries of φ (comma-separated names, e.g. "schedule,lr_control");
    # None: all. Fewer perturbed dimensions, a less noisy PES estimate.
    trainable: str | None = option(None, check=lambda v: None if v and v.strip() else
                                   "name at least one entry of φ")
    # PES
    unroll: int = option(50, ge=1)  # rounds per truncation
    sigma: float = option(0.01, gt=0)
    pairs: int = option(8, ge=1)  # antithetic pairs (2·pairs perturbed inner runs)
    min_inner: int = option(100, ge=1)  # inner run length, log-uniform in [min, max] rounds
    max_inner: int = option(1000, ge=1)
    loss_clip: float = option(1.5, gt=0)  # per-round loss clipped to [0, loss_clip · ln C]
    # the per-round meta-loss: "loss" (the clipped loss, the spec's) or "log",
    # log((loss + 1e-3·ln C) / ln C): relative progress counts the same on every task
    meta_loss: str = option("loss", choices=("loss", "log"))
    # outer optimizer: AdamW, linear warm-up to lr, cosine decay to final_lr
    steps: int = option(5000, ge=1)
    lr: float = option(3e-3, gt=0)
    final_lr: float = option(1e-3, ge=0)
    warmup: int = option(100, ge=0)
    weight_decay: float = option(1e-4, ge=0)
    beta1: float = option(0.9, ge=0, lt=1)
    beta2: float = option(0.999, ge=0, lt=1)
    adam_eps: float = option(1e-8, gt=0)
    # clip the PES gradient estimate to this global L2 norm before AdamW (0 = off): a
    # LAgg-A run blew up after 1 850 steps when the estimate's norm grew from ~10 to ~200
    max_grad_norm: float = option(0.0, ge=0)
    seed: int = option(0, check=seed_problem)  # φ init, partition, inner problems, noise
    # start φ from a saved aggregator of the same architecture (a directory or
    # pretrained/NAME) instead of the seed's initialisation, e.g. to continue training
    # shipped weights with other settings; None = a fresh φ
    init_from: str | None = option(None, check=lambda v: None if v else "must be a path")
    # validation / bookkeeping
    validate_every: int = option(50, ge=1)  # a validation costs about 6 outer steps
    validation_seeds: int = option(5, ge=1)
    validation_rounds: tuple[int, ...] = option((300, 1000), check=_positive_ints)
    checkpoint_every: int = option(10, ge=1)
    # Multi-task meta-training (metagg.tasks.families): comma-separated task families,
    # e.g. "image-mlp,synthetic"; then each group of pairs trains on a task drawn from
    # them (dataset, model, K, H, B, partition are the task's; the fields above are
    # ignored) and validation runs on `validation_tasks` other draws. None: one task.
    tasks: str | None = option(None, check=lambda v: None if v and v.strip() else
                               "must name task families, e.g. image-mlp,synthetic")
    task_groups: int = option(4, ge=1)  # tasks trained at once; pairs are split among them
    validation_tasks: int = option(6, ge=1)
    alpha: float = option(0.5, gt=0)  # Dirichlet concentration (one-task partition=dirichlet)

    def problems(self) -> list[str]:
        if self.tasks is not None:
            if self.step_mode != "general":
                return ["step_mode: multi-task meta-training needs step_mode general (one φ "
                        "for every model size and K)"]
            if self.pairs % self.task_groups:
                return [f"pairs: must be a multiple of task_groups ({self.task_groups}), "
                        f"got {self.pairs}"]
        if self.max_inner < self.min_inner:
            return [f"max_inner: must be >= min_inner ({self.min_inner}), got {self.max_inner}"]
        if self.trainable is not None and self.weight_decay != 0:
            return ["trainable: set weight_decay=0 (decay would move the frozen entries of φ)"]
        if self.learned_local_lr and self.step_mode != "general":
            return ["learned_local_lr: only step_mode general sets the workers' local lr"]
        if self.kind == "lagg" and self.num_workers < 1:
            return ["num_workers: LAgg-A needs num_workers >= 1"]
        object.__setattr__(self, "validation_rounds", tuple(sorted(set(self.validation_rounds))))
        return []

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)


# the attack mixture of the shipped trust rule's last meta-training stage: every attack of
# metagg.attacks at 3/10 and 7/10, no attack twice, and twice the ones that broke the
# first stage (the white-box attacker, ALIE at 7/10)
TRUST_SETTINGS = ("none:0,none:0,whitebox:3,whitebox:3,whitebox:7,whitebox:7,min_sum:3,"
                  "min_sum:7,sign_flip:3,sign_flip:7,gaussian:3,gaussian:7,alie:3,alie:7,"
                  "alie:7,ipm:3,ipm:7,min_max:3,min_max:7,label_flip:7,mimic:7")


def parse_settings(text: str) -> list[tuple[str, int]]:
    """'none:0,ipm:7' -> [('none', 0), ('ipm', 7)] (ValueError with the reason)."""
    out = []
    for item in (t.strip() for t in text.split(",")):
        name, _, count = item.partition(":")
        if name not in ATTACKS or not count.isdigit():
            raise ValueError(f"expected ATTACK:COUNT items (attacks: {', '.join(ATTACKS)}), "
                             f"got {item!r}")
        if (name == "none") != (int(count) == 0):
            raise ValueError(f"{item!r}: 'none' goes with 0 Byzantine workers, an attack "
                             f"with at least 1")
        out.append((name, int(count)))
    return out


@dataclass
class MetaTrainTrustConfig(Section):
    """Meta-training the learned trust rule (`metagg.learned.trust`) by antithetic ES.

    Each outer step runs `pairs` antithetic pairs; a pair draws one setting of the
    mixture (attack and Byzantine count), worker momentum 0.9 with `momentum_prob`, a
    Dirichlet partition with `dirichlet_prob`, and a model seed, and runs the simulator
    for `rounds` rounds at φ ± σε; the meta-loss is log(final training loss). The
    `whitebox` attack optimises its rows through the current rule each round, so the
    defence meets an attacker adapted to it. Defaults are the recipe of the shipped rule's
    last training stage (`trust:pretrained/robust`; its JSON records the stages before
    it); the shipped rule then got `budget: 2` without retraining. `budget` stays None by
    default so that runs saved before it existed resume as they were trained.
    """

    # NAME or NAME,NAME...: each pair of runs draws one; validation runs every one
    dataset: str = option("digits", check=problem_of(lambda v: [dataset_spec(d.strip())
                                                                for d in v.split(",")]))
    data_dir: str | None = None
    model: str = "mlp:20:sigmoid"
    num_workers: int = option(10, ge=2)
    batch_size: int = option(32, ge=1)
    server_lr: float = option(1.0, gt=0)  # the SGD step after the rule (digits.yaml's)
    trusted_samples: int = option(100, ge=1)
    rounds: int = option(100, ge=1)  # per inner run
    settings: str = option(TRUST_SETTINGS, check=problem_of(parse_settings))
    # per attack name: sign flip ×4 as in the robustness benchmark; the white-box attacker
    # takes 10 Adam steps per round instead of 20 (2× cheaper; it is most of a step's time)
    attack_options: dict[str, Any] = option(factory=lambda: {"sign_flip": {"scale": 4},
                                                             "whitebox": {"steps": 10}})
    momentum_prob: float = option(0.3, ge=0, le=1)  # worker momentum 0.9 in this share
    dirichlet_prob: float = option(0.2, ge=0, le=1)  # Dirichlet (α 0.5) partitions
    hidden: int = option(8, ge=1)
    probe: float = option(0.1, gt=0)
    budget: float | None = option(None)  # TrustConfig.budget κ: gate only the ⌈κf⌉ worst rows
    # TrustConfig.reference_share λ: the server's own update's share when 2f ≥ n
    reference_share: float = option(0.0, ge=0, le=1)
    # TrustConfig.reference_workers a (instead of λ): r counts as a workers' rows when f > 0
    reference_workers: float | None = option(None, gt=0)
    # TrustConfig.peer_weight μ: the score's peer-agreement term when 0 < 2f < n
    peer_weight: float = option(0.0, ge=0)
    pairs: int = option(6, ge=1)
    sigma: float = option(0.1, gt=0)
    loss_cap: float = option(10.0, gt=0)  # a diverged run counts as this loss
    steps: int = option(300, ge=1)
    lr: float = option(0.03, gt=0)  # Adam, constant
    seed: int = option(0, check=seed_problem)
    init_from: str | None = option(None, check=lambda v: None if v else "must be a path")
    validate_every: int = option(25, ge=1)
    validation_seeds: int = option(1, ge=1)
    # also validate every setting on Dirichlet shards (twice the validation runs): where
    # the rule's gates and the server's share matter most; off in the shipped stages
    validate_dirichlet: bool = False
    checkpoint_every: int = option(5, ge=1)

    def datasets(self) -> list[str]:
        return [d.strip() for d in self.dataset.split(",") if d.strip()]

    def problems(self) -> list[str]:
        if not self.datasets():
            return ["dataset: name at least one dataset"]
        too_many = [f"{a}:{b}" for a, b in parse_settings(self.settings)
                    if b >= self.num_workers]
        if too_many:
            return [f"settings: {too_many} need fewer Byzantine than num_workers "
                    f"({self.num_workers})"]
        if self.reference_share and self.reference_workers is not None:
            return ["reference_share, reference_workers: set one of them, not both"]
        return []

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)
