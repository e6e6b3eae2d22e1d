"""CIFAR-10 "python version": batch files, the tar.gz archive, a safe extractor.

The batches (``data_batch_1..5``, ``test_batch``) are Python pickles of a dict
``{b"data": uint8 [n, 3072], b"labels": [int] * n, b"batch_label": ...,
b"filenames": [...]}``. Unpickling runs whatever callables the file names, so a
plain ``pickle.load`` on a downloaded or user-supplied file is arbitrary code
execution. ``RestrictedUnpickler`` therefore resolves no global except the three
that rebuild a numpy array — ``_reconstruct``, ``ndarray`` and ``dtype`` (under
both the numpy < 2 and numpy >= 2 module names) — which only allocate arrays.
Dicts, lists, bytes, str and ints need no globals at all.
"""

from __future__ import annotations

import io
import pickle
import tarfile
from collections.abc import Mapping
from pathlib import Path, PurePosixPath

import numpy as np

__all__ = [
    "ARCHIVE_NAME",
    "BATCH_DIR",
    "TEST_BATCH",
    "TRAIN_BATCHES",
    "RestrictedUnpickler",
    "extract_tar_safely",
    "find_cifar10",
    "read_cifar10",
    "read_cifar_batch",
    "write_cifar_batch",
]

ARCHIVE_NAME = "cifar-10-python.tar.gz"
BATCH_DIR = "cifar-10-batches-py"
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH = "test_batch"
_IMAGE_BYTES = 3 * 32 * 32


def _numpy_reconstruct():
    try:  # numpy >= 2 moved the module; pickles written by either must load.
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # pragma: no cover - numpy < 2
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _numpy_reconstruct(),
    ("numpy._core.multiarray", "_reconstruct"): _numpy_reconstruct(),
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that refuses every global except those rebuilding numpy arrays."""

    def find_class(self, module: str, name: str) -> object:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            allowed = ", ".join(sorted(f"{m}.{n}" for m, n in _ALLOWED_GLOBALS))
            raise pickle.UnpicklingError(
                f"refusing to load global {module}.{name}; a CIFAR batch only needs: {allowed}"
            ) from None


def _parse_batch(raw: bytes, source: str) -> tuple[np.ndarray, np.ndarray]:
    """Unpickle one batch (restricted) and return (images uint8 [n,3,32,32], labels int64 [n])."""
    try:
        # encoding="bytes": the official batches were written by Python 2, whose str is bytes.
        obj = RestrictedUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except Exception as exc:  # a damaged pickle can raise nearly anything; name the file
        raise ValueError(f"{source}: not a valid CIFAR batch ({exc})") from None
    if not isinstance(obj, Mapping):
        raise ValueError(f"{source}: a CIFAR batch is a dict, got {type(obj).__name__}")
    batch = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}
    missing = [k for k in ("data", "labels") if k not in batch]
    if missing:
        raise ValueError(f"{source}: CIFAR batch lacks keys {missing}; has {sorted(batch)}")
    data = batch["data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2:
        raise ValueError(f"{source}: 'data' must be a uint8 [n, {_IMAGE_BYTES}] array")
    if data.shape[1] != _IMAGE_BYTES:
        raise ValueError(f"{source}: 'data' rows must have {_IMAGE_BYTES} bytes, got {data.shape}")
    labels = np.asarray(batch["labels"])
    if labels.ndim != 1 or len(labels) != len(data) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{source}: 'labels' must be {len(data)} integers, got {labels.shape}")
    if len(labels) and (labels.min() < 0 or labels.max() > 9):
        raise ValueError(f"{source}: labels must be in 0..9, got {labels.min()}..{labels.max()}")
    # Rows are 1024 red, 1024 green, 1024 blue bytes, each 32x32 row-major: already CHW.
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def read_cifar_batch(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read one CIFAR-10 python batch with the restricted unpickler.

    Returns:
        ``(images, labels)``: uint8 ``[n, 3, 32, 32]`` and int64 ``[n]``.

    Raises:
        ValueError: the file is not a CIFAR batch or names a forbidden global.
    """
    path = Path(path)
    return _parse_batch(path.read_bytes(), str(path))


