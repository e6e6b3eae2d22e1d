"""CIFAR-10 batches: loading from folders and archives, and the restricted unpickler."""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import tarfile

import numpy as np
import pytest
import torch

from metagg.data import load_dataset, read_cifar_batch, sources, write_cifar_batch
from metagg.data.cifar import BATCH_DIR, extract_tar_safely, read_cifar10


def _tar_gz(path, folder, arcdir=BATCH_DIR):
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        for file in sorted(folder.iterdir()):
            tar.add(file, arcname=f"{arcdir}/{file.name}")
    return path


def _check(ds, arrays):
    assert ds.name == "cifar10"
    assert ds.num_classes == 10
    assert ds.input_shape == (3, 32, 32)
    assert ds.x_train.dtype == torch.float32 and ds.y_train.dtype == torch.int64
    expected = torch.from_numpy(arrays["x_train"].astype(np.float32) / 255)
    torch.testing.assert_close(ds.x_train, expected, rtol=0, atol=1e-7)
    np.testing.assert_array_equal(ds.y_train.numpy(), arrays["y_train"])
    np.testing.assert_array_equal(ds.y_test.numpy(), arrays["y_test"])
    assert len(ds.x_test) == len(arrays["x_test"])


def test_load_from_batch_folder(tmp_path, make_cifar_batches):
    arrays = make_cifar_batches(tmp_path / BATCH_DIR)
    _check(load_dataset("cifar10", data_dir=tmp_path), arrays)
    # The folder itself, and the data_dir/cifar10 layout, work too.
    _check(load_dataset("CIFAR-10", data_dir=tmp_path / BATCH_DIR), arrays)


def test_load_from_subfolder_named_after_dataset(tmp_path, make_cifar_batches):
    arrays = make_cifar_batches(tmp_path / "cifar10" / BATCH_DIR)
    _check(load_dataset("cifar10", data_dir=tmp_path), arrays)


def test_pixel_layout_is_rgb_planes(tmp_path):
    image = np.zeros((1, 3, 32, 32), np.uint8)
    image[0, 0, 0, 1] = 255  # red, row 0, column 1
    image[0, 2, 31, 31] = 51  # blue, last pixel
    write_cifar_batch(tmp_path / "b", image, [7])
    raw = pickle.loads((tmp_path / "b").read_bytes())[b"data"]
    assert raw[0, 1] == 255 and raw[0, 3071] == 51  # the official row layout
    x, y = read_cifar_batch(tmp_path / "b")
    np.testing.assert_array_equal(x, image)
    assert y.tolist() == [7]


def test_load_from_archive_without_extracting(tmp_path, make_cifar_batches):
    arrays = make_cifar_batches(tmp_path / "build")
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    _tar_gz(data_dir / "cifar-10-python.tar.gz", tmp_path / "build")
    _check(load_dataset("cifar10", data_dir=data_dir), arrays)
    assert os.listdir(data_dir) == ["cifar-10-python.tar.gz"]


def test_classes_make_cifar2(tmp_path, make_cifar_batches):
    arrays = make_cifar_batches(tmp_path / BATCH_DIR, per_batch=10)
    ds = load_dataset("cifar10", data_dir=tmp_path, classes=[3, 5])
    assert ds.num_classes == 2 and ds.name == "cifar10[3,5]"
    keep = np.isin(arrays["y_train"], [3, 5])
    np.testing.assert_array_equal(ds.y_train.numpy(), (arrays["y_train"][keep] == 5).astype(int))


def test_legacy_numpy_module_name_accepted(tmp_path):
    # numpy < 2 (and the official files) name numpy.core.multiarray, numpy 2 numpy._core.
    path = write_cifar_batch(tmp_path / "b", np.ones((2, 3, 32, 32), np.uint8), [1, 2])
    raw = path.read_bytes()
    assert b"numpy._core.multiarray" in raw
    path.write_bytes(raw.replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
    x, y = read_cifar_batch(path)
    assert x.shape == (2, 3, 32, 32) and y.tolist() == [1, 2]


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_forbidden_global_is_refused_not_run(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps({b"data": _Evil(marker), b"labels": []}, protocol=3))
    with pytest.raises(ValueError, match=r"data_batch_1: .*refusing to load global .*system"):
        read_cifar_batch(path)
    assert not marker.exists()


def test_forbidden_global_in_archive_is_refused(tmp_path, make_cifar_batches):
    make_cifar_batches(tmp_path / "build")
    marker = tmp_path / "pwned"
    evil = {b"data": _Evil(marker), b"labels": []}
    (tmp_path / "build" / "test_batch").write_bytes(pickle.dumps(evil, protocol=3))
    archive = _tar_gz(tmp_path / "c.tar.gz", tmp_path / "build")
    with pytest.raises(ValueError, match="refusing to load global"):
        read_cifar10(archive)
    assert not marker.exists()


@pytest.mark.parametrize(
    ("obj", "match"),
    [
        ([1, 2], "a CIFAR batch is a dict"),
        ({b"labels": [1]}, r"lacks keys \['data'\]"),
        ({b"data": np.zeros((2, 10), np.uint8), b"labels": [1, 2]}, "rows must have 3072"),
        ({b"data": np.zeros((2, 3072), np.float32), b"labels": [1, 2]}, "uint8"),
        ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [1]}, "'labels' must be 2"),
        ({b"data": np.zeros((1, 3072), np.uint8), b"labels": [10]}, r"labels must be in 0\.\.9"),
    ],
)
def test_malformed_batches(tmp_path, obj, match):
    path = tmp_path / "batch"
    path.write_bytes(pickle.dumps(obj, protocol=3))
    with pytest.raises(ValueError, match=match):
        read_cifar_batch(path)


