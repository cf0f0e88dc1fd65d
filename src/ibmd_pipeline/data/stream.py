"""Streamed data: images read from files batch by batch, degraded on the fly, never held whole.

The degrade pipeline writes, per split, a *manifest*: the source, the files of the split (relative
paths under a folder, or ``shard.tar::member`` names), their labels and the seed. A
:class:`StreamedPairs` dataset decodes one image at a time from it and degrades it with a
generator seeded from ``(seed, split, position in the split)``, so every image of every split is
the same whichever worker reads it, in whatever order; :class:`StepBatches` feeds a trainer the
batches its step asks for through a torch ``DataLoader`` whose workers read ahead. A
``paired_ab`` source streams the same way, except that each pix2pix file already holds both
sides: it is split as ``folders.split_ab`` splits it in memory, and nothing is degraded.

What is stored is the manifest (paths and int64 labels); the images stay uint8 files on disk.
Nothing here copies a split into memory, except :func:`materialise` for the few images a
validation batch or a preview needs.

The split and the ``max_images`` cap are drawn exactly as the in-memory path draws them
(``image_set.select_indices``, ``image_set.split_image_set``), so both paths see the same images
in the same order; a step's batch indices come from ``engine.training.epoch_batch_indices``, as
in the in-memory trainers. The one difference: the in-memory path degrades a whole split with
one generator, the streamed path each image with its own, so the only random degradation (the
N(0, 1) fill of ``inpaint_center``'s hole) differs between them. Training refills the hole with
fresh noise every batch, so training batches are the same on both paths.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import tarfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from ibmd_pipeline.data import remote
from ibmd_pipeline.data.config import STREAMED_SOURCES, DataConfig
from ibmd_pipeline.data.folders import (
    UNREADABLE_ERRORS,
    check_folder,
    class_labels,
    fit_image,
    list_files,
    split_ab,
)
from ibmd_pipeline.data.image_set import (
    SPLITS,
    STREAM_DEGRADE,
    STREAM_SPLIT,
    DataError,
    numpy_rng,
    select_indices,
    split_sizes,
    torch_generator,
)
from ibmd_pipeline.degradations.config import TaskConfig
from ibmd_pipeline.degradations.ops import degrade, from_uint8
from ibmd_pipeline.engine.config import ConfigError, config_to_dict, parse_config

#: The key of a pair bundle that makes it a streamed bundle (its value: the manifest).
STREAM_KEY = "stream"
#: Separates a tar shard from the member inside it in a manifest entry.
TAR_SEPARATOR = remote.TAR_SEPARATOR
TAR_SUFFIXES = remote.TAR_SUFFIXES


# --------------------------------------------------------------------------- the manifest


def _tar_members(root: Path) -> list[str]:
    """``shard.tar::member`` for every regular, non-hidden member of every ``.tar`` under ``root``."""
    if root.is_file():
        shards = {root.name: root}
        root = root.parent
    else:
        shards = {
            name: path for name, path in list_files(root, "data.path").items() if name.endswith(TAR_SUFFIXES)
        }
    if not shards:
        raise ConfigError("data.path", f"'{root}' holds no .tar shard")
    entries = []
    for name, path in sorted(shards.items()):
        try:
            with tarfile.open(path) as shard:
                members = [m.name for m in shard.getmembers() if m.isfile()]
        except (OSError, tarfile.TarError) as err:
            raise DataError(f"cannot read tar shard '{path}': {err}") from err
        entries += [
            f"{name}{TAR_SEPARATOR}{member}"
            for member in sorted(members)
            if not any(part.startswith(".") for part in PurePosixPath(member).parts)
        ]
    if not entries:
        raise DataError(f"the .tar shards under '{root}' hold no files")
    return entries


def list_entries(config: DataConfig) -> tuple[str, list[str], dict[str, list[int]]]:
    """``(root, entries, ranges)``: the folder the entries are relative to, every file, sorted, and
    for the tar members of an object store their ``[offset, size]`` in the shard (``data.remote``).

    Nothing is decoded: a large folder is listed in seconds.
    """
    if config.path is None:
        raise ConfigError("data.path", f"is required for a streamed source, got source '{config.source}'")
    if remote.is_url(config.path) and config.source in ("folder", "tar"):
        if config.source == "tar":
            return remote.list_tar_entries(config.path, config.storage_options)
        root = remote.check_folder(config.path, "data.path", config.storage_options)
        return root, remote.list_files(root, "data.path", config.storage_options), {}
    if config.source == "tar":
        root = Path(config.path).expanduser()
        if not root.exists():
            raise ConfigError("data.path", f"'{root}' does not exist")
        entries = _tar_members(root)
        return str(root if root.is_dir() else root.parent), entries, {}
    if config.source not in STREAMED_SOURCES:
        raise ConfigError(
            "data.stream",
            f"streams sources {', '.join(map(repr, STREAMED_SOURCES))} only, got source '{config.source}'",
        )
    root = check_folder(config.path, "data.path")
    return str(root), list(list_files(root, "data.path")), {}


def _label_name(entry: str) -> str:
    """The path that class folders are read from: the member of a tar entry, else the entry."""
    return entry.split(TAR_SEPARATOR, 1)[1] if TAR_SEPARATOR in entry else entry


def build_manifests(data: DataConfig, task: TaskConfig, seed: int) -> dict[str, dict[str, Any]]:
    """One manifest per split, drawn as the in-memory path draws its split (see the module notes)."""
    root, entries, ranges = list_entries(data)
    keep = select_indices(len(entries), data.max_images, seed)
    entries = [entries[i] for i in keep]
    labels, class_names = class_labels([_label_name(entry) for entry in entries])
    sizes = split_sizes(len(entries), data.val_fraction, data.test_fraction)
    order = numpy_rng(seed, STREAM_SPLIT).permutation(len(entries))
    parts = np.split(order, [sizes["test"], sizes["test"] + sizes["val"]])
    by_split = dict(zip(("test", "val", "train"), parts, strict=True))
    bundles = {}
    for split_index, split in enumerate(SPLITS):
        index = by_split[split]
        manifest: dict[str, Any] = {
            "root": root,
            "files": [entries[i] for i in index],
            "data": config_to_dict(data),
            "task": config_to_dict(task),
            "seed": seed,
            "split": split,
            "split_index": split_index,
        }
        if ranges:  # tar members in an object store: read by byte range
            manifest["ranges"] = [ranges[entries[i]] for i in index]
        split_labels = None if labels is None else labels[torch.as_tensor(index)]
        bundles[split] = _bundle(manifest, split_labels, class_names)
    return bundles


def _bundle(
    manifest: dict[str, Any], labels: torch.Tensor | None, class_names: tuple[str, ...]
) -> dict[str, Any]:
    """A streamed pair bundle: the manifest plus the plain values of an in-memory bundle."""
    bundle: dict[str, Any] = {
        STREAM_KEY: manifest,
        "task": manifest["task"],
        "class_names": list(class_names),
        "image_size": manifest["data"]["image_size"],
        "channels": manifest["data"]["channels"],
        "split": manifest["split"],
    }
    if labels is not None:
        bundle["labels"] = labels
    return bundle


def is_streamed(bundle: Mapping[str, Any]) -> bool:
    """Whether ``bundle`` is a streamed bundle (a manifest) rather than images in memory."""
    return STREAM_KEY in bundle


def streams(config: DataConfig) -> bool:
    """Whether ``config`` asks for the streamed path (``data.stream``; ``auto``: large folder/tar sources)."""
    if config.stream != "auto":
        return bool(config.stream)
    if config.source == "tar":
        return True
    if config.source not in STREAMED_SOURCES:
        return False
    if remote.is_url(config.path):
        return True  # only the streamed path reads an object store
    if config.max_images is not None and config.max_images < config.stream_min_images:
        return False
    # Count up to the threshold only: a large folder is not listed twice.
    root = check_folder(str(config.path), "data.path")
    files = (
        path
        for path in root.rglob("*")
        if path.is_file() and not any(part.startswith(".") for part in path.relative_to(root).parts)
    )
    return sum(1 for _ in itertools.islice(files, config.stream_min_images)) >= config.stream_min_images


# --------------------------------------------------------------------------- reading one image


_OPEN_SHARDS: dict[tuple[int, str], tarfile.TarFile] = {}


def _open_shard(path: str) -> tarfile.TarFile:
    """The open shard ``path`` of this process (a worker never shares a file offset with another)."""
    key = (os.getpid(), path)
    if key not in _OPEN_SHARDS:
        _OPEN_SHARDS[key] = tarfile.open(path)
    return _OPEN_SHARDS[key]


def read_entry(
    root: str,
    entry: str,
    mode: str,
    storage_options: Mapping[str, Any] | None = None,
    byte_range: list[int] | None = None,
) -> Image.Image:
    """Decode one manifest entry; an unreadable image or shard is a :class:`DataError` naming it.

    A ``root`` in an object store is read through ``data.remote`` (a tar member by ``byte_range``).
    """
    if remote.is_url(root):
        return remote.read_entry(root, entry, mode, storage_options, byte_range)
    if TAR_SEPARATOR in entry:
        shard, member = entry.split(TAR_SEPARATOR, 1)
        where = f"'{member}' in tar shard '{Path(root) / shard}'"
        try:
            handle = _open_shard(str(Path(root) / shard)).extractfile(member)
            if handle is None:
                raise DataError(f"{where} is not a regular file")
            with handle, Image.open(handle) as image:
                image.load()
                return image.convert(mode)
        except (KeyError, tarfile.TarError, *UNREADABLE_ERRORS) as err:
            raise DataError(f"cannot read image {where}: {type(err).__name__}: {err}") from err
    path = Path(root) / entry
    try:
        with Image.open(path) as image:
            image.load()  # decode now: a truncated file fails here, not later
            return image.convert(mode)
    except UNREADABLE_ERRORS as err:
        raise DataError(f"cannot read image '{path}': {type(err).__name__}: {err}") from err


# --------------------------------------------------------------------------- datasets


@dataclass(frozen=True)
class _Manifest:
    root: str
    files: tuple[str, ...]
    image_size: int
    channels: int
    resize: str
    small_images: str
    workers: int
    prefetch: int
    task: TaskConfig
    seed: int
    split_index: int
    source: str
    direction: str
    corrupted_resample: str
    storage_options: dict[str, Any] | None = None
    ranges: tuple[list[int], ...] | None = None


def _manifest(bundle: Mapping[str, Any]) -> _Manifest:
    if not is_streamed(bundle):
        raise ValueError("not a streamed bundle: it has no manifest")
    raw = bundle[STREAM_KEY]
    return _Manifest(
        root=str(raw["root"]),
        files=tuple(raw["files"]),
        image_size=int(raw["data"]["image_size"]),
        channels=int(raw["data"]["channels"]),
        resize=str(raw["data"]["resize"]),
        small_images=str(raw["data"].get("small_images", "upscale")),
        workers=int(raw["data"].get("workers", 0)),
        prefetch=int(raw["data"].get("prefetch", 2)),
        task=parse_config(TaskConfig, raw["task"], "task"),
        seed=int(raw["seed"]),
        split_index=int(raw["split_index"]),
        source=str(raw["data"].get("source", "folder")),
        direction=str(raw["data"].get("direction", "a_to_b")),
        corrupted_resample=str(raw["data"].get("corrupted_resample", "same")),
        storage_options=raw["data"].get("storage_options"),
        ranges=tuple(raw["ranges"]) if "ranges" in raw else None,
    )


class StreamedPairs(Dataset):
    """The images of one split's manifest, decoded and degraded one at a time.

    A ``paired_ab`` manifest lists pix2pix side-by-side files: each is split into its clean and
    corrupted halves as the in-memory reader splits it (``data.direction``), and nothing is
    degraded.

    ``targets=False`` makes the distillation's dataset: its items hold the corrupted image (and
    the inpainting mask) and nothing else; the clean image (or half) is read only to be degraded
    (or split off) and never leaves :meth:`__getitem__`. Items carry their ``index`` so a
    consumer can check that a batch is the one it asked for.
    """

    def __init__(self, bundle: Mapping[str, Any], *, targets: bool = True):
        self.manifest = _manifest(bundle)
        self.targets = targets
        self.dtype = torch.get_default_dtype()
        if remote.is_url(self.manifest.root):  # a missing bucket or credential fails before any training
            remote.check_reachable(self.manifest.root, self.manifest.storage_options)

    def __len__(self) -> int:
        return len(self.manifest.files)

    def fingerprint(self) -> str:
        """A short hash of what the items are made of (files, sizes, task, seed): a working
        checkpoint is never resumed on other data."""
        m = self.manifest
        described = [
            m.root,
            m.files,
            m.image_size,
            m.channels,
            m.resize,
            config_to_dict(m.task),
            m.seed,
            m.split_index,
        ]
        if m.source == "paired_ab":  # added only here: other sources keep their fingerprints
            described += [m.source, m.direction, m.corrupted_resample]
        return hashlib.sha256(json.dumps(described).encode()).hexdigest()[:16]

    def _fit(self, image: Image.Image, index: int, nearest: bool = False) -> torch.Tensor:
        """``image`` of file ``index`` resized as the in-memory path resizes it, ``(1, C, H, W)``."""
        m = self.manifest
        if m.small_images == "error" and min(image.size) < m.image_size:
            per_half = " per half" if m.source == "paired_ab" else ""
            raise DataError(
                f"image '{m.files[index]}' under '{m.root}' is {image.size[0]}x{image.size[1]}{per_half}, "
                f"smaller than data.image_size={m.image_size}; set data.small_images: upscale to enlarge "
                "such images"
            )
        array = np.array(fit_image(image, m.image_size, m.resize, nearest))  # a writable copy for torch
        return from_uint8((array[..., None] if array.ndim == 2 else array)[None])

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        m = self.manifest
        byte_range = None if m.ranges is None else m.ranges[index]
        image = read_entry(
            m.root, m.files[index], "L" if m.channels == 1 else "RGB", m.storage_options, byte_range
        )
        item = {"index": torch.tensor(index)}
        if m.source == "paired_ab":
            # A plain join: the root may be a URL, which Path would mangle.
            clean_half, corrupted_half = split_ab(image, m.direction, f"{m.root}/{m.files[index]}")
            if self.targets:
                item["clean"] = self._fit(clean_half, index)[0].to(self.dtype)
            nearest = m.corrupted_resample == "nearest"
            item["corrupted"] = self._fit(corrupted_half, index, nearest)[0].to(self.dtype)
            return item
        clean = self._fit(image, index)
        if self.targets:
            item["clean"] = clean[0].to(self.dtype)
        degraded = degrade(clean, m.task, torch_generator(m.seed, STREAM_DEGRADE, m.split_index, index))
        item["corrupted"] = degraded.corrupted[0].to(self.dtype)
        if degraded.mask is not None:
            item["mask"] = degraded.mask[0].to(self.dtype)
        return item


def loader_options(dataset: StreamedPairs, device: torch.device | str) -> dict[str, Any]:
    """``StepBatches`` keyword arguments: ``data.workers``, ``data.prefetch``, pinned memory on CUDA."""
    return {
        "workers": dataset.manifest.workers,
        "prefetch": dataset.manifest.prefetch,
        "pin_memory": torch.device(device).type == "cuda",
    }


def materialise(dataset: StreamedPairs, indices: range | list[int]) -> dict[str, torch.Tensor]:
    """The items ``indices`` of ``dataset`` stacked in memory: for a validation batch or a preview."""
    items = [dataset[i] for i in indices]
    return {key: torch.stack([item[key] for item in items]) for key in items[0]}


def in_memory_head(bundle: Mapping[str, Any], count: int | None) -> dict[str, Any]:
    """A pair bundle in memory, as the in-memory path writes it, of a streamed bundle's first
    ``count`` images (all when None); an in-memory bundle is returned as it is.

    For the few images a preview grid or an evaluation set needs; ``count`` bounds the memory.
    """
    if not is_streamed(bundle):
        return dict(bundle)
    dataset = StreamedPairs(bundle)
    total = len(dataset) if count is None else min(count, len(dataset))
    head = {key: value for key, value in bundle.items() if key not in (STREAM_KEY, "labels")}
    head.update({k: v for k, v in materialise(dataset, range(total)).items() if k != "index"})
    if "labels" in bundle:
        head["labels"] = bundle["labels"][:total]
    return head


# --------------------------------------------------------------------------- batches by step


class _PlanSampler(Sampler[list[int]]):
    """Yields the batches ``plan(step)`` lists, step after step from ``start`` to ``steps``."""

    def __init__(self, plan: Callable[[int], list[torch.Tensor]], start: int, steps: int):
        self.plan, self.start, self.steps = plan, start, steps

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.start, self.steps):
            for indices in self.plan(step):
                yield indices.tolist()


class StepBatches:
    """Batches of a :class:`StreamedPairs` in the order a trainer's steps ask for them.

    ``plan(step)`` lists, for one step, the index tensors of the batches this rank reads in it
    (a pure function of the step, e.g. ``split_global_batch(epoch_batch_indices(...), ctx)``:
    each rank a disjoint part of each global batch, as a ``DistributedSampler`` would shard it,
    but fixed by the step so that a resumed run reads the same batches). A ``DataLoader`` with
    ``workers`` processes reads ``prefetch`` batches ahead of the step. :meth:`get` returns the
    next batch, checks that it is the one planned, and restarts the reader when a step is
    skipped or repeated (a resume).
    """

    def __init__(
        self,
        dataset: StreamedPairs,
        plan: Callable[[int], list[torch.Tensor]],
        steps: int,
        *,
        workers: int = 0,
        prefetch: int = 2,
        pin_memory: bool = False,
    ):
        self.dataset, self.plan, self.steps = dataset, plan, steps
        self.workers, self.prefetch, self.pin_memory = workers, prefetch, pin_memory
        self._iterator: Iterator[dict[str, torch.Tensor]] | None = None
        self._next: tuple[int, int] | None = None  # (step, position) the iterator yields next
        self._planned: tuple[int, list[torch.Tensor]] | None = None  # the current step's plan

    def _restart(self, step: int) -> None:
        loader = DataLoader(
            self.dataset,
            batch_sampler=_PlanSampler(self.plan, step, self.steps),
            num_workers=self.workers,
            prefetch_factor=self.prefetch if self.workers else None,
            pin_memory=self.pin_memory,
        )
        self._iterator = iter(loader)
        self._next = (step, 0)

    def get(self, step: int, position: int = 0) -> dict[str, torch.Tensor]:
        """Batch ``position`` of step ``step`` (positions of a step are read in order)."""
        if self._iterator is None or self._next != (step, position):
            if position != 0:
                raise ValueError(f"step {step} must be read from its first batch, got position {position}")
            self._restart(step)
        assert self._iterator is not None
        batch = next(self._iterator)
        if self._planned is None or self._planned[0] != step:
            self._planned = (step, self.plan(step))
        planned = self._planned[1]
        expected = planned[position]
        if not torch.equal(batch["index"], expected.to(batch["index"].dtype)):
            raise RuntimeError(f"the loader yielded another batch than step {step} planned")
        self._next = (step, position + 1) if position + 1 < len(planned) else (step + 1, 0)
        return batch
