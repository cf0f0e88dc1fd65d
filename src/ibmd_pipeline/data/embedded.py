"""The default data set: 10,000 animal silhouettes shipped by the ``animal-mnist`` package.

The package imports tensorflow on import, so it is never imported: its data files are located
with :func:`importlib.util.find_spec` (which, for a top-level package, only searches the path and
does not run ``__init__``) and unpickled with :class:`~ibmd_pipeline.data.safe_pickle.NumpyArrayUnpickler`.
"""

from __future__ import annotations

import gzip
import importlib.util
import pickle
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ibmd_pipeline.data.image_set import DataError, ImageSet, select_indices
from ibmd_pipeline.data.safe_pickle import load_numpy_pickle

PACKAGE = "animal_mnist"
INSTALL_HINT = "pip install --no-deps animal-mnist==0.4"
DATA_FILE = "data/Animal_MNIST/animal_data_version_3.gz"
LABEL_FILE = "data/Animal_MNIST/animal_label_version_3.gz"
#: Labels 0..9 in the package's order (alphabetical, as its description lists them).
CLASS_NAMES: tuple[str, ...] = (
    "Bear", "Bird", "Cat", "Cow", "Dog", "Elephant", "Giraffe", "Horse", "Sheep", "Zebra",
)  # fmt: skip
NATIVE_SIZE = 28
#: Silhouettes are white on black: 92% of all border pixels are 0 (the rest are silhouettes that
#: touch the edge, in about 40% of the images), so the canvas is padded with 0.
BACKGROUND = 0


def embedded_files() -> tuple[Path, Path]:
    """Paths of the package's image and label files, without importing the package."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            f"the embedded data set needs the '{PACKAGE}' package, which is not installed; "
            f"install it with: {INSTALL_HINT}"
        )
    root = Path(next(iter(spec.submodule_search_locations)))
    files = (root / DATA_FILE, root / LABEL_FILE)
    for path in files:
        if not path.is_file():
            raise DataError(
                f"'{path}' is missing from the '{PACKAGE}' package; reinstall it with: {INSTALL_HINT}"
            )
    return files


def _read(path: Path) -> np.ndarray:
    try:
        with gzip.open(path, "rb") as handle:
            return load_numpy_pickle(handle)
    except (OSError, EOFError, pickle.UnpicklingError) as err:
        raise DataError(f"cannot read '{path}': {err}") from err


def read_embedded_arrays() -> tuple[np.ndarray, np.ndarray]:
    """The raw images (10000, 28, 28) uint8 and labels (10000,) int64, checked for shape and range."""
    data_path, label_path = embedded_files()
    images, labels = _read(data_path), _read(label_path)
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (NATIVE_SIZE, NATIVE_SIZE):
        raise DataError(f"'{data_path}' holds {images.dtype} {images.shape}, expected uint8 (N, 28, 28)")
    if labels.shape != (len(images),) or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(
            f"'{label_path}' holds {labels.dtype} {labels.shape}, expected integers ({len(images)},)"
        )
    if labels.min() < 0 or labels.max() >= len(CLASS_NAMES):
        raise DataError(f"'{label_path}' has labels outside 0..{len(CLASS_NAMES) - 1}")
    return images, labels.astype(np.int64)


def fit_to_size(images: torch.Tensor, image_size: int, background: float) -> torch.Tensor:
    """Centre square images on a ``background`` canvas of ``image_size``, or shrink them to it.

    Padding keeps the silhouettes' pixels exact; for a smaller target the images are reduced
    with antialiased bilinear resampling (odd padding goes to the bottom/right).
    """
    size = images.shape[-1]
    if image_size >= size:
        before = (image_size - size) // 2
        after = image_size - size - before
        return F.pad(images, (before, after, before, after), value=background)
    return F.interpolate(
        images, size=(image_size, image_size), mode="bilinear", antialias=True, align_corners=False
    )


def load_embedded(image_size: int, channels: int, max_images: int | None, seed: int) -> ImageSet:
    """The animal silhouettes as an :class:`ImageSet` of ``image_size`` with ``channels`` channels."""
    images, labels = read_embedded_arrays()
    keep = select_indices(len(images), max_images, seed)
    clean = torch.from_numpy(images[keep]).float()[:, None] / 127.5 - 1.0
    clean = fit_to_size(clean, image_size, background=BACKGROUND / 127.5 - 1.0)
    if channels == 3:
        clean = clean.expand(-1, 3, -1, -1).contiguous()
    return ImageSet(clean=clean, labels=torch.from_numpy(labels[keep]), class_names=CLASS_NAMES)
