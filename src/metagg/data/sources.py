"""Where each built-in dataset's files live, how to fetch them, and their raw arrays.

Every reader here returns numpy arrays ``(x_train, y_train, x_test, y_test)``:
images uint8 (or float32 already in [0, 1] for digits), labels int64. Turning
them into tensors, subsetting classes and resizing happen in ``datasets.py``.

Search order for a file-based dataset NAME (first folder holding every file wins):
``data_dir``, ``data_dir/NAME``, ``$METAGG_DATA_DIR/NAME``, ``~/.cache/metagg/NAME``
(where ``download=True`` puts files when no ``data_dir`` is given), then system
folders (the Debian ``dataset-fashion-mnist`` package for Fashion-MNIST).
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from metagg.data import cifar
from metagg.data.download import download_file
from metagg.data.idx import read_idx

__all__ = [
    "IDX_FILES",
    "IDX_SOURCES",
    "load_cifar10",
    "load_digits",
    "load_idx_dataset",
    "locate",
]

ENV_VAR = "METAGG_DATA_DIR"
CACHE_ROOT = Path("~/.cache/metagg")

# Array name -> IDX file stem; each file may be raw or gzipped (stem + ".gz").
IDX_FILES: dict[str, str] = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}


@dataclass(frozen=True)
class IdxSource:
    """One IDX dataset: display name, download base URL, sha256 of each .gz file."""

    title: str
    base_url: str
    sha256: dict[str, str]
    system_dirs: tuple[Path, ...] = ()
    hint: str = ""


IDX_SOURCES: dict[str, IdxSource] = {
    "fashion_mnist": IdxSource(
        title="Fashion-MNIST",
        # The official S3 website endpoint serves http only; the sha256 check covers that.
        base_url="http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
        sha256={
            "train-images-idx3-ubyte.gz": (
                "b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7"
            ),
            "train-labels-idx1-ubyte.gz": (
                "0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056"
            ),
            "t10k-images-idx3-ubyte.gz": (
                "cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa"
            ),
            "t10k-labels-idx1-ubyte.gz": (
                "8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05"
            ),
        },
        system_dirs=(Path("/usr/share/datasets/fashion-mnist"),),
        hint=(
            "install it with `apt-get install dataset-fashion-mnist`, or pass --data-dir DIR "
            "(data_dir=DIR) holding the four IDX files, or download=True (needs network)"
        ),
    ),
    "mnist": IdxSource(
        title="MNIST",
        base_url="https://ossci-datasets.s3.amazonaws.com/mnist/",
        # The standard MNIST .gz files (the same bytes on every mirror).
        sha256={
            "train-images-idx3-ubyte.gz": (
                "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609"
            ),
            "train-labels-idx1-ubyte.gz": (
                "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c"
            ),
            "t10k-images-idx3-ubyte.gz": (
                "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6"
            ),
            "t10k-labels-idx1-ubyte.gz": (
                "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6"
            ),
        },
        hint=(
            "it cannot be downloaded without network: put the four IDX files (.gz or raw) in "
            "--data-dir DIR (data_dir=DIR), or use download=True on a machine with network"
        ),
    ),
}

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
# The publisher lists md5 c58f30108f718f92721af3b95e74349a; we check the archive's sha256
# (the same bytes; Keras pins this value) to use one strong hash for every download.
CIFAR10_SHA256 = "6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce"
CIFAR10_HINT = (
    "it cannot be downloaded without network: put cifar-10-batches-py/ or "
    f"{cifar.ARCHIVE_NAME} in --data-dir DIR (data_dir=DIR), or use download=True on a "
    "machine with network"
)


def search_dirs(
    name: str, data_dir: str | Path | None, system: tuple[Path, ...] = ()
) -> list[Path]:
    """The folders searched for dataset ``name``, in order, without duplicates."""
    dirs: list[Path] = []
    if data_dir is not None:
        root = Path(data_dir).expanduser()
        dirs += [root, root / name]
    env = os.environ.get(ENV_VAR)
    if env:
        dirs.append(Path(env).expanduser() / name)
    dirs.append(CACHE_ROOT.expanduser() / name)
    dirs += system
    return list(dict.fromkeys(dirs))


def download_dir(name: str, data_dir: str | Path | None) -> Path:
    """Where ``download=True`` writes: ``data_dir``, else $METAGG_DATA_DIR/NAME, else the cache."""
    if data_dir is not None:
        return Path(data_dir).expanduser()
    env = os.environ.get(ENV_VAR)
    return (Path(env) if env else CACHE_ROOT).expanduser() / name


def _stat_key(path: Path) -> tuple[str, int, int]:
    # The cache key includes mtime and size so a rewritten file is read again.
    st = path.stat()
    return str(path.resolve()), st.st_mtime_ns, st.st_size


@functools.lru_cache(maxsize=8)
def _read_idx_cached(key: tuple[str, int, int]) -> np.ndarray:
    array = read_idx(key[0])
    array.flags.writeable = False  # shared between callers: nobody may mutate it
    return array


def _idx_files_in(folder: Path) -> dict[str, Path] | None:
    """The four IDX files in ``folder`` (raw preferred over .gz), or None if any is missing."""
    found: dict[str, Path] = {}
    for key, stem in IDX_FILES.items():
        for candidate in (folder / stem, folder / f"{stem}.gz"):
            if candidate.is_file():
                found[key] = candidate
                break
        else:
            return None
    return found


def _fetch_idx(source: IdxSource, dest: Path) -> dict[str, Path]:
    files = {}
    for key, stem in IDX_FILES.items():
        name = f"{stem}.gz"
        target = dest / name
        if not target.is_file():
            download_file(source.base_url + name, target, expected_hash=source.sha256[name])
        files[key] = target
    return files


def _check_idx_arrays(arrays: dict[str, np.ndarray], files: dict[str, Path]) -> None:
    """Images uint8 [N, H, W], labels uint8 [N] in 0..9, N matching per split."""
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        fx, fy = files[f"x_{split}"], files[f"y_{split}"]
        if x.dtype != np.uint8 or x.ndim != 3:
            raise ValueError(f"{fx}: expected uint8 images [N, H, W], got {x.dtype} {x.shape}")
        if y.dtype != np.uint8 or y.ndim != 1:
            raise ValueError(f"{fy}: expected uint8 labels [N], got {y.dtype} {y.shape}")
        if len(x) != len(y):
            raise ValueError(f"{fx} has {len(x)} images but {fy} has {len(y)} labels")
        if len(y) and y.max() > 9:
            raise ValueError(f"{fy}: labels must be in 0..9, got max {y.max()}")
    if arrays["x_train"].shape[1:] != arrays["x_test"].shape[1:]:
        raise ValueError(
            f"train images {arrays['x_train'].shape[1:]} and test images "
            f"{arrays['x_test'].shape[1:]} differ in size ({files['x_train'].parent})"
        )


def load_idx_dataset(
    name: str, *, data_dir: str | Path | None = None, download: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Raw arrays of an IDX dataset (``"mnist"`` or ``"fashion_mnist"``).

    Returns:
        ``(x_train, y_train, x_test, y_test)``: uint8 images ``[N, H, W]`` (read-only,
        cached in-process) and int64 labels.
    """
    source = IDX_SOURCES[name]
    dirs = search_dirs(name, data_dir, source.system_dirs)
    files = next((f for f in map(_idx_files_in, dirs) if f is not None), None)
    if files is None and download:
        files = _fetch_idx(source, download_dir(name, data_dir))
    if files is None:
        stems = ", ".join(f"{s}[.gz]" for s in IDX_FILES.values())
        raise FileNotFoundError(
            f"{source.title} not found: looked for {stems} in {', '.join(map(str, dirs))}; "
            f"{source.hint}"
        )
    arrays = {key: _read_idx_cached(_stat_key(path)) for key, path in files.items()}
    _check_idx_arrays(arrays, files)
    return (
        arrays["x_train"],
        arrays["y_train"].astype(np.int64),
        arrays["x_test"],
        arrays["y_test"].astype(np.int64),
    )


