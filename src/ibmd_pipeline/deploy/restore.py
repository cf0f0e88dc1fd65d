"""Restore a user's corrupted images (a folder of them, or one image) with a distilled student.

:func:`restore_images` takes a student checkpoint (``student.pt`` from the distill pipeline,
loaded with ``weights_only=True``) or its TorchScript export, either as the file itself or as
the catalog entry's folder (``data/06_models/student.pt/``, whose latest version it picks, as
Kedro would). It reads every image under the input folder (or the one input image), restores
it and writes a PNG under the output folder at the same relative path (``cats/01.jpg`` ->
``<output>/cats/01.png``; a single image ``01.jpg`` -> ``<output>/01.png``).

Reading: files are read as the data pipeline reads a folder (``data.folders``): hidden files
and folders are ignored; files that cannot be decoded (truncated, corrupt, not images) are
skipped, and one warning at the end names them. Images are converted to the model's channels
(grayscale or RGB).

Size: a student is trained at one image size, so every image is brought to that square size,
as the data pipeline prepared its training images: the shorter side is resized (bicubic) and
the centre cropped (``resize="fit"``, the default; one warning lists the images that were
resized), or images of another size are refused (``resize="error"``). For the 4x
super-resolution tasks, an image of a quarter of the size is taken as the low-resolution image
itself and enlarged by nearest-neighbour repetition, which is what the degradation did to the
training inputs. Outputs have the model's size.

Inpainting students: the task's centre mask is applied to every image and its hole filled with
N(0, 1) noise (``degradations.inpaint_center``, as the training inputs were made); whatever
the input holds there is discarded, and the known pixels of the output equal the input's.

Randomness: each image's noise (the hole noise, z, the posterior steps' noise) is drawn on the
CPU from a generator seeded by ``seed`` and the image's relative path. An image's result thus
depends on the seed and on nothing else about the run (batch size, order, other files, CPU or
GPU draws), and a checkpoint and its TorchScript export give the same images.

Safety: the output folder may not be the input folder or lie inside it, no output may land
inside the input folder (or replace the input image), and existing output files are refused
unless ``overwrite`` is set. All these checks run before anything is restored.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Literal

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor
from tqdm.auto import tqdm

from ibmd_pipeline.data.folders import UNREADABLE_ERRORS, DataWarning, list_files
from ibmd_pipeline.data.folders import _read as read_image
from ibmd_pipeline.degradations.config import SR_FACTOR, SUPER_RESOLUTION_TASKS
from ibmd_pipeline.degradations.ops import from_uint8, inpaint_center, to_uint8
from ibmd_pipeline.deploy.export import (
    StudentMetadata,
    eager_restore,
    is_torchscript_file,
    load_torchscript,
    student_metadata,
)
from ibmd_pipeline.distill.student import student_from_checkpoint
from ibmd_pipeline.engine.catalog_files import latest_version_file
from ibmd_pipeline.engine.checkpoint import CheckpointError, atomic_write, load_checkpoint
from ibmd_pipeline.engine.config import ConfigError
from ibmd_pipeline.engine.devices import select_device

__all__ = [
    "RestorationModel",
    "RestoreError",
    "RestoreReport",
    "image_seed",
    "load_restoration_model",
    "prepare_image",
    "resolve_model_file",
    "restore_images",
]

ResizePolicy = Literal["fit", "error"]
#: How many names a warning or error lists before summarising the rest.
SHOWN_NAMES = 20


class RestoreError(ValueError):
    """The folders or options of a restoration are unusable (nothing has been written)."""


# --------------------------------------------------------------------------------------------
# the model


@dataclass
class RestorationModel:
    """A student ready to restore: its metadata and ``run(inputs, nfe) -> x0`` on ``device``.

    ``inputs`` holds ``xT``, ``z``, ``mask`` and ``step_noise`` (the exported model's
    arguments, ``deploy.export``); ``source`` is ``"checkpoint"`` or ``"torchscript"``.
    """

    metadata: StudentMetadata
    device: torch.device
    source: str
    run: Callable[[dict[str, Tensor | None], int], Tensor]


def resolve_model_file(path: Path | str) -> Path:
    """The model file ``path`` names: the file itself, or for a catalog entry's folder
    (``data/06_models/student.pt/``) the file of its latest version.

    Raises :class:`CheckpointError` when there is no such file.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        try:
            return latest_version_file(path)
        except FileNotFoundError as err:
            raise CheckpointError(f"model folder {err}") from None
    if not path.is_file():
        raise CheckpointError(f"model file '{path}' does not exist")
    return path


