"""Unpickle numpy arrays without executing anything else.

Some registry packages ship their data as pickled numpy arrays. A plain ``pickle.load`` would run
whatever callable the file names; :class:`NumpyArrayUnpickler` resolves only the handful of
globals that numpy's own ``ndarray.__reduce__`` emits and refuses every other one.
"""

from __future__ import annotations

import importlib
import pickle
from collections.abc import Callable
from typing import IO, Any

import numpy as np


def _reconstruct() -> Callable[..., np.ndarray]:
    # numpy 2 moved numpy.core to numpy._core and warns on the old name; resolve it directly.
    try:
        module = importlib.import_module("numpy._core.multiarray")
    except ImportError:  # numpy < 2
        module = importlib.import_module("numpy.core.multiarray")
    return module._reconstruct


#: (module, name) pairs a pickled ndarray refers to (protocols 2-4), for numpy 1.x and 2.x writers.
ALLOWED_GLOBALS: dict[tuple[str, str], Callable[[], Any]] = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy", "ndarray"): lambda: np.ndarray,
    ("numpy", "dtype"): lambda: np.dtype,
}


class NumpyArrayUnpickler(pickle.Unpickler):
    """An unpickler that can rebuild numpy arrays and nothing else."""

    def find_class(self, module: str, name: str) -> Any:
        resolve = ALLOWED_GLOBALS.get((module, name))
        if resolve is None:
            raise pickle.UnpicklingError(
                f"refusing to unpickle global '{module}.{name}': only numpy array reconstruction is allowed"
            )
        return resolve()


def load_numpy_pickle(handle: IO[bytes]) -> np.ndarray:
    """Read one pickled numpy array from ``handle``; anything but a plain ndarray is an error.

    Object arrays are refused too: their elements would be arbitrary Python objects.
    """
    value = NumpyArrayUnpickler(handle).load()
    if type(value) is not np.ndarray:
        raise pickle.UnpicklingError(f"expected a numpy array, found {type(value).__name__}")
    if value.dtype.hasobject:
        raise pickle.UnpicklingError("refusing a numpy array of Python objects")
    return value
