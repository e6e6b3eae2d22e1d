"""load_dataset: IDX datasets, digits, names, class subsets, downsampling, errors."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

from metagg.data import DATASETS, Dataset, load_dataset, sources, write_idx
from metagg.data.sources import IDX_FILES

DEBIAN_FMNIST = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.parametrize("gz", [True, False])
@pytest.mark.parametrize("name", ["mnist", "fashion_mnist"])
def test_idx_dataset_from_data_dir(tmp_path, make_idx_dataset, name, gz):
    arrays = make_idx_dataset(tmp_path, gz=gz)
    ds = load_dataset(name, data_dir=tmp_path)
    assert ds.name == name and ds.num_classes == 10
    assert ds.x_train.shape == (30, 1, 28, 28) and ds.input_shape == (1, 28, 28)
    assert ds.x_test.shape == (10, 1, 28, 28)
    assert ds.x_train.dtype == torch.float32 and ds.y_train.dtype == torch.int64
    expected = torch.from_numpy(arrays["x_train"][:, None].astype(np.float32) / 255)
    torch.testing.assert_close(ds.x_train, expected, rtol=0, atol=0)
    np.testing.assert_array_equal(ds.y_test.numpy(), arrays["y_test"])
    assert 0.0 <= float(ds.x_train.min()) and float(ds.x_train.max()) <= 1.0


@pytest.mark.parametrize("alias", ["fmnist", "Fashion-MNIST", "fashion-mnist", " FASHION_MNIST "])
def test_aliases(tmp_path, make_idx_dataset, alias):
    make_idx_dataset(tmp_path)
    assert load_dataset(alias, data_dir=tmp_path).name == "fashion_mnist"


def test_data_dir_subfolder_and_env_var(tmp_path, make_idx_dataset, monkeypatch):
    make_idx_dataset(tmp_path / "mnist", n_train=12)
    assert len(load_dataset("mnist", data_dir=tmp_path).y_train) == 12
    make_idx_dataset(tmp_path / "env" / "mnist", n_train=14)
    monkeypatch.setenv("METAGG_DATA_DIR", str(tmp_path / "env"))
    assert len(load_dataset("mnist").y_train) == 14
    # data_dir comes before the environment variable.
    assert len(load_dataset("mnist", data_dir=tmp_path).y_train) == 12


def test_returned_tensors_are_private_copies(tmp_path, make_idx_dataset):
    make_idx_dataset(tmp_path)
    first = load_dataset("mnist", data_dir=tmp_path)
    first.x_train.zero_()
    first.y_train.fill_(3)
    second = load_dataset("mnist", data_dir=tmp_path)
    assert float(second.x_train.sum()) > 0 and int(second.y_train[0]) == 0


def test_rewritten_file_is_read_again(tmp_path, make_idx_dataset):
    make_idx_dataset(tmp_path, n_train=10, seed=0)
    a = load_dataset("mnist", data_dir=tmp_path)
    make_idx_dataset(tmp_path, n_train=20, seed=1)
    b = load_dataset("mnist", data_dir=tmp_path)
    assert len(a.y_train) == 10 and len(b.y_train) == 20


def test_corrupt_file_through_load_dataset_names_it(tmp_path, make_idx_dataset):
    make_idx_dataset(tmp_path, gz=False)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte: truncated IDX file"):
        load_dataset("mnist", data_dir=tmp_path)


def test_count_mismatch_between_images_and_labels(tmp_path, make_idx_dataset):
    make_idx_dataset(tmp_path)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.zeros(29, np.uint8))
    with pytest.raises(ValueError, match=r"has 30 images but .*train-labels.* has 29 labels"):
        load_dataset("mnist", data_dir=tmp_path)


def test_labels_file_with_images_shape(tmp_path, make_idx_dataset):
    make_idx_dataset(tmp_path)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.zeros((10, 2), np.uint8))
    with pytest.raises(ValueError, match=r"t10k-labels-idx1-ubyte\.gz: expected uint8 labels"):
        load_dataset("mnist", data_dir=tmp_path)


def test_missing_fashion_mnist_message(tmp_path, no_system_dirs):
    with pytest.raises(FileNotFoundError) as info:
        load_dataset("fashion_mnist", data_dir=tmp_path)
    message = str(info.value)
    assert "apt-get install dataset-fashion-mnist" in message
    assert "--data-dir" in message and "download=True" in message
    assert str(tmp_path) in message and "train-images-idx3-ubyte[.gz]" in message
    assert "\n" not in message


def test_missing_mnist_message(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"MNIST not found.*without network.*--data-dir"):
        load_dataset("mnist", data_dir=tmp_path)


def test_incomplete_folder_is_skipped(tmp_path, make_idx_dataset):
    make_idx_dataset(tmp_path)
    (tmp_path / "t10k-images-idx3-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError):
        load_dataset("mnist", data_dir=tmp_path)


def _serve_idx(tmp_path, make_idx_dataset, monkeypatch, *, corrupt=None):
    arrays = make_idx_dataset(tmp_path / "server", n_train=16, n_test=6)
    hashes = {
        f"{stem}.gz": hashlib.sha256((tmp_path / "server" / f"{stem}.gz").read_bytes()).hexdigest()
        for stem in IDX_FILES.values()
    }
    if corrupt:
        hashes[corrupt] = "f" * 64
    served = dataclasses.replace(
        sources.IDX_SOURCES["mnist"], base_url=(tmp_path / "server").as_uri() + "/", sha256=hashes
    )
    monkeypatch.setitem(sources.IDX_SOURCES, "mnist", served)
    return arrays


def test_download_mnist_via_file_url(tmp_path, make_idx_dataset, monkeypatch):
    arrays = _serve_idx(tmp_path, make_idx_dataset, monkeypatch)
    ds = load_dataset("mnist", data_dir=tmp_path / "data", download=True)
    np.testing.assert_array_equal(ds.y_train.numpy(), arrays["y_train"])
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == sorted(
        f"{s}.gz" for s in IDX_FILES.values()
    )


def test_download_default_folder_is_cache(tmp_path, make_idx_dataset, monkeypatch):
    _serve_idx(tmp_path, make_idx_dataset, monkeypatch)
    load_dataset("mnist", download=True)
    assert (sources.CACHE_ROOT / "mnist" / "t10k-labels-idx1-ubyte.gz").is_file()
    assert len(load_dataset("mnist").y_test) == 6  # found again without download=True


def test_download_mnist_bad_checksum(tmp_path, make_idx_dataset, monkeypatch):
    bad = "t10k-images-idx3-ubyte.gz"
    _serve_idx(tmp_path, make_idx_dataset, monkeypatch, corrupt=bad)
    with pytest.raises(ValueError, match=f"checksum mismatch for .*{bad}: expected sha256 f+,"):
        load_dataset("mnist", data_dir=tmp_path / "data", download=True)
    assert not (tmp_path / "data" / bad).exists()
    assert not (tmp_path / "data" / f"{bad}.part").exists()


def test_known_hashes_are_well_formed():
    for source in sources.IDX_SOURCES.values():
        assert sorted(source.sha256) == sorted(f"{s}.gz" for s in IDX_FILES.values())
        assert all(len(h) == 64 and int(h, 16) >= 0 for h in source.sha256.values())
    assert len(sources.CIFAR10_SHA256) == 64


def test_unknown_name_lists_datasets():
    with pytest.raises(ValueError, match=r"unknown dataset 'imagenet'.*digits.*npz"):
        load_dataset("imagenet")
    assert DATASETS == ("digits", "fashion_mnist", "mnist", "cifar10", "npz", "text", "wine",
                        "breast_cancer", "synthetic")


def test_path_is_only_for_npz(tmp_path):
    with pytest.raises(ValueError, match="path= is only for the 'npz' dataset"):
        load_dataset("digits", path=tmp_path / "x.npz")


# ---------------------------------------------------------------- digits


def test_digits_shape_split_range():
    ds = load_dataset("digits")
    assert ds.x_train.shape == (1437, 1, 8, 8) and ds.x_test.shape == (360, 1, 8, 8)
    assert ds.num_classes == 10 and ds.input_shape == (1, 8, 8)
    assert float(ds.x_train.min()) == 0.0 and float(ds.x_train.max()) == 1.0
    assert set(ds.y_train.tolist()) == set(range(10)) == set(ds.y_test.tolist())
    assert "train=1437" in repr(ds)


def _sort_rows(t: torch.Tensor) -> torch.Tensor:
    return t[np.lexsort(t.numpy().T[::-1])]


def test_digits_is_deterministic_and_a_split_of_all_images():
    from sklearn.datasets import load_digits

    a, b = load_dataset("digits"), load_dataset("digits")
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)
    every = torch.cat([a.x_train, a.x_test]).flatten(1)
    reference = torch.from_numpy(load_digits().data.astype(np.float32) / 16)
    # Same multiset of images: sort rows lexicographically and compare.
    torch.testing.assert_close(_sort_rows(every), _sort_rows(reference), rtol=0, atol=0)


# ---------------------------------------------------------------- classes and image_size


def test_classes_keep_and_remap_in_given_order(tmp_path, make_idx_dataset):
    arrays = make_idx_dataset(tmp_path, n_train=40)
    ds = load_dataset("mnist", data_dir=tmp_path, classes=[7, 2])
    assert ds.num_classes == 2 and ds.name == "mnist[7,2]"
    y = arrays["y_train"]
    keep = (y == 7) | (y == 2)
    np.testing.assert_array_equal(ds.y_train.numpy(), np.where(y[keep] == 7, 0, 1))
    expected = torch.from_numpy(arrays["x_train"][keep][:, None].astype(np.float32) / 255)
    torch.testing.assert_close(ds.x_train, expected, rtol=0, atol=0)
    assert set(ds.y_test.tolist()) == {0, 1}


def test_classes_accepts_tensor_and_numpy(tmp_path, make_idx_dataset):
    make_idx_dataset(tmp_path)
    a = load_dataset("mnist", data_dir=tmp_path, classes=torch.tensor([1, 0]))
    b = load_dataset("mnist", data_dir=tmp_path, classes=np.array([1, 0]))
    assert torch.equal(a.y_train, b.y_train)


@pytest.mark.parametrize(
    ("classes", "match"),
    [
        ([], "at least one class"),
        ([1, 1], "distinct"),
        ([0, 10], r"classes \[10\] do not exist.*0\.\.9"),
        ([-1], r"classes \[-1\] do not exist"),
        (["a"], "integer labels"),
        ([1.5], "integer labels"),
        ([True], "integer labels"),
    ],
)
def test_bad_classes(classes, match):
    with pytest.raises(ValueError, match=match):
        load_dataset("digits", classes=classes)


def _adaptive_avg_reference(image: np.ndarray, out: int) -> np.ndarray:
    """Average over windows [floor(i*H/out), ceil((i+1)*H/out)) — pooling by hand."""
    h, w = image.shape
    result = np.zeros((out, out))
    for i in range(out):
        for j in range(out):
            r0, r1 = (i * h) // out, -((-(i + 1) * h) // out)
            c0, c1 = (j * w) // out, -((-(j + 1) * w) // out)
            result[i, j] = image[r0:r1, c0:c1].mean()
    return result


def test_image_size_hand_computed_5_to_2(tmp_path, make_idx_dataset):
    arrays = make_idx_dataset(tmp_path, size=5, n_train=3, n_test=2)
    ds = load_dataset("mnist", data_dir=tmp_path, image_size=2)
    assert ds.input_shape == (1, 2, 2) and ds.name == "mnist@2"
    img = arrays["x_train"][0].astype(np.float64) / 255
    # 5 -> 2 windows overlap: rows/cols [0, 3) and [2, 5).
    expected = np.array(
        [
            [img[0:3, 0:3].mean(), img[0:3, 2:5].mean()],
            [img[2:5, 0:3].mean(), img[2:5, 2:5].mean()],
        ]
    )
    np.testing.assert_allclose(ds.x_train[0, 0].numpy(), expected, rtol=1e-6)


def test_image_size_28_to_8(tmp_path, make_idx_dataset):
    arrays = make_idx_dataset(tmp_path, n_train=4, n_test=2)
    ds = load_dataset("fashion_mnist", data_dir=tmp_path, image_size=8)
    assert ds.x_train.shape == (4, 1, 8, 8) and ds.x_test.shape == (2, 1, 8, 8)
    for k in range(4):
        ref = _adaptive_avg_reference(arrays["x_train"][k].astype(np.float64) / 255, 8)
        np.testing.assert_allclose(ds.x_train[k, 0].numpy(), ref, rtol=1e-5, atol=1e-6)


def test_image_size_and_classes_compose(tmp_path, make_idx_dataset):
    make_idx_dataset(tmp_path)
    ds = load_dataset("mnist", data_dir=tmp_path, classes=[0, 1], image_size=7)
    assert ds.input_shape == (1, 7, 7) and ds.num_classes == 2 and ds.name == "mnist[0,1]@7"


@pytest.mark.parametrize("size", [0, 9, 2.5, -1, True])
def test_bad_image_size(size):
    with pytest.raises(ValueError, match=r"image_size must be an int in 1\.\.8"):
        load_dataset("digits", image_size=size)


def test_image_size_8_on_digits_is_identity():
    assert load_dataset("digits", image_size=8).input_shape == (1, 8, 8)


def test_dataset_validates_its_tensors():
    x, y = torch.zeros(3, 2), torch.zeros(3, dtype=torch.int64)
    with pytest.raises(ValueError, match="share their first dimension"):
        Dataset("d", x, y[:2], x, y, 1)
    with pytest.raises(ValueError, match="float32"):
        Dataset("d", x.double(), y, x, y, 1)
    with pytest.raises(ValueError, match="differ"):
        Dataset("d", x, y, torch.zeros(3, 4), y, 1)


# ---------------------------------------------------------------- the real Fashion-MNIST


@pytest.mark.skipif(not DEBIAN_FMNIST.is_dir(), reason="dataset-fashion-mnist not installed")
def test_fashion_mnist_from_debian_package():
    ds = load_dataset("fashion_mnist")  # found through the system folder
    assert ds.x_train.shape == (60000, 1, 28, 28) and ds.x_test.shape == (10000, 1, 28, 28)
    assert ds.num_classes == 10
    assert torch.equal(torch.bincount(ds.y_train), torch.full((10,), 6000))
    assert torch.equal(torch.bincount(ds.y_test), torch.full((10,), 1000))
    assert float(ds.x_train.min()) == 0.0 and float(ds.x_train.max()) == 1.0
    small = load_dataset("fashion_mnist", image_size=8, classes=[0, 1])
    assert small.x_train.shape == (12000, 1, 8, 8)


@pytest.mark.skipif(not DEBIAN_FMNIST.is_dir(), reason="dataset-fashion-mnist not installed")
def test_debian_copy_matches_known_sha256():
    from metagg.data import file_hash

    for name, expected in sources.IDX_SOURCES["fashion_mnist"].sha256.items():
        assert file_hash(DEBIAN_FMNIST / name) == expected
