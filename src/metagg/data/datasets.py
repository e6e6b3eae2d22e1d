"""``Dataset`` and ``load_dataset``: every dataset as float32 tensors with int64 labels.

    >>> ds = load_dataset("digits")                      # built in, no files needed
    >>> ds.x_train.shape, ds.num_classes
    (torch.Size([1437, 1, 8, 8]), 10)
    >>> fm8 = load_dataset("fashion_mnist", image_size=8)  # the 8x8 Fashion-MNIST of LAgg-A
    >>> c2 = load_dataset("cifar10", classes=[0, 1], data_dir="data")  # CIFAR-2

Images are ``[N, C, H, W]`` in [0, 1] (not standardised: models may do that);
flat features ``[N, F]``. Labels are contiguous ``0..num_classes-1``. Text (``"text"``,
`metagg.data.text`) is token data: inputs int64 ``[N, T]`` and targets ``[N, T]``, the
inputs shifted by one token (next-character prediction).
"""

from __future__ import annotations

import operator
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from metagg.data import sources
from metagg.data.synthetic import SYNTHETIC_HELP, parse_synthetic, synthetic_arrays
from metagg.data.text import text_splits

__all__ = ["DATASETS", "Dataset", "load_dataset", "normalize_name"]

DATASETS: tuple[str, ...] = ("digits", "fashion_mnist", "mnist", "cifar10", "npz", "text",
                             *sources.TABULAR, "synthetic")
_ALIASES = {"fmnist": "fashion_mnist", "fashionmnist": "fashion_mnist", "cifar_10": "cifar10"}
_NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")
# fixed class counts (a class subset's labels must not shrink them); others: largest label + 1
_NUM_CLASSES = {"digits": 10, "fashion_mnist": 10, "mnist": 10, "cifar10": 10}


@dataclass(frozen=True, eq=False, repr=False)
class Dataset:
    """A classification (or next-token) dataset held in memory.

    Attributes:
        name: the canonical dataset name (plus ``[classes]`` / ``@size`` when derived).
        x_train: float32 ``[N, C, H, W]`` images (C=1 for grayscale) or ``[N, F]``
            features; or int64 ``[N, T]`` token ids (then ``tokens`` is True).
        y_train: int64 ``[N]`` labels in ``0..num_classes-1`` (tokens: ``[N, T]``).
        x_test: the same dtype and trailing shape as ``x_train``.
        y_test: int64 labels.
        num_classes: number of classes (tokens: the vocabulary size).
    """

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int

    def __post_init__(self) -> None:
        for key in ("x_train", "y_train", "x_test", "y_test"):
            value = getattr(self, key)
            if isinstance(value, np.ndarray):  # frozen: set through object
                object.__setattr__(self, key, torch.from_numpy(value))
            elif not isinstance(value, torch.Tensor):
                raise ValueError(f"Dataset {self.name!r}: {key} must be a torch.Tensor or numpy "
                                 f"array, got {type(value).__name__}")
        classes = self.num_classes
        if not isinstance(classes, int | np.integer) or isinstance(classes, bool) or classes < 1:
            raise ValueError(f"Dataset {self.name!r}: num_classes must be an int >= 1, "
                             f"got {classes!r}")
        for split in ("train", "test"):
            x, y = getattr(self, f"x_{split}"), getattr(self, f"y_{split}")
            tokens = x.dtype == torch.int64 and y.shape == x.shape and x.ndim == 2
            if not tokens and (x.dtype != torch.float32 or y.dtype != torch.int64
                               or y.ndim != 1):
                raise ValueError(
                    f"Dataset {self.name!r}: x_{split} must be float32 and y_{split} int64 [N] "
                    f"(or both int64 [N, T] tokens), got {x.dtype} {tuple(x.shape)} and "
                    f"{y.dtype} {tuple(y.shape)}"
                )
            if x.ndim < 2 or len(x) != len(y):
                raise ValueError(
                    f"Dataset {self.name!r}: x_{split} {tuple(x.shape)} and y_{split} "
                    f"{tuple(y.shape)} must share their first dimension (x at least 2-D)"
                )
            if len(y) == 0:
                # an empty test split would report accuracy 0 and loss 0 as if measured
                raise ValueError(f"Dataset {self.name!r}: no {split} examples; need at least one")
            if not tokens:
                # checked after the cast: float64 inputs near 1e200 overflow float32 to inf
                bad = int((~torch.isfinite(x)).sum())
                if bad:
                    raise ValueError(
                        f"Dataset {self.name!r}: x_{split} has {bad} value(s) that are NaN, "
                        "infinite or beyond float32's range (about 3.4e38); inputs must be "
                        "finite float32 numbers")
            low, high = int(y.min()), int(y.max())
            if low < 0 or high >= classes:
                what = "token ids" if tokens else "labels"
                raise ValueError(
                    f"Dataset {self.name!r}: y_{split} {what} must be in 0..{classes - 1} "
                    f"(num_classes={classes}), got {low}..{high}")
        if self.x_train.shape[1:] != self.x_test.shape[1:]:
            raise ValueError(
                f"Dataset {self.name!r}: train inputs {tuple(self.x_train.shape[1:])} and test "
                f"inputs {tuple(self.x_test.shape[1:])} differ"
            )

    @property
    def tokens(self) -> bool:
        """Whether this is token data (inputs int64 [N, T], next-token targets [N, T])."""
        return self.x_train.dtype == torch.int64

    @property
    def input_shape(self) -> tuple[int, ...]:
        """The shape of one input, ``x_train.shape[1:]``."""
        return tuple(self.x_train.shape[1:])

    def __repr__(self) -> str:  # the default would print every tensor
        return (
            f"Dataset(name={self.name!r}, train={len(self.y_train)}, test={len(self.y_test)}, "
            f"input_shape={self.input_shape}, num_classes={self.num_classes})"
        )