def load_restoration_model(path: Path | str, device: torch.device | str = "cpu") -> RestorationModel:
    """Load a student checkpoint (EMA weights) or a TorchScript export on ``device``.

    ``path`` is the file or its catalog entry's folder (:func:`resolve_model_file`). Raises
    :class:`CheckpointError` for a missing or unreadable file and
    :class:`~ibmd_pipeline.teacher.model.CheckpointMismatchError` for a checkpoint that is not
    a student's (e.g. the teacher's).
    """
    path = resolve_model_file(path)
    device = torch.device(device)
    if is_torchscript_file(path):
        exported = load_torchscript(path, device)

        def run_exported(inputs: dict[str, Tensor | None], nfe: int) -> Tensor:
            return exported(inputs["xT"], inputs["z"], inputs["mask"], inputs["step_noise"], nfe)

        return RestorationModel(
            metadata=exported.metadata, device=device, source="torchscript", run=run_exported
        )
    checkpoint = load_checkpoint(path)
    student = student_from_checkpoint(checkpoint, use_ema=True, device=device)
    step = checkpoint.get("step")
    metadata = student_metadata(student, weights="ema", step=None if step is None else int(step))

    def run_checkpoint(inputs: dict[str, Tensor | None], nfe: int) -> Tensor:
        return eager_restore(student, inputs, nfe=nfe)

    return RestorationModel(metadata=metadata, device=device, source="checkpoint", run=run_checkpoint)


# --------------------------------------------------------------------------------------------
# images


def prepare_image(
    image: Image.Image, size: int, task_kind: str, resize: ResizePolicy = "fit"
) -> tuple[np.ndarray, bool]:
    """``(uint8 array (H, W[, C]), resized)``: ``image`` brought to ``size`` x ``size`` (module docstring).

    ``resized`` is True when the content was rescaled with bicubic fitting (or cropped).
    Raises :class:`RestoreError` for another size under ``resize="error"``.
    """
    if image.size == (size, size):
        return np.asarray(image), False
    if _is_low_resolution(image.size, size, task_kind):
        return np.asarray(image.resize((size, size), Image.Resampling.NEAREST)), False
    if resize == "error":
        raise RestoreError(_size_message(image.size, size, task_kind))
    return np.asarray(ImageOps.fit(image, (size, size), method=Image.Resampling.BICUBIC)), True


def _is_low_resolution(image_size: tuple[int, int], size: int, task_kind: str) -> bool:
    low = size // SR_FACTOR
    return task_kind in SUPER_RESOLUTION_TASKS and image_size == (low, low)


def _size_message(image_size: tuple[int, int], size: int, task_kind: str) -> str:
    low = size // SR_FACTOR
    sr_hint = f" (or {low}x{low}, the low-resolution input)" if task_kind in SUPER_RESOLUTION_TASKS else ""
    return (
        f"image is {image_size[0]}x{image_size[1]}, the model restores {size}x{size} images{sr_hint}; "
        "use resize 'fit' to resize and centre-crop it"
    )


def _check_sizes(plan: dict[str, tuple[Path, Path]], metadata: StudentMetadata) -> None:
    """For ``resize="error"``: refuse the first image of another size, reading headers only."""
    size = metadata.image_size
    for name, (path, _) in plan.items():
        try:
            with Image.open(path) as image:
                image_size = image.size
        except UNREADABLE_ERRORS:
            continue  # skipped with the warning later
        if image_size != (size, size) and not _is_low_resolution(image_size, size, metadata.task_kind):
            raise RestoreError(f"'{name}': {_size_message(image_size, size, metadata.task_kind)}")


def image_seed(seed: int, name: str) -> int:
    """The seed of one image's noise: a hash of the run's ``seed`` and the image's relative path."""
    digest = hashlib.sha256(f"{int(seed)}\0{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _image_noise(
    x: Tensor, name: str, seed: int, metadata: StudentMetadata, nfe: int
) -> dict[str, Tensor | None]:
    """One image's model inputs with all its noise drawn on the CPU: hole, z, step noise, in that order."""
    generator = torch.Generator().manual_seed(image_seed(seed, name))
    mask = None
    if metadata.needs_mask:
        degraded = inpaint_center(x, generator)
        x, mask = degraded.corrupted, degraded.mask
    z = torch.randn(x.shape, generator=generator) if metadata.noise else None
    step_noise = None
    if nfe > 1 and not metadata.deterministic:
        step_noise = torch.randn((nfe - 1, *x.shape), generator=generator)
    return {"xT": x, "z": z, "mask": mask, "step_noise": step_noise}


