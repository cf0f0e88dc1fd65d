"""An in-memory image set and its seeded subsetting and train/val/test split."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

# Independent random streams derived from the one project seed, so that changing e.g. the
# split sizes does not change which images a cap selects or the noise of a degradation.
STREAM_SELECT = 0
STREAM_SPLIT = 1
STREAM_DEGRADE = 2

SPLITS: tuple[str, ...] = ("train", "val", "test")


class DataError(ValueError):
    """The data source exists but cannot provide usable images (all unreadable, unmatched, too few)."""


def numpy_rng(seed: int, stream: int, *extra: int) -> np.random.Generator:
    """A numpy generator for one named stream of the project ``seed``."""
    return np.random.default_rng([seed, stream, *extra])


def torch_generator(seed: int, stream: int, *extra: int) -> torch.Generator:
    """A CPU ``torch.Generator`` for one named stream of the project ``seed``."""
    state = np.random.SeedSequence([seed, stream, *extra]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


@dataclass(frozen=True)
class ImageSet:
    """Images as float32 ``(N, C, H, W)`` in ``[-1, 1]``, with what the source knows about them.

    ``corrupted`` is set by paired sources only; ``labels`` (int64, ``(N,)``) indexes
    ``class_names`` when the source has classes.
    """

    clean: torch.Tensor
    corrupted: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    class_names: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if self.clean.ndim != 4:
            raise ValueError(f"clean images must be (N, C, H, W), got {tuple(self.clean.shape)}")
        if self.corrupted is not None and self.corrupted.shape != self.clean.shape:
            raise ValueError(
                f"corrupted images {tuple(self.corrupted.shape)} differ from clean {tuple(self.clean.shape)}"
            )
        if self.labels is not None and self.labels.shape != (len(self.clean),):
            raise ValueError(f"labels must be ({len(self.clean)},), got {tuple(self.labels.shape)}")

    def __len__(self) -> int:
        return len(self.clean)

    def subset(self, index: np.ndarray | torch.Tensor) -> ImageSet:
        """The images at ``index`` (in that order)."""
        index = torch.as_tensor(np.asarray(index), dtype=torch.long)
        return ImageSet(
            clean=self.clean[index],
            corrupted=None if self.corrupted is None else self.corrupted[index],
            labels=None if self.labels is None else self.labels[index],
            class_names=self.class_names,
        )


def select_indices(total: int, max_images: int | None, seed: int) -> np.ndarray:
    """Indices of the images to use: all of them, or a seeded random ``max_images`` in sorted order."""
    if max_images is None or max_images >= total:
        return np.arange(total)
    return np.sort(numpy_rng(seed, STREAM_SELECT).choice(total, size=max_images, replace=False))


def split_sizes(total: int, val_fraction: float, test_fraction: float) -> dict[str, int]:
    """Images per split: rounded shares, at least one each for val and test, the rest for train."""
    n_val = max(1, round(val_fraction * total))
    n_test = max(1, round(test_fraction * total))
    n_train = total - n_val - n_test
    if n_train < 1:
        raise DataError(
            f"{total} images cannot be split into train/val/test with val_fraction={val_fraction} and "
            f"test_fraction={test_fraction}: no training images would be left"
        )
    return {"train": n_train, "val": n_val, "test": n_test}


def split_image_set(
    images: ImageSet, val_fraction: float, test_fraction: float, seed: int
) -> dict[str, ImageSet]:
    """A seeded random partition into ``train``, ``val`` and ``test`` (deterministic in ``seed``).

    Each split keeps the random order of the permutation, so its first images are a fair sample
    (the embedded set is sorted by class).
    """
    sizes = split_sizes(len(images), val_fraction, test_fraction)
    order = numpy_rng(seed, STREAM_SPLIT).permutation(len(images))
    test, val, train = np.split(order, [sizes["test"], sizes["test"] + sizes["val"]])
    return {"train": images.subset(train), "val": images.subset(val), "test": images.subset(test)}
