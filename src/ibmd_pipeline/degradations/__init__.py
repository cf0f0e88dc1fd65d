"""The paper's degradations: what turns a clean image x0 into the corrupted image xT."""

from ibmd_pipeline.degradations.config import (
    SR_FACTOR,
    SUPER_RESOLUTION_TASKS,
    SYNTHETIC_TASKS,
    TaskConfig,
    check_image_size,
)
from ibmd_pipeline.degradations.ops import (
    Degraded,
    center_mask,
    degrade,
    from_uint8,
    inpaint_center,
    jpeg_compress,
    sketch_edges,
    sr4x_bicubic,
    sr4x_pool,
    to_uint8,
)

__all__ = [
    "SR_FACTOR",
    "SUPER_RESOLUTION_TASKS",
    "SYNTHETIC_TASKS",
    "Degraded",
    "TaskConfig",
    "center_mask",
    "check_image_size",
    "degrade",
    "from_uint8",
    "inpaint_center",
    "jpeg_compress",
    "sketch_edges",
    "sr4x_bicubic",
    "sr4x_pool",
    "to_uint8",
]
