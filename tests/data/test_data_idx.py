"""IDX reader/writer: round trips, gzip detection, and clear errors on bad files."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from metagg.data import read_idx, write_idx

DTYPES = [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64]


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    array=hnp.arrays(
        dtype=st.sampled_from(DTYPES),
        shape=hnp.array_shapes(min_dims=1, max_dims=4, min_side=0, max_side=5),
        elements={"allow_nan": False},
    ),
    gz=st.booleans(),
)
def test_round_trip(tmp_path, array, gz):
    path = tmp_path / ("a.idx.gz" if gz else "a.idx")
    write_idx(path, array)
    back = read_idx(path)
    assert back.dtype == array.dtype
    assert back.shape == array.shape
    np.testing.assert_array_equal(back, array)


def test_header_is_big_endian_mnist_layout(tmp_path):
    labels = np.array([1, 2, 3], np.uint8)
    write_idx(tmp_path / "l", labels)
    raw = (tmp_path / "l").read_bytes()
    assert raw[:8] == struct.pack(">II", 0x00000801, 3)  # magic 2049, count 3
    assert raw[8:] == b"\x01\x02\x03"
    write_idx(tmp_path / "i", np.array([1, 256], np.int32))
    assert (tmp_path / "i").read_bytes()[8:] == b"\x00\x00\x00\x01\x00\x00\x01\x00"


def test_gzip_detected_from_content_not_suffix(tmp_path):
    array = np.arange(12, dtype=np.uint8).reshape(3, 4)
    write_idx(tmp_path / "x.gz", array)
    (tmp_path / "x.gz").rename(tmp_path / "x-no-suffix")
    np.testing.assert_array_equal(read_idx(tmp_path / "x-no-suffix"), array)


def test_gz_output_is_deterministic(tmp_path):
    array = np.arange(6, dtype=np.uint8)
    a = write_idx(tmp_path / "a.gz", array).read_bytes()
    b = write_idx(tmp_path / "b.gz", array).read_bytes()
    assert a == b


def test_truncated_raw_file_names_file(tmp_path):
    path = write_idx(tmp_path / "imgs", np.zeros((4, 5, 5), np.uint8))
    path.write_bytes(path.read_bytes()[:-7])
    with pytest.raises(ValueError, match=r"imgs: truncated IDX file.*\(4, 5, 5\).*100.*93"):
        read_idx(path)


def test_trailing_bytes_refused(tmp_path):
    path = write_idx(tmp_path / "imgs", np.zeros((2, 3), np.uint8))
    path.write_bytes(path.read_bytes() + b"\x00")
    with pytest.raises(ValueError, match="trailing bytes"):
        read_idx(path)


def test_truncated_header(tmp_path):
    path = tmp_path / "short"
    path.write_bytes(struct.pack(">HBB", 0, 8, 3) + b"\x00\x00")
    with pytest.raises(ValueError, match="short: truncated IDX header"):
        read_idx(path)
    path.write_bytes(b"\x00\x00")
    with pytest.raises(ValueError, match="truncated IDX file"):
        read_idx(path)


def test_truncated_gzip_names_file(tmp_path):
    path = write_idx(tmp_path / "imgs.gz", np.arange(4000, dtype=np.int32))
    path.write_bytes(path.read_bytes()[:-30])
    with pytest.raises(ValueError, match=r"imgs\.gz: corrupt or truncated gzip"):
        read_idx(path)


def test_corrupt_gzip_names_file(tmp_path):
    path = tmp_path / "bad.gz"
    path.write_bytes(b"\x1f\x8b" + b"not really gzip" * 4)
    with pytest.raises(ValueError, match=r"bad\.gz: corrupt or truncated gzip"):
        read_idx(path)


@pytest.mark.parametrize(
    "magic",
    [
        b"\x01\x00\x08\x01",  # first bytes must be zero
        b"\x00\x00\x07\x01",  # unknown type code
        b"\x00\x00\x08\x00",  # zero dimensions
        b"PK\x03\x04",  # a zip file
    ],
)
def test_wrong_magic(tmp_path, magic):
    path = tmp_path / "wrong"
    path.write_bytes(magic + b"\x00" * 16)
    with pytest.raises(ValueError, match="wrong: bad IDX magic number 0x"):
        read_idx(path)


def test_wrong_magic_inside_gzip(tmp_path):
    path = tmp_path / "wrong.gz"
    path.write_bytes(gzip.compress(b"hello world, no idx here"))
    with pytest.raises(ValueError, match="bad IDX magic"):
        read_idx(path)


@pytest.mark.parametrize("bad", [np.zeros(3, np.int64), np.zeros(3, np.uint16), np.array(3.0)])
def test_write_refuses_unsupported(tmp_path, bad):
    with pytest.raises(ValueError, match="write_idx"):
        write_idx(tmp_path / "x", bad)