def normalize_name(name: str) -> str:
    """Canonical dataset name: lower-case, ``-`` → ``_``, aliases resolved (``fmnist``)."""
    key = name.strip().lower().replace("-", "_")
    key = _ALIASES.get(key, key)
    if key.startswith("synthetic"):
        features, classes, seed = parse_synthetic(key)
        return f"synthetic:{features}:{classes}:{seed}"
    if key not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {DATASETS} (synthetic as "
                         f"{SYNTHETIC_HELP})")
    return key


def _to_float(x: np.ndarray) -> torch.Tensor:
    """float32 tensor; uint8 pixels scaled to [0, 1] (a fresh copy, never a view)."""
    if x.dtype == np.uint8:
        return torch.from_numpy(x.astype(np.float32)).div_(255.0)
    with np.errstate(over="ignore"):  # overflow to inf is reported by Dataset, by name
        return torch.from_numpy(np.array(x, dtype=np.float32))


def _as_labels(y: np.ndarray, where: str) -> np.ndarray:
    """1-D int64 labels ≥ 0; accepts integer or integral-valued float arrays, [N] or [N, 1]."""
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise ValueError(f"{where}: labels must be 1-D [N], got shape {y.shape}")
    if np.issubdtype(y.dtype, np.floating):
        if not (np.all(np.isfinite(y)) and np.all(y == np.round(y))):
            raise ValueError(f"{where}: labels must be integers, got non-integral {y.dtype} values")
    elif not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"{where}: labels must be integers, got dtype {y.dtype}")
    if len(y) and y.min() < 0:
        raise ValueError(f"{where}: labels must be >= 0, got min {y.min()}")
    return y.astype(np.int64)


def _inferred_classes(name: str, labels: np.ndarray) -> int:
    """Largest label + 1, with a warning when labels below it never occur."""
    count = int(labels.max()) + 1
    unused = count - len(np.unique(labels))
    if unused:
        warnings.warn(
            f"dataset {name!r}: {count} classes inferred from the largest label "
            f"{count - 1}, but {unused} of the labels 0..{count - 1} never occur; set "
            "data.num_classes (load_dataset(num_classes=...)) or relabel if that is not "
            "what you meant", stacklevel=3)
    return count


