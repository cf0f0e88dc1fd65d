"""Images from a user's folder: plain, pix2pix "AB" pairs, or two folders matched by name.

Any file PIL can decode is an image; hidden files and folders (names starting with ``.``) are
ignored. Files that cannot be decoded (truncated, not images) are skipped with one warning that
counts them; images whose shorter side is below ``image_size`` are upscaled with one warning,
or are an error when ``data.small_images`` is ``error``. A seeded ``max_images`` cap is applied
to the file list before anything is decoded.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image, ImageOps

from ibmd_pipeline.data import remote
from ibmd_pipeline.data.config import DataConfig
from ibmd_pipeline.data.image_set import DataError, ImageSet, select_indices
from ibmd_pipeline.degradations.ops import from_uint8
from ibmd_pipeline.engine.config import ConfigError

# What PIL raises for files it cannot decode: unknown format (UnidentifiedImageError is an
# OSError), truncated data (OSError), corrupt headers (SyntaxError, ValueError), oversized images.
UNREADABLE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)
SHOWN_NAMES = 5


class DataWarning(UserWarning):
    """Some images of a folder were skipped or altered beyond the usual resize."""


@dataclass(frozen=True)
class _Item:
    """One example on disk: ``name`` is its path relative to the (clean) root, used for labels."""

    name: str
    path: Path
    corrupted_path: Path | None = None


def _few(names: list[str]) -> str:
    shown = ", ".join(names[:SHOWN_NAMES])
    return shown + (f", ... ({len(names) - SHOWN_NAMES} more)" if len(names) > SHOWN_NAMES else "")


def check_folder(path: str, key: str) -> Path:
    """``path`` as an existing local folder, or a :class:`ConfigError` naming ``key``."""
    if remote.is_url(path):
        raise ConfigError(
            key,
            f"'{path}' is in an object store, which only the streamed sources 'folder' and 'tar' read; "
            "set data.stream: true",
        )
    root = Path(path).expanduser()
    if not root.exists():
        raise ConfigError(key, f"folder '{root}' does not exist")
    if not root.is_dir():
        raise ConfigError(key, f"'{root}' is not a folder")
    return root


def list_files(root: Path, key: str) -> dict[str, Path]:
    """Every non-hidden file under ``root``, recursively, by POSIX path relative to ``root``, sorted."""
    files = {}
    for path in root.rglob("*"):
        relative = path.relative_to(root)
        if path.is_file() and not any(part.startswith(".") for part in relative.parts):
            files[relative.as_posix()] = path
    if not files:
        raise ConfigError(key, f"folder '{root}' contains no files")
    return dict(sorted(files.items()))


def class_labels(names: list[str]) -> tuple[torch.Tensor | None, tuple[str, ...]]:
    """Labels from the first folder of each relative path, if every image sits in a class folder."""
    if not names or any(len(PurePosixPath(name).parts) < 2 for name in names):
        return None, ()
    folders = [PurePosixPath(name).parts[0] for name in names]
    class_names = tuple(sorted(set(folders)))
    index = {name: i for i, name in enumerate(class_names)}
    return torch.tensor([index[f] for f in folders], dtype=torch.int64), class_names


def _read(path: Path, mode: str) -> Image.Image:
    with Image.open(path) as image:
        image.load()  # decode now: a truncated file fails here, not later
        return image.convert(mode)


def split_ab(image: Image.Image, direction: str, path: Path | str) -> tuple[Image.Image, Image.Image]:
    """``(clean, corrupted)``: the halves of the pix2pix side-by-side image read from ``path``.

    A (left) is the corrupted side for ``direction`` ``a_to_b``, B (right) for ``b_to_a``. An odd
    width has no two equal halves (the file is not an AB pair): a :class:`DataError` naming ``path``.
    """
    width, height = image.size
    if width % 2:
        raise DataError(
            f"pix2pix AB image '{path}' is {width}x{height}: an odd width cannot hold two halves of "
            "equal size side by side"
        )
    half = width // 2
    a_half, b_half = image.crop((0, 0, half, height)), image.crop((half, 0, width, height))
    return (b_half, a_half) if direction == "a_to_b" else (a_half, b_half)


def fit_image(image: Image.Image, size: int, resize: str, nearest: bool = False) -> np.ndarray:
    """``image`` as a ``size`` x ``size`` array, the way ``data.resize`` says (see :class:`DataConfig`).

    ``nearest`` resamples with the nearest neighbour instead (DDBM's normal maps).
    """
    if resize == "i2sb":  # torchvision Resize(size) + CenterCrop(size), as I2SB's ImageNet loader
        method = TF.InterpolationMode.NEAREST if nearest else TF.InterpolationMode.BILINEAR
        return np.asarray(TF.center_crop(TF.resize(image, size, interpolation=method), size))
    method = Image.Resampling.NEAREST if nearest else Image.Resampling.BICUBIC
    if resize == "ddbm":  # PIL resize to a square, as DDBM's datasets/aligned_dataset.py
        return np.asarray(image.resize((size, size), method))
    return np.asarray(ImageOps.fit(image, (size, size), method=method))


def _decode(items: list[_Item], config: DataConfig, root: Path) -> ImageSet:
    """Decode, check and resize ``items``; skip unreadable ones with a single warning."""
    mode = "L" if config.channels == 1 else "RGB"
    size = config.image_size
    clean, corrupted, names, unreadable, small = [], [], [], [], []
    for item in items:
        try:
            image = _read(item.path, mode)
            partner = _read(item.corrupted_path, mode) if item.corrupted_path is not None else None
        except UNREADABLE_ERRORS as err:
            unreadable.append(f"{item.name} ({type(err).__name__})")
            continue
        if config.source == "paired_ab":
            image, partner = split_ab(image, config.direction, item.path)
        views = [image] if partner is None else [image, partner]
        smallest = min(views, key=lambda view: min(view.size))
        if min(smallest.size) < size:
            if config.small_images == "error":
                culprit = item.corrupted_path if smallest is partner and item.corrupted_path else item.path
                raise DataError(
                    f"image '{culprit}' is {smallest.size[0]}x{smallest.size[1]}"
                    f"{' per half' if config.source == 'paired_ab' else ''}, smaller than "
                    f"data.image_size={size}; set data.small_images: upscale to enlarge such images"
                )
            small.append(item.name)
        nearest_partner = config.corrupted_resample == "nearest"
        fitted = [
            fit_image(view, size, config.resize, nearest=index == 1 and nearest_partner)
            for index, view in enumerate(views)
        ]
        clean.append(fitted[0])
        if partner is not None:
            corrupted.append(fitted[1])
        names.append(item.name)

    if unreadable:
        warnings.warn(
            f"skipped {len(unreadable)} of {len(items)} files under '{root}' that are not readable images "
            f"(truncated, corrupt or not images): {_few(unreadable)}",
            DataWarning,
            stacklevel=3,
        )
    if not names:
        raise DataError(
            f"none of the {len(items)} files under '{root}' is a readable image: {_few(unreadable)}"
        )
    if small:
        warnings.warn(
            f"upscaled {len(small)} images under '{root}' whose shorter side is below "
            f"data.image_size={size}: {_few(small)}",
            DataWarning,
            stacklevel=3,
        )

    def stack(arrays: list[np.ndarray]) -> torch.Tensor:
        batch = np.stack(arrays)
        return from_uint8(batch[..., None] if batch.ndim == 3 else batch)

    labels, class_names = class_labels(names)
    return ImageSet(
        clean=stack(clean),
        corrupted=stack(corrupted) if corrupted else None,
        labels=labels,
        class_names=class_names,
    )


def _paired_items(config: DataConfig) -> tuple[list[_Item], Path]:
    assert config.path is not None and config.corrupted_path is not None
    clean_root = check_folder(config.path, "data.path")
    corrupted_root = check_folder(config.corrupted_path, "data.corrupted_path")

    def by_stem(files: dict[str, Path], root: Path) -> dict[str, Path]:
        keyed: dict[str, Path] = {}
        for name, path in files.items():
            stem = PurePosixPath(name).with_suffix("").as_posix()
            if stem in keyed:
                raise DataError(
                    f"'{keyed[stem]}' and '{path}' under '{root}' have the same name; "
                    "pairs are matched by name"
                )
            keyed[stem] = path
        return keyed

    clean = by_stem(list_files(clean_root, "data.path"), clean_root)
    corrupted = by_stem(list_files(corrupted_root, "data.corrupted_path"), corrupted_root)
    matched = sorted(clean.keys() & corrupted.keys())
    unmatched = sorted(clean.keys() ^ corrupted.keys())
    if not matched:
        raise DataError(
            f"no file under '{clean_root}' has a namesake under '{corrupted_root}' "
            "(pairs are matched by relative path without the extension)"
        )
    if unmatched:
        warnings.warn(
            f"ignored {len(unmatched)} files without a partner in '{clean_root}' / '{corrupted_root}': "
            f"{_few(unmatched)}",
            DataWarning,
            stacklevel=3,
        )
    items = [
        _Item(
            name=clean[stem].relative_to(clean_root).as_posix(),
            path=clean[stem],
            corrupted_path=corrupted[stem],
        )
        for stem in matched
    ]
    return items, clean_root


def _suffix_items(config: DataConfig) -> tuple[list[_Item], Path]:
    """``paired_suffix``: ``name.ext`` and its corrupted partner ``name<suffix>.ext`` in one folder."""
    assert config.path is not None
    root = check_folder(config.path, "data.path")
    files = list_files(root, "data.path")
    by_stem = {PurePosixPath(name).with_suffix("").as_posix(): path for name, path in files.items()}
    suffix = config.corrupted_suffix
    partners = {stem[: -len(suffix)]: path for stem, path in by_stem.items() if stem.endswith(suffix)}
    items = [
        _Item(
            name=by_stem[stem].relative_to(root).as_posix(), path=by_stem[stem], corrupted_path=partners[stem]
        )
        for stem in sorted(partners)
        if stem in by_stem
    ]
    if not items:
        raise DataError(
            f"no image under '{root}' has a partner named '<name>{suffix}' (data.corrupted_suffix)"
        )
    used = {item.path for item in items} | {item.corrupted_path for item in items}
    ignored = sorted(name for name, path in files.items() if path not in used)
    if ignored:
        warnings.warn(
            f"ignored {len(ignored)} files under '{root}' that are neither an image with a '{suffix}' "
            f"partner nor such a partner: {_few(ignored)}",
            DataWarning,
            stacklevel=3,
        )
    return items, root


def check_sources(config: DataConfig) -> None:
    """Cheap checks of the configured folders (they exist), before anything is loaded."""
    if remote.is_url(config.path):  # the store answers (the listing checks a tar source's shards)
        if config.source == "folder":
            remote.check_folder(str(config.path), "data.path", config.storage_options)
        else:
            remote.check_reachable(str(config.path), config.storage_options)
    elif config.source == "tar":
        if config.path is not None and not Path(config.path).expanduser().exists():
            raise ConfigError("data.path", f"'{Path(config.path).expanduser()}' does not exist")
    elif config.path is not None:
        check_folder(config.path, "data.path")
    if config.corrupted_path is not None:
        check_folder(config.corrupted_path, "data.corrupted_path")


def load_folder_images(config: DataConfig, seed: int) -> ImageSet:
    """Images of a ``folder``, ``paired_ab`` or ``paired_folders`` source (see :class:`DataConfig`)."""
    if config.source == "paired_folders":
        items, root = _paired_items(config)
    elif config.source == "paired_suffix":
        items, root = _suffix_items(config)
    elif config.source in ("folder", "paired_ab"):
        assert config.path is not None
        root = check_folder(config.path, "data.path")
        items = [_Item(name=name, path=path) for name, path in list_files(root, "data.path").items()]
    else:
        raise ValueError(f"'{config.source}' is not a folder source")
    keep = select_indices(len(items), config.max_images, seed)
    return _decode([items[i] for i in keep], config, root)
