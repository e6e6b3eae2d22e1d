"""Download a file and check its checksum before it is used.

The file is written next to its destination as ``NAME.part`` and renamed only
when its hash matches, so an interrupted or tampered download never leaves a
file that a later run would trust. Any URL scheme urllib knows works, including
``file://`` (which the tests use, since these machines have no network).
"""

from __future__ import annotations

import hashlib
import os
import urllib.error
import urllib.request
from pathlib import Path

__all__ = ["download_file", "file_hash"]

_CHUNK = 1 << 20
_ALGORITHMS = ("sha256", "md5")


def file_hash(path: str | Path, algorithm: str = "sha256") -> str:
    """Hex digest of a file's bytes (``sha256`` or ``md5``), read in 1 MiB chunks."""
    if algorithm not in _ALGORITHMS:
        raise ValueError(f"unknown hash algorithm {algorithm!r}; allowed: {_ALGORITHMS}")
    digest = hashlib.new(algorithm)
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def download_file(
    url: str,
    dest: str | Path,
    *,
    expected_hash: str,
    algorithm: str = "sha256",
    timeout: float = 60.0,
) -> Path:
    """Download ``url`` to ``dest`` and verify its hash; on any failure leave no file.

    Args:
        url: source (``https://``, ``http://`` or ``file://``).
        dest: destination file; its folder is created if needed. An existing file
            is replaced only after the new one has passed the check.
        expected_hash: the known hex digest of the file.
        algorithm: ``"sha256"`` (default) or ``"md5"``.
        timeout: seconds to wait for the server.

    Returns:
        ``dest`` as a Path.

    Raises:
        ValueError: the downloaded bytes do not match ``expected_hash`` (the
            message gives both digests).
        OSError: the download itself failed (no network, 404, disk full).
    """
    if algorithm not in _ALGORITHMS:
        raise ValueError(f"unknown hash algorithm {algorithm!r}; allowed: {_ALGORITHMS}")
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    digest = hashlib.new(algorithm)
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(part, "wb") as out:
            while chunk := response.read(_CHUNK):
                digest.update(chunk)
                out.write(chunk)
    except (urllib.error.URLError, OSError) as exc:
        part.unlink(missing_ok=True)
        reason = getattr(exc, "reason", exc)
        raise OSError(f"could not download {url}: {reason}") from exc
    except BaseException:
        part.unlink(missing_ok=True)  # KeyboardInterrupt too: never leave a half file
        raise
    got = digest.hexdigest()
    if got != expected_hash.lower():
        part.unlink(missing_ok=True)
        raise ValueError(
            f"checksum mismatch for {url}: expected {algorithm} {expected_hash.lower()}, "
            f"got {got}; the downloaded file was deleted"
        )
    os.replace(part, dest)
    return dest