def locate(name: str, data_dir: str | Path | None = None) -> tuple[Path | None, list[Path]]:
    """Where dataset ``name`` (``mnist``, ``fashion_mnist``, ``cifar10``) would be loaded
    from, without reading it: ``(folder or archive, or None; the places searched)``."""
    if name == "cifar10":
        dirs = search_dirs(name, data_dir)
        found = next((f for f in map(cifar.find_cifar10, dirs) if f is not None), None)
        return found, dirs
    source = IDX_SOURCES[name]
    dirs = search_dirs(name, data_dir, source.system_dirs)
    files = next((f for f in map(_idx_files_in, dirs) if f is not None), None)
    return (None if files is None else files["x_train"].parent), dirs


@functools.lru_cache(maxsize=1)
def _read_cifar_cached(key: tuple[str, int, int]) -> tuple[np.ndarray, ...]:
    arrays = cifar.read_cifar10(key[0])
    for array in arrays:
        array.flags.writeable = False
    return arrays


def load_cifar10(
    *, data_dir: str | Path | None = None, download: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Raw CIFAR-10 arrays from a batch folder or the archive (see ``search_dirs``).

    Returns:
        ``(x_train, y_train, x_test, y_test)``: uint8 ``[N, 3, 32, 32]`` and int64 labels.
    """
    dirs = search_dirs("cifar10", data_dir)
    found = next((f for f in map(cifar.find_cifar10, dirs) if f is not None), None)
    if found is None and download:
        dest = download_dir("cifar10", data_dir)
        archive = download_file(
            CIFAR10_URL, dest / cifar.ARCHIVE_NAME, expected_hash=CIFAR10_SHA256
        )
        # Extract once so later loads skip the 170 MB gunzip.
        cifar.extract_tar_safely(archive, dest)
        found = cifar.find_cifar10(dest)
    if found is None:
        raise FileNotFoundError(
            f"CIFAR-10 not found: looked for {cifar.BATCH_DIR}/ or {cifar.ARCHIVE_NAME} in "
            f"{', '.join(map(str, dirs))}; {CIFAR10_HINT}"
        )
    if found.is_dir():
        # Key on the newest batch so editing any of them invalidates the cache.
        stats = [_stat_key(found / n) for n in (*cifar.TRAIN_BATCHES, cifar.TEST_BATCH)]
        key = (str(found.resolve()), max(s[1] for s in stats), sum(s[2] for s in stats))
    else:
        key = _stat_key(found)
    return _read_cifar_cached(key)


@functools.lru_cache(maxsize=1)
def _digits_arrays() -> tuple[np.ndarray, ...]:
    from sklearn.datasets import load_digits as sk_load_digits  # slow import; only here

    bunch = sk_load_digits()
    x = (bunch.images.astype(np.float32) / np.float32(16.0))[:, None]  # (N, 1, 8, 8) in [0, 1]
    y = bunch.target.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(y))  # fixed split, same on every machine
    n_test = math.ceil(0.2 * len(y))  # 360 of 1797
    train, test = order[n_test:], order[:n_test]
    arrays = (x[train], y[train], x[test], y[test])
    for array in arrays:
        array.flags.writeable = False
    return arrays


def load_digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """scikit-learn's 8x8 digits: float32 ``[N, 1, 8, 8]`` in [0, 1], a fixed 1437/360 split."""
    return _digits_arrays()


TABULAR = ("wine", "breast_cancer")


@functools.lru_cache(maxsize=len(TABULAR))
def load_tabular(name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A scikit-learn bundled table (``wine``: 178 × 13, 3 classes; ``breast_cancer``:
    569 × 30, 2 classes) as float32 ``[N, F]`` features, a fixed 80/20 split, each
    feature standardised by the training split's mean and standard deviation."""
    from sklearn import datasets as sk  # slow import; only here

    bunch = {"wine": sk.load_wine, "breast_cancer": sk.load_breast_cancer}[name]()
    x, y = bunch.data.astype(np.float64), bunch.target.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(y))
    n_test = math.ceil(0.2 * len(y))
    train, test = order[n_test:], order[:n_test]
    mean, std = x[train].mean(0), x[train].std(0)
    x = ((x - mean) / np.where(std > 0, std, 1.0)).astype(np.float32)
    arrays = (x[train], y[train], x[test], y[test])
    for array in arrays:
        array.flags.writeable = False
    return arrays