def _load_npz(path: str | Path | None) -> tuple[np.ndarray, ...]:
    if path is None:
        raise ValueError("dataset 'npz' needs path=, an .npz with x_train, y_train, x_test, y_test")
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"npz dataset file not found: {path}")
    try:
        # allow_pickle=False: object arrays would unpickle (run) code from the file.
        npz = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise ValueError(f"{path}: cannot read as .npz ({exc})") from None
    if not hasattr(npz, "files"):
        raise ValueError(f"{path}: expected an .npz archive of named arrays, got a single array")
    with npz:
        present = sorted(npz.files)
        missing = [k for k in _NPZ_KEYS if k not in present]
        if missing:
            raise ValueError(f"{path}: missing arrays {missing}; the file has {present}")
        arrays = {}
        for k in _NPZ_KEYS:
            try:
                arrays[k] = npz[k]
            except (ValueError, OSError, EOFError) as exc:
                raise ValueError(f"{path}: cannot read array {k!r} ({exc})") from None
    for split in ("train", "test"):
        x, where = arrays[f"x_{split}"], f"{path}:x_{split}"
        if x.ndim < 2 or not (np.issubdtype(x.dtype, np.number) or x.dtype == np.bool_):
            raise ValueError(f"{where}: must be a numeric array [N, ...], got {x.dtype} {x.shape}")
        if np.issubdtype(x.dtype, np.complexfloating) or not np.all(np.isfinite(x)):
            raise ValueError(f"{where}: inputs must be finite real numbers")
        y = arrays[f"y_{split}"] = _as_labels(arrays[f"y_{split}"], f"{path}:y_{split}")
        if len(x) != len(y):
            raise ValueError(
                f"{path}: x_{split} has {len(x)} rows but y_{split} has {len(y)} labels"
            )
    if len(arrays["y_train"]) == 0:
        raise ValueError(f"{path}: x_train/y_train are empty; need at least one sample")
    return tuple(arrays[k] for k in _NPZ_KEYS)


def _raw_arrays(
    name: str, data_dir: str | Path | None, path: str | Path | None, download: bool
) -> tuple[np.ndarray, ...]:
    if name != "npz" and path is not None:
        raise ValueError(f"path= is only for the 'npz' dataset; for {name!r} use data_dir=")
    if name == "digits":
        return sources.load_digits()
    if name in sources.TABULAR:
        return sources.load_tabular(name)
    if name in sources.IDX_SOURCES:
        x_train, y_train, x_test, y_test = sources.load_idx_dataset(
            name, data_dir=data_dir, download=download
        )
        return x_train[:, None], y_train, x_test[:, None], y_test  # (N, 1, H, W)
    if name == "cifar10":
        return sources.load_cifar10(data_dir=data_dir, download=download)
    return _load_npz(path)


def _select_classes(ds: Dataset, classes: Sequence[int]) -> Dataset:
    """Keep only ``classes`` (train and test); label ``classes[i]`` becomes ``i``."""
    try:
        if isinstance(classes, (str, bytes)) or any(isinstance(c, bool) for c in classes):
            raise TypeError
        wanted = [operator.index(c) for c in classes]  # ints, numpy ints, int tensors
    except TypeError:
        raise ValueError(f"classes must be a sequence of integer labels, got {classes!r}") from None
    if not wanted:
        raise ValueError("classes must name at least one class, got []")
    if len(set(wanted)) != len(wanted):
        raise ValueError(f"classes must be distinct, got {wanted}")
    bad = [c for c in wanted if not 0 <= c < ds.num_classes]
    if bad:
        raise ValueError(
            f"classes {bad} do not exist in {ds.name!r}; allowed 0..{ds.num_classes - 1}"
        )
    absent = [c for c in wanted if not bool((ds.y_train == c).any())]
    if absent:
        raise ValueError(f"classes {absent} have no training samples in {ds.name!r}")
    remap = torch.full((ds.num_classes,), -1, dtype=torch.int64)
    remap[torch.tensor(wanted)] = torch.arange(len(wanted))
    keep_train = remap[ds.y_train] >= 0
    keep_test = remap[ds.y_test] >= 0
    return Dataset(
        name=f"{ds.name}[{','.join(map(str, wanted))}]",
        x_train=ds.x_train[keep_train],
        y_train=remap[ds.y_train[keep_train]],
        x_test=ds.x_test[keep_test],
        y_test=remap[ds.y_test[keep_test]],
        num_classes=len(wanted),
    )


def _resize(ds: Dataset, image_size: int) -> Dataset:
    """Downsample [N, C, H, W] images to image_size x image_size by area averaging."""
    if ds.x_train.ndim != 4:
        raise ValueError(
            f"image_size needs images [N, C, H, W]; {ds.name!r} has inputs {ds.input_shape}"
        )
    height, width = ds.input_shape[1:]
    valid_int = isinstance(image_size, (int, np.integer)) and not isinstance(image_size, bool)
    if not valid_int or not 1 <= image_size <= min(height, width):
        raise ValueError(
            f"image_size must be an int in 1..{min(height, width)} (downsampling only) for "
            f"{ds.name!r}, got {image_size!r}"
        )
    if image_size == height == width:
        return ds
    # adaptive pooling averages over (possibly overlapping) windows: 28 -> 8 works too.
    return Dataset(
        name=f"{ds.name}@{image_size}",
        x_train=F.adaptive_avg_pool2d(ds.x_train, int(image_size)),
        y_train=ds.y_train,
        x_test=F.adaptive_avg_pool2d(ds.x_test, int(image_size)),
        y_test=ds.y_test,
        num_classes=ds.num_classes,
    )


