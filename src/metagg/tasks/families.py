"""Task distributions for meta-training, and the held-out suite no meta-training sees.

    spec = FAMILIES["synthetic"].sample(seed=3)        # one TaskSpec, the same for seed 3
    specs = sample_tasks(["image-mlp", "lm"], 16, seed=0)   # alternating families
    cfg = spec.run_config(rounds=300, seed=1, aggregator="mean")   # a RunConfig to run it
    HELD_OUT                                           # judge learned aggregators here only

A `TaskSpec` is one inner problem: dataset (with input size and class subset), model,
K workers, H local steps, batch size, partition. A `TaskFamily` is the set of specs it can
draw, axis by axis; `family.contains(spec)` says whether a spec is in that set, which is
how a test proves that no held-out task can ever be drawn for meta-training. Learned
optimizers that generalise (Celo, Celo2) are meta-trained on many tasks and judged only on
tasks left out: the held-out suite differs from every family on at least one axis — a
dataset never trained on, an input size, an architecture (a CNN, a deeper transformer),
K = 16 or H = 8.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from metagg.config import RunConfig, config_from_dict
from metagg.config.meta import dataset_spec
from metagg.data import Dataset, load_dataset
from metagg.data.synthetic import parse_synthetic
from metagg.seeding import MetaStream, derive_seed

__all__ = ["FAMILIES", "HELD_OUT", "REFERENCE_TASK", "TaskFamily", "TaskSpec", "family_names",
           "sample_tasks"]

TEN_CLASS_IMAGES = ("digits", "fashion_mnist", "mnist", "cifar10")


@dataclass(frozen=True)
class TaskSpec:
    """One inner problem, everything needed to build it.

    `dataset` is a `load_dataset` name, with ``@SIZE`` for SIZE×SIZE images or ``text@T``
    for T-character sequences; `classes` keeps a subset of a 10-class dataset.
    """

    dataset: str
    model: str
    num_workers: int = 8  # K
    local_steps: int = 4  # H (local SGD)
    batch_size: int = 128  # per worker and local step
    partition: str = "iid"
    alpha: float = 0.5  # Dirichlet concentration, partition "dirichlet" only
    classes: tuple[int, ...] | None = None

    @property
    def name(self) -> str:
        """A short unique label, e.g. 'fashion_mnist@8{0,3,7}/mlp:32:relu/K8-H4-B128/iid'."""
        data = self.dataset
        if self.classes is not None:
            data += "{" + ",".join(map(str, self.classes)) + "}"
        split = self.partition + (f"{self.alpha:g}" if self.partition == "dirichlet" else "")
        return (f"{data}/{self.model}/K{self.num_workers}-H{self.local_steps}-"
                f"B{self.batch_size}/{split}")

    def data_options(self) -> dict[str, Any]:
        """The run config's `data` section for this task."""
        base, size = dataset_spec(self.dataset)
        out: dict[str, Any] = {"name": base, "partition": self.partition}
        if size is not None:
            out["seq_len" if base == "text" else "image_size"] = size
        if self.classes is not None:
            out["classes"] = list(self.classes)
        if self.partition == "dirichlet":
            out["alpha"] = self.alpha
        return out

    def load(self, data_dir: str | None = None) -> Dataset:
        """The task's dataset (class subset and size applied)."""
        d = self.data_options()
        extra = {k: d[k] for k in ("image_size", "seq_len", "classes") if k in d}
        return load_dataset(d["name"], data_dir=data_dir, **extra)

    def run_config(self, *, rounds: int, seed: int = 0, aggregator: str = "mean",
                   optimizer: dict[str, Any] | None = None, local_lr: float = 0.5,
                   mode: str = "local_sgd", data_dir: str | None = None,
                   **top: Any) -> RunConfig:
        """A `RunConfig` that trains this task (`top`: other top-level keys, e.g.
        eval_every). Gradient mode sends one gradient per round (H must then be 1)."""
        data = {**self.data_options(), "data_dir": data_dir}
        workers = {"num_workers": self.num_workers, "mode": mode,
                   "batch_size": self.batch_size, "local_lr": local_lr,
                   "local_steps": self.local_steps if mode == "local_sgd" else 1}
        return config_from_dict({
            "seed": seed, "rounds": rounds, "model": self.model, "data": data,
            "workers": workers, "aggregator": {"name": aggregator},
            "optimizer": optimizer or {"name": "sgd", "lr": 1.0}, **top})

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["classes"] = list(self.classes) if self.classes is not None else None
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TaskSpec:
        classes = d.get("classes")
        return cls(**{**d, "classes": tuple(classes) if classes is not None else None})


def _mlps(widths: Sequence[int], depths: Sequence[int],
          activations: Sequence[str]) -> tuple[str, ...]:
    return tuple(f"mlp:{','.join([str(w)] * depth)}:{act}"
                 for w in widths for depth in depths for act in activations)