def _batch_inputs(
    items: Sequence[dict[str, Tensor | None]], device: torch.device
) -> dict[str, Tensor | None]:
    """Concatenate per-image inputs along the batch (dim 1 for step_noise) and move them to ``device``."""
    batch: dict[str, Tensor | None] = {}
    for key in ("xT", "z", "mask", "step_noise"):
        values = [item[key] for item in items]
        if values[0] is None:
            batch[key] = None
        else:
            batch[key] = torch.cat(values, dim=1 if key == "step_noise" else 0).to(device)
    return batch


def _save_png(array: np.ndarray, path: Path) -> None:
    image = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)
    atomic_write(path, lambda handle: image.save(handle, format="PNG"))


# --------------------------------------------------------------------------------------------
# folders


def _listed(names: Sequence[str]) -> str:
    shown = ", ".join(names[:SHOWN_NAMES])
    return shown + (f", ... ({len(names) - SHOWN_NAMES} more)" if len(names) > SHOWN_NAMES else "")


def _plan(
    inputs: Path, output_dir: Path, recursive: bool, overwrite: bool
) -> dict[str, tuple[Path, Path]]:
    """``{relative name: (input file, output PNG)}``, after every safety check (module docstring)."""
    if inputs.is_file():
        plan = _plan_image(inputs, output_dir)
    elif inputs.is_dir():
        plan = _plan_folder(inputs, output_dir, recursive)
    else:
        raise RestoreError(f"input '{inputs}' does not exist (give a folder of images or one image file)")
    existing = [str(output) for _, output in plan.values() if output.exists()]
    if existing and not overwrite:
        raise RestoreError(
            f"{len(existing)} output file(s) already exist: {_listed(existing)}; "
            "choose another output folder or allow overwriting them"
        )
    return plan


def _plan_image(image: Path, output_dir: Path) -> dict[str, tuple[Path, Path]]:
    """One input image: ``<output_dir>/<its name>.png``, which may not be the image itself."""
    output = output_dir / Path(image.name).with_suffix(".png")
    if output.resolve() == image.resolve():
        raise RestoreError(
            f"the output '{output}' would replace the input image '{image}'; choose another output folder"
        )
    return {image.name: (image, output)}


def _plan_folder(input_dir: Path, output_dir: Path, recursive: bool) -> dict[str, tuple[Path, Path]]:
    """Every file under ``input_dir``, mirrored under ``output_dir`` (which lies outside it)."""
    source = input_dir.resolve()
    target = output_dir.resolve()
    if target == source or target.is_relative_to(source):
        where = "the input folder" if target == source else "inside the input folder"
        raise RestoreError(
            f"the output folder '{output_dir}' is {where} '{input_dir}'; choose a folder outside it "
            "(inputs are never overwritten)"
        )
    try:
        files = list_files(input_dir, "input_dir")
    except ConfigError as err:
        raise RestoreError(f"input folder '{input_dir}' is empty: it contains no files") from err
    if not recursive:
        files = {name: path for name, path in files.items() if "/" not in name}
        if not files:
            raise RestoreError(
                f"input folder '{input_dir}' has no files directly inside it (its sub-folders are not read "
                "without recursion)"
            )
    plan: dict[str, tuple[Path, Path]] = {}
    claimed: dict[Path, str] = {}
    for name, path in files.items():
        output = output_dir / PurePosixPath(name).with_suffix(".png")
        if output in claimed:
            raise RestoreError(
                f"'{claimed[output]}' and '{name}' would both be written to '{output}'; rename one of them"
            )
        if output.resolve().is_relative_to(source):
            raise RestoreError(
                f"the output '{output}' of '{name}' would land inside the input folder '{input_dir}'"
            )
        claimed[output] = name
        plan[name] = (path, output)
    return plan


@dataclass(frozen=True)
class RestoreReport:
    """What :func:`restore_images` did.

    written: the PNGs, in input order; skipped: ``"name (error)"`` of unreadable files;
    resized: names of the images that were resized/cropped to the model's size; model_file: the
    model that restored them (the latest version's file when given a catalog entry's folder).
    """

    written: tuple[Path, ...]
    skipped: tuple[str, ...]
    resized: tuple[str, ...]
    metadata: StudentMetadata
    source: str
    nfe: int
    device: str
    model_file: Path