def load_dataset(
    name: str,
    *,
    data_dir: str | Path | None = None,
    path: str | Path | None = None,
    classes: Sequence[int] | None = None,
    image_size: int | None = None,
    download: bool = False,
    seq_len: int = 32,
    num_classes: int | None = None,
) -> Dataset:
    """Load a dataset as float32 inputs and int64 labels (``"text"``: int64 tokens).

    Args:
        name: one of ``DATASETS`` (case-insensitive, ``-`` or ``_``; ``fmnist`` works);
            ``wine`` and ``breast_cancer`` are scikit-learn's bundled tables (standardised
            features); synthetic tasks are ``"synthetic:FEATURES:CLASSES:SEED"``
            (`metagg.data.synthetic`).
        data_dir: a folder holding the dataset's files (also searched as
            ``data_dir/NAME``). Searched before ``$METAGG_DATA_DIR/NAME``, the
            download cache ``~/.cache/metagg/NAME`` and system folders.
        path: the ``.npz`` file for ``name="npz"``: it must hold ``x_train, y_train,
            x_test, y_test``; uint8 inputs are scaled by 1/255, others cast to float32;
            ``num_classes`` is the largest label + 1. For ``name="text"``: a UTF-8 text
            file instead of the built-in corpus.
        classes: keep only these labels, renumbered ``0..k-1`` in the given order
            (``classes=[0, 1]`` on CIFAR-10 is CIFAR-2).
        image_size: downsample images to ``image_size x image_size`` by area
            averaging (``adaptive_avg_pool2d``), e.g. 8 for 8x8 Fashion-MNIST.
        download: fetch missing files (Fashion-MNIST, MNIST, CIFAR-10) into
            ``data_dir`` (default ``~/.cache/metagg/NAME``), checking sha256.
        seq_len: characters per sequence, for ``name="text"`` only.
        num_classes: the class count before ``classes`` selects a subset; None = the
            dataset's own (10 for the image sets) or the largest label + 1, with a
            warning when some labels below it never occur (labels 0, 5, 99 would
            otherwise silently build a 100-class model).

    Returns:
        A ``Dataset``; the tensors are fresh copies the caller may modify.

    Raises:
        ValueError: unknown name, bad argument, or a corrupt file (named).
        FileNotFoundError: the dataset's files are nowhere; says where it looked
            and how to get them.
    """
    key = normalize_name(name)
    if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(
            num_classes, int | np.integer) or num_classes < 1):
        raise ValueError(f"num_classes must be an int >= 1, got {num_classes!r}")
    if key == "text":
        if classes is not None or image_size is not None or num_classes is not None:
            raise ValueError("classes, image_size and num_classes do not apply to the 'text' "
                             "dataset (its classes are the corpus's characters)")
        text = text_splits(path, seq_len=seq_len)
        return Dataset(name=text.name, x_train=text.x_train, y_train=text.y_train,
                       x_test=text.x_test, y_test=text.y_test, num_classes=len(text.vocab))
    if key.startswith("synthetic:"):
        features, teacher_classes, seed = parse_synthetic(key)
        x_tr, y_tr, x_te, y_te = synthetic_arrays(features, teacher_classes, seed)
        ds = Dataset(name=key, x_train=x_tr, y_train=y_tr, x_test=x_te, y_test=y_te,
                     num_classes=num_classes or teacher_classes)
    else:
        x_train, y_train, x_test, y_test = _raw_arrays(key, data_dir, path, download)
        ds = Dataset(
            name=key,
            x_train=_to_float(x_train),
            y_train=torch.from_numpy(np.array(y_train, dtype=np.int64)),
            x_test=_to_float(x_test),
            y_test=torch.from_numpy(np.array(y_test, dtype=np.int64)),
            num_classes=num_classes or _NUM_CLASSES.get(key) or _inferred_classes(
                key, np.concatenate([y_train, y_test])),
        )
    if classes is not None:
        ds = _select_classes(ds, classes)
    if image_size is not None:
        ds = _resize(ds, image_size)
    return ds
