"""The restricted unpickler and the embedded animal-silhouette set."""

import builtins
import importlib.util
import io
import pickle
import sys

import numpy as np
import pytest
import torch

from ibmd_pipeline.data import CLASS_NAMES, DataError, load_embedded, load_numpy_pickle, read_embedded_arrays
from ibmd_pipeline.data import embedded as embedded_module


class _OpensAFile:
    """Pickles into a call of builtins.open, the kind of global a data file must never reach."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (builtins.open, (str(self.path), "w"))


@pytest.mark.parametrize("protocol", [3, 4])
@pytest.mark.parametrize("dtype", [np.uint8, np.int64, np.float32])
def test_numpy_arrays_round_trip(protocol, dtype):
    array = np.arange(24, dtype=dtype).reshape(2, 3, 4)
    loaded = load_numpy_pickle(io.BytesIO(pickle.dumps(array, protocol=protocol)))
    assert loaded.dtype == array.dtype and np.array_equal(loaded, array)


def test_a_pickle_naming_another_global_is_refused_before_it_runs(tmp_path):
    target = tmp_path / "created_by_pickle"
    payload = pickle.dumps(_OpensAFile(target), protocol=4)
    with pytest.raises(pickle.UnpicklingError, match=r"refusing to unpickle global '\w+\.open'"):
        load_numpy_pickle(io.BytesIO(payload))
    assert not target.exists()
    pickle.loads(payload).close()  # the payload really is harmful to a plain unpickler
    assert target.exists()


def test_non_arrays_and_object_arrays_are_refused():
    with pytest.raises(pickle.UnpicklingError, match="expected a numpy array"):
        load_numpy_pickle(io.BytesIO(pickle.dumps([1, 2, 3], protocol=4)))
    objects = np.array([1, "a"], dtype=object)
    with pytest.raises(pickle.UnpicklingError, match="objects"):
        load_numpy_pickle(io.BytesIO(pickle.dumps(objects, protocol=4)))


def test_embedded_files_are_read_without_importing_the_package(monkeypatch):
    monkeypatch.delitem(sys.modules, "animal_mnist", raising=False)
    images, labels = read_embedded_arrays()
    assert "animal_mnist" not in sys.modules
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert np.array_equal(np.bincount(labels), np.full(10, 1000))
    # Black background: 0 is by far the commonest border value (silhouettes may touch the edge).
    border = np.concatenate([images[:, 0], images[:, -1], images[:, :, 0], images[:, :, -1]], axis=1)
    assert np.bincount(border.ravel()).argmax() == 0 and (border == 0).mean() > 0.9
    assert images.max() == 255


def test_padding_centres_the_silhouettes_on_a_background_canvas():
    images, labels = read_embedded_arrays()
    data = load_embedded(image_size=32, channels=1, max_images=None, seed=0)
    assert data.clean.shape == (10000, 1, 32, 32) and data.clean.dtype == torch.float32
    assert data.class_names == CLASS_NAMES and torch.equal(data.labels, torch.from_numpy(labels))
    expected = torch.from_numpy(images).float() / 127.5 - 1.0
    torch.testing.assert_close(data.clean[:, 0, 2:30, 2:30], expected, rtol=0, atol=0)
    ring = data.clean.clone()
    ring[:, :, 2:30, 2:30] = -1.0
    assert ring.eq(-1.0).all()


def test_rgb_copies_the_gray_channel_and_small_sizes_shrink():
    rgb = load_embedded(image_size=28, channels=3, max_images=20, seed=0)
    assert rgb.clean.shape == (20, 3, 28, 28)
    assert torch.equal(rgb.clean[:, 0], rgb.clean[:, 2])
    small = load_embedded(image_size=16, channels=1, max_images=20, seed=0)
    assert small.clean.shape == (20, 1, 16, 16)
    assert small.clean.min() >= -1.0 and small.clean.max() <= 1.0
    # Shrinking keeps the mean brightness (area-preserving antialiased resampling).
    same = load_embedded(image_size=28, channels=1, max_images=20, seed=0)
    torch.testing.assert_close(small.clean.mean(), same.clean.mean(), atol=0.02, rtol=0)


def test_max_images_is_a_seeded_subset_across_classes():
    first = load_embedded(image_size=32, channels=1, max_images=200, seed=3)
    again = load_embedded(image_size=32, channels=1, max_images=200, seed=3)
    other = load_embedded(image_size=32, channels=1, max_images=200, seed=4)
    assert len(first) == 200 and torch.equal(first.clean, again.clean)
    assert not torch.equal(first.labels, other.labels)
    assert len(first.labels.unique()) == 10


def test_missing_package_names_the_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        embedded_module.importlib.util,
        "find_spec",
        lambda name, *args: None if name == "animal_mnist" else real(name, *args),
    )
    with pytest.raises(DataError, match=r"pip install --no-deps animal-mnist==0\.4"):
        load_embedded(image_size=32, channels=1, max_images=None, seed=0)