def test_garbage_file_is_a_value_error(tmp_path):
    (tmp_path / "batch").write_bytes(b"\x80\x03garbage")
    with pytest.raises(ValueError, match="batch: not a valid CIFAR batch"):
        read_cifar_batch(tmp_path / "batch")


def test_archive_missing_batches(tmp_path, make_cifar_batches):
    make_cifar_batches(tmp_path / "build")
    (tmp_path / "build" / "data_batch_3").unlink()
    archive = _tar_gz(tmp_path / "cifar-10-python.tar.gz", tmp_path / "build")
    with pytest.raises(ValueError, match=r"lacks CIFAR-10 batches \['data_batch_3'\]"):
        read_cifar10(archive)


def test_missing_cifar_says_where_and_how(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        load_dataset("cifar10", data_dir=tmp_path)
    message = str(info.value)
    assert str(tmp_path) in message and "without network" in message and "--data-dir" in message
    assert "\n" not in message


def _tar_with(path, name, *, kind=tarfile.REGTYPE, linkname=""):
    with tarfile.open(path, "w:gz") as tar:
        ok = tarfile.TarInfo("cifar-10-batches-py/readme")
        ok.size = 2
        tar.addfile(ok, io.BytesIO(b"hi"))
        info = tarfile.TarInfo(name)
        info.type, info.linkname = kind, linkname
        info.size = 4 if kind == tarfile.REGTYPE else 0
        tar.addfile(info, io.BytesIO(b"evil") if kind == tarfile.REGTYPE else None)
    return path


@pytest.mark.parametrize(
    ("name", "kind", "linkname"),
    [
        ("../evil", tarfile.REGTYPE, ""),
        ("a/../../evil", tarfile.REGTYPE, ""),
        ("/tmp/evil-abs", tarfile.REGTYPE, ""),
        ("link", tarfile.SYMTYPE, "/etc/passwd"),
        ("hard", tarfile.LNKTYPE, "../x"),
    ],
)
def test_extract_refuses_unsafe_members(tmp_path, name, kind, linkname):
    archive = _tar_with(tmp_path / "a.tar.gz", name, kind=kind, linkname=linkname)
    dest = tmp_path / "dest"
    with pytest.raises(ValueError, match="refusing"):
        extract_tar_safely(archive, dest)
    assert not dest.exists()  # checked before anything was written
    assert not (tmp_path / "evil").exists()


def test_extract_safe_archive(tmp_path, make_cifar_batches):
    arrays = make_cifar_batches(tmp_path / "build")
    archive = _tar_gz(tmp_path / "c.tar.gz", tmp_path / "build")
    extract_tar_safely(archive, tmp_path / "out")
    x_train, y_train, _, _ = read_cifar10(tmp_path / "out")
    np.testing.assert_array_equal(x_train, arrays["x_train"])
    np.testing.assert_array_equal(y_train, arrays["y_train"])


def test_download_verifies_extracts_and_loads(tmp_path, monkeypatch, make_cifar_batches):
    arrays = make_cifar_batches(tmp_path / "build")
    archive = _tar_gz(tmp_path / "server" / "cifar-10-python.tar.gz", tmp_path / "build")
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    monkeypatch.setattr(sources, "CIFAR10_URL", archive.as_uri())
    monkeypatch.setattr(sources, "CIFAR10_SHA256", digest)
    ds = load_dataset("cifar10", data_dir=tmp_path / "data", download=True)
    _check(ds, arrays)
    assert (tmp_path / "data" / BATCH_DIR / "test_batch").is_file()


def test_download_bad_checksum_leaves_nothing(tmp_path, monkeypatch, make_cifar_batches):
    make_cifar_batches(tmp_path / "build")
    archive = _tar_gz(tmp_path / "server" / "cifar-10-python.tar.gz", tmp_path / "build")
    monkeypatch.setattr(sources, "CIFAR10_URL", archive.as_uri())
    with pytest.raises(ValueError, match="checksum mismatch"):
        load_dataset("cifar10", data_dir=tmp_path / "data", download=True)
    assert list((tmp_path / "data").iterdir()) == []