def _readable(
    plan: dict[str, tuple[Path, Path]],
    metadata: StudentMetadata,
    resize: ResizePolicy,
    skipped: list[str],
    resized: list[str],
) -> Iterator[tuple[str, Tensor | None, Path]]:
    """``(name, image (1, C, S, S) in [-1, 1], output path)`` per file, in order; None if unreadable."""
    mode = "L" if metadata.channels == 1 else "RGB"
    for name, (path, output) in plan.items():
        try:
            image = read_image(path, mode)
        except UNREADABLE_ERRORS as err:
            skipped.append(f"{name} ({type(err).__name__})")
            yield name, None, output
            continue
        array, was_resized = prepare_image(image, metadata.image_size, metadata.task_kind, resize)
        if was_resized:
            resized.append(name)
        pixels = array[None, ..., None] if array.ndim == 2 else array[None]
        yield name, from_uint8(pixels), output


def restore_images(
    model_path: Path | str,
    inputs: Path | str,
    output_dir: Path | str,
    *,
    batch_size: int = 16,
    device: str = "auto",
    nfe: int | None = None,
    seed: int = 0,
    recursive: bool = True,
    overwrite: bool = False,
    resize: ResizePolicy = "fit",
    progress: bool = True,
) -> RestoreReport:
    """Restore every readable image under ``inputs`` (a folder, or one image file) into PNGs under
    ``output_dir`` (module docstring).

    model_path: a student checkpoint (``.pt``) or its TorchScript export, or the catalog entry's
        folder of either (its latest version).
    batch_size: images per forward pass. device: ``auto``, ``cpu``, ``cuda``, ``cuda:N``.
    nfe: steps M in [1, N] (default: the student's N). seed: the noise seed (same seed, same
    images). recursive: also read sub-folders (mirrored in the output). overwrite: replace
    existing output files. resize: ``fit`` or ``error`` for images of another size.

    Raises :class:`RestoreError` (folders, options, sizes under ``resize="error"``) or
    :class:`CheckpointError` (model file) before anything is written.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise RestoreError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if resize not in ("fit", "error"):
        raise RestoreError(f"resize must be 'fit' or 'error', got {resize!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise RestoreError(f"seed must be an integer, got {seed!r}")
    try:
        torch_device = select_device(device, key="device")
    except ConfigError as err:
        raise RestoreError(err.message) from err
    inputs, output_dir = Path(inputs).expanduser(), Path(output_dir).expanduser()
    model_file = resolve_model_file(model_path)
    plan = _plan(inputs, output_dir, recursive, overwrite)
    model = load_restoration_model(model_file, torch_device)
    metadata = model.metadata
    steps = metadata.nfe if nfe is None else nfe
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= metadata.nfe:
        raise RestoreError(
            f"nfe must be an integer in [1, {metadata.nfe}] (the student's steps), got {nfe!r}"
        )
    if resize == "error":
        _check_sizes(plan, metadata)

    written: list[Path] = []
    skipped: list[str] = []
    resized: list[str] = []
    pending: list[tuple[dict[str, Tensor | None], Path]] = []

    def flush() -> None:
        if not pending:
            return
        inputs = _batch_inputs([item for item, _ in pending], torch_device)
        with torch.no_grad():
            restored = model.run(inputs, steps)
        for array, (_, output) in zip(to_uint8(restored), pending, strict=True):
            _save_png(array, output)
            written.append(output)
        pending.clear()

    with tqdm(total=len(plan), desc=f"restoring (NFE {steps})", unit="img", disable=not progress) as bar:
        for name, image, output in _readable(plan, metadata, resize, skipped, resized):
            if image is not None:
                pending.append((_image_noise(image, name, seed, metadata, steps), output))
                if len(pending) == batch_size:
                    flush()
                    bar.update(batch_size)
            else:
                bar.update(1)
        bar.update(len(pending))
        flush()

    if skipped:
        warnings.warn(
            f"skipped {len(skipped)} of {len(plan)} files under '{inputs}' that are not readable images "
            f"(truncated, corrupt or not images): {_listed(skipped)}",
            DataWarning,
            stacklevel=2,
        )
    if not written:
        raise RestoreError(
            f"none of the {len(plan)} files under '{inputs}' is a readable image: {_listed(skipped)}"
        )
    if resized:
        size = metadata.image_size
        warnings.warn(
            f"resized and centre-cropped {len(resized)} images to the model's {size}x{size}: "
            f"{_listed(resized)}",
            DataWarning,
            stacklevel=2,
        )
    return RestoreReport(
        written=tuple(written),
        skipped=tuple(skipped),
        resized=tuple(resized),
        metadata=metadata,
        source=model.source,
        nfe=steps,
        device=str(torch_device),
        model_file=model_file,
    )
