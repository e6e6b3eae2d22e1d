"""User data from an .npz file: the happy path and every validation error."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from metagg.data import load_dataset


def _save(path, **arrays):
    np.savez(path, **arrays)
    return path


def _good(n_train=12, n_test=5, features=(4,), dtype=np.float64):
    rng = np.random.default_rng(0)
    return {
        "x_train": rng.random((n_train, *features)).astype(dtype),
        "y_train": np.arange(n_train) % 3,
        "x_test": rng.random((n_test, *features)).astype(dtype),
        "y_test": np.arange(n_test) % 3,
    }


def test_good_file(tmp_path):
    arrays = _good()
    ds = load_dataset("npz", path=_save(tmp_path / "d.npz", **arrays))
    assert ds.name == "npz" and ds.num_classes == 3 and ds.input_shape == (4,)
    assert ds.x_train.dtype == torch.float32 and ds.y_train.dtype == torch.int64
    np.testing.assert_allclose(ds.x_train.numpy(), arrays["x_train"], rtol=1e-6)
    np.testing.assert_array_equal(ds.y_test.numpy(), arrays["y_test"])


def test_num_classes_is_max_label_plus_one_over_both_splits(tmp_path):
    arrays = _good()
    arrays["y_test"][0] = 6
    with pytest.warns(UserWarning, match="7 classes inferred"):  # labels 3..5 never occur
        assert load_dataset("npz", path=_save(tmp_path / "d.npz", **arrays)).num_classes == 7


def test_uint8_images_scaled_and_shape_kept(tmp_path):
    arrays = _good(features=(1, 6, 6))
    arrays["x_train"] = np.full((12, 1, 6, 6), 255, np.uint8)
    arrays["x_test"] = np.zeros((5, 1, 6, 6), np.uint8)
    ds = load_dataset("npz", path=_save(tmp_path / "d.npz", **arrays), image_size=3)
    assert ds.input_shape == (1, 3, 3)
    assert float(ds.x_train.min()) == 1.0 and float(ds.x_test.max()) == 0.0


def test_column_labels_and_integral_floats_accepted(tmp_path):
    arrays = _good()
    arrays["y_train"] = arrays["y_train"].reshape(-1, 1)  # Keras style [N, 1]
    arrays["y_test"] = arrays["y_test"].astype(np.float32)
    ds = load_dataset("npz", path=_save(tmp_path / "d.npz", **arrays))
    assert ds.y_train.shape == (12,) and ds.y_test.dtype == torch.int64


def test_classes_on_npz(tmp_path):
    ds = load_dataset("npz", path=_save(tmp_path / "d.npz", **_good()), classes=[2, 0])
    assert ds.num_classes == 2 and len(ds.y_train) == 8
    assert set(ds.y_train.tolist()) == {0, 1}


def test_missing_key_lists_missing_and_present(tmp_path):
    arrays = _good()
    del arrays["y_test"], arrays["x_test"]
    path = _save(tmp_path / "d.npz", **arrays, extra=np.zeros(1))
    missing = r"missing arrays \['x_test', 'y_test'\]; .*\['extra', 'x_train', 'y_train'\]"
    with pytest.raises(ValueError, match=missing):
        load_dataset("npz", path=path)


def test_mismatched_lengths(tmp_path):
    arrays = _good()
    arrays["y_train"] = arrays["y_train"][:-1]
    with pytest.raises(ValueError, match="x_train has 12 rows but y_train has 11 labels"):
        load_dataset("npz", path=_save(tmp_path / "d.npz", **arrays))


def test_train_test_feature_shapes_must_match(tmp_path):
    arrays = _good()
    arrays["x_test"] = np.zeros((5, 3))
    with pytest.raises(ValueError, match="differ"):
        load_dataset("npz", path=_save(tmp_path / "d.npz", **arrays))


@pytest.mark.parametrize(
    ("labels", "match"),
    [
        (np.array([0, 1, -1] * 4), "must be >= 0"),
        (np.array([0.5] * 12), "non-integral"),
        (np.array(["a"] * 12), "must be integers"),
        (np.zeros((12, 2), np.int64), "1-D"),
    ],
)
def test_bad_labels(tmp_path, labels, match):
    arrays = _good()
    arrays["y_train"] = labels
    with pytest.raises(ValueError, match=match):
        load_dataset("npz", path=_save(tmp_path / "d.npz", **arrays))


@pytest.mark.parametrize(
    ("x", "match"),
    [
        (np.zeros(12), "numeric array"),
        (np.array([["a"]] * 12), "numeric array"),
        (np.full((12, 4), np.nan), "finite"),
    ],
)
def test_bad_inputs(tmp_path, x, match):
    arrays = _good()
    arrays["x_train"] = x
    with pytest.raises(ValueError, match=match):
        load_dataset("npz", path=_save(tmp_path / "d.npz", **arrays))


def test_object_arrays_are_not_unpickled(tmp_path):
    arrays = _good()
    arrays["x_train"] = np.array([object()] * 12, dtype=object)
    path = _save(tmp_path / "d.npz", **arrays)
    with pytest.raises(ValueError, match="cannot read array 'x_train'"):
        load_dataset("npz", path=path)


def test_not_an_npz(tmp_path):
    (tmp_path / "junk.npz").write_bytes(b"this is not a zip")
    with pytest.raises(ValueError, match=r"junk\.npz: cannot read as \.npz"):
        load_dataset("npz", path=tmp_path / "junk.npz")
    np.save(tmp_path / "single.npy", np.zeros(3))
    with pytest.raises(ValueError, match="single array"):
        load_dataset("npz", path=tmp_path / "single.npy")


def test_path_required_and_must_exist(tmp_path):
    with pytest.raises(ValueError, match="needs path="):
        load_dataset("npz")
    with pytest.raises(FileNotFoundError, match=r"nope\.npz"):
        load_dataset("npz", path=tmp_path / "nope.npz")


def test_empty_training_set(tmp_path):
    arrays = _good()
    arrays["x_train"], arrays["y_train"] = np.zeros((0, 4)), np.zeros(0, np.int64)
    with pytest.raises(ValueError, match="empty"):
        load_dataset("npz", path=_save(tmp_path / "d.npz", **arrays))


def test_image_size_on_flat_features_refused(tmp_path):
    with pytest.raises(ValueError, match=r"image_size needs images \[N, C, H, W\]"):
        load_dataset("npz", path=_save(tmp_path / "d.npz", **_good()), image_size=2)
