"""Ji et al. 2019's reproduction: what runs at each scale, the tasks, attacks and claims."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["CSV_COLUMNS", "FIGURES", "SCALES", "Scale", "TaskSpec"]

FIGURES = ("4", "5", "6", "7")
CSV_COLUMNS = ("figure", "panel", "task", "setting", "aggregator", "lr", "seed", "round",
               "train_loss", "test_accuracy")
TUNING_COLUMNS = ("figure", "task", "optimizer", "lr", "seed", "rounds", "final_train_loss")

RNN = "rnn:pretrained/digits-mlp20-lstm"
ARNN = "arnn:pretrained/digits-mlp20-arnn-lstm"
HETERO_RNN = "digits-hetero4x3-mlp20-lstm"  # zoo name looked for by figure 7
EVAL_SEED0, TUNE_SEED0 = 100, 200


@dataclass(frozen=True)
class Scale:
    """How much of everything to run.

    Attributes:
        seeds: evaluation seeds per curve; tune_seeds: seeds per grid point.
        rounds: rounds per dataset ("digits", "fashion_mnist") in figures 4, 5, 7.
        points: evaluations per run (plus round 0).
        sgd_lrs, adam_lrs: the grids the averaging baselines are tuned on.
        byz_rounds, byz_settings: figure 6's run length and attack settings.
        eval_train_samples: cap on the train examples behind "train loss".
        meta_iterations, meta_unroll: meta-training budget with --meta-train.
    """

    name: str
    seeds: int
    tune_seeds: int
    rounds: dict[str, int]
    points: int
    sgd_lrs: tuple[float, ...]
    adam_lrs: tuple[float, ...]
    byz_rounds: int
    byz_settings: tuple[str, ...]
    eval_train_samples: int
    meta_iterations: int
    meta_unroll: int


ALL_BYZ = ("none", "ipm 3/10", "ipm 7/10", "alie 3/10", "alie 7/10", "sign_flip 3/10",
           "sign_flip 7/10", "gaussian 3/10", "gaussian 7/10")

SCALES: dict[str, Scale] = {
    # tiny: for the tests only (seconds); hidden from the command line's help.
    "tiny": Scale("tiny", seeds=1, tune_seeds=1, rounds={"digits": 4, "fashion_mnist": 4},
                  points=2, sgd_lrs=(1.0,), adam_lrs=(0.1,), byz_rounds=4,
                  byz_settings=("none", "ipm 7/10"), eval_train_samples=500,
                  meta_iterations=1, meta_unroll=4),
    "quick": Scale("quick", seeds=2, tune_seeds=1, rounds={"digits": 150, "fashion_mnist": 200},
                   points=10, sgd_lrs=(0.5, 1.0, 2.0, 4.0, 8.0),
                   adam_lrs=(0.003, 0.01, 0.03, 0.1, 0.3),
                   byz_rounds=100, byz_settings=ALL_BYZ, eval_train_samples=5000,
                   meta_iterations=40, meta_unroll=100),
    "full": Scale("full", seeds=5, tune_seeds=2, rounds={"digits": 400, "fashion_mnist": 1000},
                  points=20, sgd_lrs=(0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0),
                  adam_lrs=(0.003, 0.01, 0.03, 0.1, 0.3, 1.0), byz_rounds=300, byz_settings=ALL_BYZ,
                  eval_train_samples=10000, meta_iterations=300, meta_unroll=100),
}


@dataclass(frozen=True)
class TaskSpec:
    """One training task: a dataset (optionally a class subset) and the workers' model."""

    label: str
    dataset: str
    model: str
    classes: tuple[int, ...] | None = None


FIG4_TASKS = (TaskSpec("digits, mlp:20:sigmoid", "digits", "mlp:20:sigmoid"),
              TaskSpec("fashion_mnist, mlp:20:sigmoid", "fashion_mnist", "mlp:20:sigmoid"))
FIG5_LEFT = tuple(TaskSpec(f"digits, {m}", "digits", m)
                  for m in ("mlp:40:sigmoid", "mlp:20,20:sigmoid", "mlp:20:relu"))