@dataclass(frozen=True)
class TaskFamily:
    """The tasks one family draws: every axis an independent uniform choice.

    The dataset is one of `datasets`, or, when `synthetic_features` is set, a fresh
    synthetic teacher task ``synthetic:F:C:SEED`` (F and C from the two tuples, SEED
    drawn); with `class_subsets`, a 10-class dataset keeps a random subset of 2-10
    classes (10: all of them).
    """

    name: str
    about: str
    models: tuple[str, ...]
    datasets: tuple[str, ...] = ()
    synthetic_features: tuple[int, ...] = ()
    synthetic_classes: tuple[int, ...] = ()
    class_subsets: bool = False
    num_workers: tuple[int, ...] = (4, 8)
    local_steps: tuple[int, ...] = (1, 2, 4)
    batch_sizes: tuple[int, ...] = (32, 64, 128)
    partitions: tuple[str, ...] = ("iid",)
    alphas: tuple[float, ...] = (0.3, 1.0)

    def sample(self, seed: int) -> TaskSpec:
        """The family's task for `seed` (the same on every machine and run)."""
        rng = random.Random(derive_seed(seed, MetaStream.TASK_SAMPLE, 0))
        if self.synthetic_features:
            features = rng.choice(self.synthetic_features)
            classes = rng.choice(self.synthetic_classes)
            dataset = f"synthetic:{features}:{classes}:{rng.randrange(2**31)}"
        else:
            dataset = rng.choice(self.datasets)
        subset = None
        if self.class_subsets and dataset_spec(dataset)[0] in TEN_CLASS_IMAGES:
            k = rng.randint(2, 10)
            subset = tuple(sorted(rng.sample(range(10), k))) if k < 10 else None
        partition = rng.choice(self.partitions)
        return TaskSpec(
            dataset=dataset, model=rng.choice(self.models),
            num_workers=rng.choice(self.num_workers), local_steps=rng.choice(self.local_steps),
            batch_size=rng.choice(self.batch_sizes), partition=partition,
            alpha=rng.choice(self.alphas) if partition == "dirichlet" else 0.5,
            classes=subset)

    def contains(self, spec: TaskSpec) -> bool:
        """Whether `sample` can ever return `spec` (the seed of a synthetic dataset aside)."""
        base = dataset_spec(spec.dataset)[0]
        if base.startswith("synthetic"):
            features, classes, _ = parse_synthetic(base)
            data_ok = features in self.synthetic_features and classes in self.synthetic_classes
        else:
            data_ok = not self.synthetic_features and spec.dataset in self.datasets
        return (data_ok and spec.model in self.models
                and (spec.classes is None or self.class_subsets)
                and spec.num_workers in self.num_workers
                and spec.local_steps in self.local_steps
                and spec.batch_size in self.batch_sizes
                and spec.partition in self.partitions
                and (spec.partition != "dirichlet" or spec.alpha in self.alphas))

    def describe(self) -> dict[str, Any]:
        return asdict(self)


FAMILIES: dict[str, TaskFamily] = {f.name: f for f in (
    TaskFamily(
        "image-mlp", "Fashion-MNIST at 8x8 and 12x12, random class subsets, MLPs",
        datasets=("fashion_mnist@8", "fashion_mnist@12"), class_subsets=True,
        models=_mlps((16, 32, 64), (1, 2), ("relu", "tanh")),
        partitions=("iid", "dirichlet")),
    TaskFamily(
        "synthetic", "random-teacher classification, 8-64 features, 2-10 classes, MLPs",
        synthetic_features=(8, 16, 32, 64), synthetic_classes=(2, 4, 6, 8, 10),
        models=_mlps((16, 32, 64), (1, 2), ("relu", "tanh")),
        partitions=("iid", "dirichlet")),
    TaskFamily(
        "lm", "one-layer causal transformers on 16- and 24-character windows of the text",
        datasets=("text@16", "text@24"),
        models=("transformer:1:16:2", "transformer:1:24:3", "transformer:1:32:4"),
        batch_sizes=(16, 32)),
    TaskFamily(
        "image-mlp-wide", "Fashion-MNIST at 12x12 and 16x16, random class subsets, "
        "width-128 MLPs (the scale of models image-mlp lacks)",
        datasets=("fashion_mnist@12", "fashion_mnist@16"), class_subsets=True,
        models=_mlps((128,), (1, 2), ("relu", "tanh")),
        partitions=("iid", "dirichlet")),
)}

# The original LAgg-A / LOpt-A task (Joseph et al. 2025): in the image-mlp family.
REFERENCE_TASK = TaskSpec("fashion_mnist@8", "mlp:32:relu", 8, 4, 128)

# No family contains any of these (tests/test_task_families.py checks); each line says
# which axis no meta-training ever sees.
HELD_OUT: tuple[TaskSpec, ...] = (
    TaskSpec("digits", "mlp:20:sigmoid", 8, 4, 32),  # dataset; sigmoid (Ji et al.'s task)
    TaskSpec("fashion_mnist@28", "mlp:128,128:relu", 8, 4, 128),  # 784 inputs, width 128
    TaskSpec("fashion_mnist@16", "cnn:c10", 8, 4, 64),  # a CNN
    TaskSpec("wine", "mlp:32:tanh", 4, 4, 16),  # a 142-row table
    TaskSpec("breast_cancer", "mlp:16:relu", 16, 2, 16),  # K = 16
    TaskSpec("synthetic:128:5:2026", "mlp:32:relu", 8, 8, 64),  # 128 features; H = 8
    TaskSpec("text@32", "transformer:2:32:4", 8, 4, 16),  # a deeper LM on longer windows
)


def family_names(text: str | None) -> list[str]:
    """The families a comma-separated option names ("image-mlp, synthetic")."""
    return [f.strip() for f in (text or "").split(",") if f.strip()]


def sample_tasks(families: Sequence[str], count: int, seed: int) -> list[TaskSpec]:
    """`count` tasks, task i from family `families[i % len(families)]`, each a pure
    function of (seed, i)."""
    unknown = [f for f in families if f not in FAMILIES]
    if unknown or not families:
        raise ValueError(f"unknown task families {unknown}; choose from {sorted(FAMILIES)}")
    return [FAMILIES[families[i % len(families)]].sample(derive_seed(seed,
                                                                     MetaStream.TASK_SAMPLE, i))
            for i in range(count)]