def _concat(parts: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def _batch_folder(root: Path) -> Path | None:
    """The folder holding all six batches: ``root/cifar-10-batches-py`` or ``root``."""
    for folder in (root / BATCH_DIR, root):
        if all((folder / name).is_file() for name in (*TRAIN_BATCHES, TEST_BATCH)):
            return folder
    return None


def find_cifar10(root: Path) -> Path | None:
    """The batch folder or the archive under ``root`` (folder preferred), or None."""
    folder = _batch_folder(root)
    if folder is not None:
        return folder
    archive = root / ARCHIVE_NAME
    return archive if archive.is_file() else None


def read_cifar10(source: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Read CIFAR-10 from a batch folder or straight from ``cifar-10-python.tar.gz``.

    The archive is read in memory (only the six batch members, matched by base
    name), so nothing is written to disk and member paths never matter.

    Returns:
        ``(x_train, y_train, x_test, y_test)``: uint8 ``[n, 3, 32, 32]`` images and
        int64 labels (50 000 / 10 000 for the real data).
    """
    source = Path(source)
    names = (*TRAIN_BATCHES, TEST_BATCH)
    if source.is_dir():
        folder = _batch_folder(source)
        if folder is None:
            raise FileNotFoundError(f"{source}: no complete set of CIFAR-10 batches {names}")
        batches = {name: read_cifar_batch(folder / name) for name in names}
    else:
        raw: dict[str, bytes] = {}
        try:
            with tarfile.open(source, "r:*") as tar:
                for member in tar:
                    base = PurePosixPath(member.name).name
                    if member.isfile() and base in names and base not in raw:
                        raw[base] = tar.extractfile(member).read()
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise ValueError(f"{source}: not a readable CIFAR-10 archive ({exc})") from None
        missing = [n for n in names if n not in raw]
        if missing:
            raise ValueError(f"{source}: archive lacks CIFAR-10 batches {missing}")
        batches = {n: _parse_batch(raw[n], f"{source}:{n}") for n in names}
    x_train, y_train = _concat([batches[n] for n in TRAIN_BATCHES])
    x_test, y_test = batches[TEST_BATCH]
    return x_train, y_train, x_test, y_test


def extract_tar_safely(archive: str | Path, dest: str | Path) -> Path:
    """Extract a tar archive into ``dest``, refusing anything that could escape it.

    Every member is checked before anything is written: absolute paths, ``..``
    components, links and device files are refused with a ``ValueError``.

    Returns:
        ``dest`` as a Path.
    """
    archive, dest = Path(archive), Path(dest)
    with tarfile.open(archive, "r:*") as tar:
        members = tar.getmembers()
        for member in members:
            parts = PurePosixPath(member.name).parts
            if member.name.startswith(("/", "\\")) or ".." in parts or ":" in member.name:
                raise ValueError(f"{archive}: refusing unsafe member path {member.name!r}")
            if not (member.isfile() or member.isdir()):
                raise ValueError(f"{archive}: refusing member {member.name!r} (not a file/folder)")
        dest.mkdir(parents=True, exist_ok=True)
        # The "data" filter (Python >= 3.11.4) re-checks the same things inside tarfile.
        kwargs = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        try:
            tar.extractall(dest, members=members, **kwargs)
        except tarfile.TarError as exc:  # FilterError and damaged archives
            raise ValueError(f"{archive}: refusing to extract ({exc})") from None
    return dest


def write_cifar_batch(path: str | Path, images: np.ndarray, labels: np.ndarray) -> Path:
    """Write a CIFAR-10 python batch (used to build small test fixtures).

    Args:
        path: destination file.
        images: uint8 ``[n, 3, 32, 32]`` (or ``[n, 3072]``).
        labels: ``n`` integers in 0..9.
    """
    path = Path(path)
    images = np.ascontiguousarray(images, dtype=np.uint8).reshape(len(images), _IMAGE_BYTES)
    batch = {
        b"batch_label": path.name.encode(),
        b"labels": [int(v) for v in labels],
        b"data": images,
        b"filenames": [f"img_{i}.png".encode() for i in range(len(images))],
    }
    # Protocol 3 stores bytes natively (protocol 2 would need codecs.encode, a global the
    # reader refuses) and pickles arrays through _reconstruct, like the official batches.
    path.write_bytes(pickle.dumps(batch, protocol=3))
    return path