FIG5_RIGHT = (TaskSpec("fashion_mnist-2 (classes 0-1)", "fashion_mnist", "mlp:20:sigmoid",
                       (0, 1)),
              TaskSpec("fashion_mnist-5 (classes 0-4)", "fashion_mnist", "mlp:20:sigmoid",
                       (0, 1, 2, 3, 4)))

# Figure 6: label -> (attack, Byzantine count, options), as in the README's ARNN table.
BYZ_ATTACKS: dict[str, tuple[str, int, dict[str, float]]] = {
    "none": ("none", 0, {}),
    "ipm 3/10": ("ipm", 3, {"eps": 0.1}), "ipm 7/10": ("ipm", 7, {"eps": 0.1}),
    "alie 3/10": ("alie", 3, {"z": 1.5}), "alie 7/10": ("alie", 7, {"z": 1.5}),
    "sign_flip 3/10": ("sign_flip", 3, {"scale": 4.0}),
    "sign_flip 7/10": ("sign_flip", 7, {"scale": 4.0}),
    "gaussian 3/10": ("gaussian", 3, {"sigma": 200.0}),
    "gaussian 7/10": ("gaussian", 7, {"sigma": 200.0}),
}
BYZ_AGGREGATORS = {"mean": "mean", "median": "median", "krum": "krum", "zeno": "zeno",
                   "fltrust": "fltrust", "rnn": RNN, "arnn": ARNN,
                   "arnn-ipm7": "arnn:pretrained/digits-mlp20-arnn-lstm-ipm7",
                   "arnn-signflip7": "arnn:pretrained/digits-mlp20-arnn-lstm-signflip7",
                   "arnn-alie7": "arnn:pretrained/digits-mlp20-arnn-lstm-alie7"}
# the ARNN meta-trained against each attack (figure 6's "ARNN vs Krum" comparison)
MATCHED_ARNN = {"ipm": "arnn-ipm7", "sign_flip": "arnn-signflip7", "alie": "arnn-alie7"}

PAPER_CLAIMS = {
    "4": "“Both the RNN aggregators and ARNN aggregators outperform the current "
         "state-of-the-art averaging aggregator, and ARNN aggregators are more efficient "
         "than the RNN aggregators”; LSTM and GRU perform alike (§5.2; MNIST MLP 1×20 "
         "sigmoid, CIFAR-10 CNN).",
    "5": "Left: “The RNN aggregator still outperforms the averaging aggregator in (1) "
         "[40 units] and (2) [2 hidden], and has competitive performance in (3) [ReLU]”. "
         "Right: it “works well on transferring among the disjoint subset of the data” "
         "(CIFAR-2, CIFAR-5) and “can compete with classic averaging” (§5.3).",
    "6": "“The averaging aggregator is unable to tolerate any Byzantine attack”; with 3/10 "
         "Byzantine “the RNN aggregator and ARNN aggregator have slightly better performance "
         "than the Krum aggregator”; at 7/10 “the Krum aggregator and RNN aggregator cannot "
         "resist the attackers” while “the ARNN aggregator still works well and outperforms "
         "the Krum by 43.14%” (§5.4; the attack is not named).",
    "7": "“The RNN aggregator can efficiently utilize gradients from different local models "
         "to improve the global learning model's performance” (§5.5; 4 systems, 3 workers "
         "each, one RNN updating an MLP20-sigmoid).",
}

STAND_IN_ROWS = [
    ("MNIST, MLP 784-20-10 sigmoid (figures 4, 5 left, 6, 7)",
     "digits (scikit-learn's 8×8 digits, MLP 64-20-10 sigmoid): the task the shipped "
     "aggregators were meta-trained on; figure 4 adds Fashion-MNIST (28×28, MLP 784-20-10)"),
    ("CIFAR-10, 2 conv + max-pool + FC (figure 4)",
     "not run (no CIFAR-10 here; a conv net on Fashion-MNIST is hours of CPU): figure 4 uses "
     "digits and Fashion-MNIST with the MLP"),
    ("CIFAR-2 / CIFAR-5 (figure 5 right)",
     "Fashion-MNIST classes 0-1 / 0-4, MLP 784-20-{2,5} sigmoid (a dataset the digits RNN "
     "never saw)"),
    ("10 workers, equal shards (all figures)",
     "10 workers, IID equal shards, batch 32, gradient mode (figure 7: 12 workers, 3 per model)"),
]
