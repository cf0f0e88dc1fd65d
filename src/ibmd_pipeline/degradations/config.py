"""The restoration task: which degradation turns a clean image x0 into the corrupted xT.

``task`` is shared by every pipeline (the teacher, the student and the evaluation all need to
know what was done to the images), so its parameters live in ``conf/base/parameters.yml``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ibmd_pipeline.engine.config import ConfigError, require

TaskKind = Literal["sr4x_pool", "sr4x_bicubic", "jpeg", "inpaint_center", "sketch", "paired"]

#: Tasks whose corrupted image is computed from the clean one by :func:`degrade`.
SYNTHETIC_TASKS: tuple[str, ...] = ("sr4x_pool", "sr4x_bicubic", "jpeg", "inpaint_center", "sketch")
#: Tasks that shrink the image 4x and so need a side divisible by 4.
SUPER_RESOLUTION_TASKS: tuple[str, ...] = ("sr4x_pool", "sr4x_bicubic")
#: The super-resolution factor of the paper's "4x SR" tasks.
SR_FACTOR = 4
#: Tasks for which I2SB's own operators exist (``task.operators: i2sb``).
I2SB_OPERATOR_TASKS: tuple[str, ...] = ("sr4x_pool", "sr4x_bicubic", "jpeg", "inpaint_center")


@dataclass(frozen=True)
class TaskConfig:
    """The degradation of the paper's tasks (docs/method.md sec. 5-6).

    kind:
        ``sr4x_pool``: 4x4 average pooling, then nearest upsampling back to full size.
        ``sr4x_bicubic``: antialiased bicubic 4x downsampling, then nearest upsampling.
        ``jpeg``: a real JPEG encode/decode at ``jpeg_quality`` (paper: 5 and 10).
        ``inpaint_center``: the central square of half the side is missing; the bundle carries
        its mask and the hole is filled with N(0, 1) noise (as I2SB does).
        ``sketch``: a Canny edge map of the clean image, dark lines on white, for conditional
        translation (the paper's Edges->Handbags setting).
        ``paired``: the corrupted image is the source side of a paired data set
        (``data.source`` ``paired_ab`` or ``paired_folders``); nothing is synthesised.
    jpeg_quality: JPEG quality factor in [1, 95] (used by ``jpeg`` only).
    sketch_sigma: width in pixels of the Gaussian that Canny smooths with (``sketch`` only);
        larger values keep only the coarse outline.
    operators: whose implementation of the degradation: ``project`` (PIL-like antialiased
        bicubic with the low-resolution image clipped, libjpeg, the centred half-side square)
        or ``i2sb`` (I2SB's own operators, ``degradations/i2sb.py``: DDRM's bicubic matrix and
        differentiable JPEG, unclipped; for the students of imported I2SB teachers). ``i2sb``
        exists for the SR, JPEG and center-inpainting tasks; its JPEG needs RGB images.
    """

    kind: TaskKind = "sr4x_bicubic"
    jpeg_quality: int = 10
    sketch_sigma: float = 1.0
    operators: Literal["project", "i2sb"] = "project"

    def validate(self, key: str) -> None:
        prefix = f"{key}." if key else ""
        # PIL accepts up to 100, but above 95 libjpeg disables parts of its compression.
        require(
            1 <= self.jpeg_quality <= 95,
            f"{prefix}jpeg_quality",
            f"must be in [1, 95], got {self.jpeg_quality}",
        )
        require(
            0.0 < self.sketch_sigma <= 10.0,
            f"{prefix}sketch_sigma",
            f"must be in (0, 10], got {self.sketch_sigma}",
        )
        require(
            self.operators == "project" or self.kind in I2SB_OPERATOR_TASKS,
            f"{prefix}operators",
            f"'i2sb' exists for task.kind {', '.join(I2SB_OPERATOR_TASKS)}; got kind '{self.kind}'",
        )

    @property
    def has_mask(self) -> bool:
        """Whether the corrupted images come with a missing-pixel mask."""
        return self.kind == "inpaint_center"


def check_image_size(task: TaskConfig, image_size: int, key: str = "data.image_size") -> None:
    """Raise :class:`ConfigError` naming ``key`` if ``image_size`` cannot carry ``task``."""
    if task.kind == "jpeg" and task.operators == "i2sb" and image_size % 16:
        raise ConfigError(
            key,
            f"I2SB's JPEG (task.operators: i2sb) codes 16x16 macroblocks, so the image size must be "
            f"divisible by 16; got {image_size}",
        )
    if task.kind in SUPER_RESOLUTION_TASKS and image_size % SR_FACTOR != 0:
        raise ConfigError(
            key,
            f"task.kind '{task.kind}' downsamples {SR_FACTOR}x, so the image size must be divisible by "
            f"{SR_FACTOR}; got {image_size} (e.g. {image_size - image_size % SR_FACTOR} or "
            f"{image_size + SR_FACTOR - image_size % SR_FACTOR})",
        )
