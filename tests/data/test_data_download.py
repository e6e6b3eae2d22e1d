"""Checksummed downloads, exercised through file:// URLs (no network here)."""

from __future__ import annotations

import hashlib

import pytest

from metagg.data import download_file, file_hash


@pytest.fixture
def source(tmp_path):
    path = tmp_path / "src" / "payload.bin"
    path.parent.mkdir()
    path.write_bytes(b"metagg" * 100_000)  # 600 kB: several read chunks
    return path


def test_good_hash_passes(tmp_path, source):
    dest = tmp_path / "out" / "payload.bin"
    expected = hashlib.sha256(source.read_bytes()).hexdigest()
    got = download_file(source.as_uri(), dest, expected_hash=expected)
    assert got == dest
    assert dest.read_bytes() == source.read_bytes()
    assert not dest.with_name("payload.bin.part").exists()
    assert file_hash(dest) == expected


def test_hash_is_case_insensitive(tmp_path, source):
    expected = hashlib.sha256(source.read_bytes()).hexdigest().upper()
    download_file(source.as_uri(), tmp_path / "x", expected_hash=expected)
    assert (tmp_path / "x").is_file()


def test_md5(tmp_path, source):
    expected = hashlib.md5(source.read_bytes()).hexdigest()
    download_file(source.as_uri(), tmp_path / "x", expected_hash=expected, algorithm="md5")
    assert file_hash(tmp_path / "x", "md5") == expected


def test_bad_hash_raises_and_leaves_no_file(tmp_path, source):
    dest = tmp_path / "out" / "payload.bin"
    actual = hashlib.sha256(source.read_bytes()).hexdigest()
    with pytest.raises(ValueError, match=f"expected sha256 {'0' * 64}, got {actual}"):
        download_file(source.as_uri(), dest, expected_hash="0" * 64)
    assert list(dest.parent.iterdir()) == []


def test_bad_hash_keeps_existing_good_file(tmp_path, source):
    dest = tmp_path / "payload.bin"
    dest.write_bytes(b"previous")
    with pytest.raises(ValueError, match="checksum mismatch"):
        download_file(source.as_uri(), dest, expected_hash="0" * 64)
    assert dest.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["payload.bin", "src"]


def test_unreachable_url_raises_oserror_and_leaves_no_file(tmp_path):
    dest = tmp_path / "out" / "x"
    missing = (tmp_path / "nope.bin").as_uri()
    with pytest.raises(OSError, match="could not download"):
        download_file(missing, dest, expected_hash="0" * 64)
    assert list(dest.parent.iterdir()) == []


def test_unknown_algorithm(tmp_path, source):
    with pytest.raises(ValueError, match="unknown hash algorithm 'sha1'"):
        download_file(source.as_uri(), tmp_path / "x", expected_hash="0", algorithm="sha1")
    with pytest.raises(ValueError, match="unknown hash algorithm"):
        file_hash(source, "crc32")
