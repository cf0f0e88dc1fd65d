"""Data sources (embedded silhouettes, image folders, paired folders) and their splits."""

from ibmd_pipeline.data.config import PAIRED_SOURCES, DataConfig
from ibmd_pipeline.data.embedded import CLASS_NAMES, load_embedded, read_embedded_arrays
from ibmd_pipeline.data.folders import DataWarning, load_folder_images
from ibmd_pipeline.data.image_set import (
    SPLITS,
    DataError,
    ImageSet,
    select_indices,
    split_image_set,
    split_sizes,
)
from ibmd_pipeline.data.pairs import (
    build_pair_bundles,
    check_data_and_task,
    check_seed,
    corrupted_only,
    load_images,
    make_pair_bundle,
)
from ibmd_pipeline.data.safe_pickle import NumpyArrayUnpickler, load_numpy_pickle

__all__ = [
    "CLASS_NAMES",
    "PAIRED_SOURCES",
    "SPLITS",
    "DataConfig",
    "DataError",
    "DataWarning",
    "ImageSet",
    "NumpyArrayUnpickler",
    "build_pair_bundles",
    "check_data_and_task",
    "check_seed",
    "corrupted_only",
    "load_embedded",
    "load_folder_images",
    "load_images",
    "load_numpy_pickle",
    "make_pair_bundle",
    "read_embedded_arrays",
    "select_indices",
    "split_image_set",
    "split_sizes",
]
