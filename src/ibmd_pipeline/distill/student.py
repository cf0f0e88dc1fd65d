"""Loading a distilled student from its checkpoint, for evaluation and restoration.

A student checkpoint is a plain dict (``weights_only``-loadable)::

    {"kind": "student",
     "config": {"teacher": <the teacher checkpoint's config>, "teacher_version": str | None,
                "distill": DistillConfig dict, "resolved": the decided auto settings,
                "generator": {"unet": UNetConfig dict (incl. the z channels), "noise": bool,
                              "noise_channels": int, "nfe": N, "time_input": bool,
                              "conditional": bool, "grid": [t_N, ..., t_0], "multistep_mode": str},
                "task": TaskConfig dict, "image_size": int, "channels": int},
     "models": {"generator": UNet state_dict, "aux": UNet state_dict},
     "ema": {"generator": UNet state_dict},
     "step": int (generator updates), "history": [records: losses; validation]}

The config alone rebuilds the generator: the schedule comes from ``config["teacher"]["bridge"]``
and the network from ``config["generator"]["unet"]``; no teacher weights are needed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ibmd_pipeline.bridges.schedules import BridgeConfig, BridgeSchedule, make_schedule
from ibmd_pipeline.distill.generator import BridgeGenerator
from ibmd_pipeline.engine.config import parse_config
from ibmd_pipeline.networks.predictors import X0Predictor
from ibmd_pipeline.networks.unet import StateDictMismatchError, UNet, UNetConfig
from ibmd_pipeline.teacher.model import CheckpointMismatchError, check_checkpoint_matches

__all__ = ["LoadedStudent", "student_from_checkpoint"]


@dataclass
class LoadedStudent:
    """A student rebuilt from its checkpoint: frozen, in eval mode, on ``device``."""

    generator: BridgeGenerator
    schedule: BridgeSchedule
    config: dict[str, Any]
    version: str | None
    device: torch.device

    @property
    def nfe(self) -> int:
        """Steps N the student was trained with (its default number of evaluations)."""
        return self.generator.nfe

    @property
    def noise(self) -> bool:
        """Whether the generator takes noise z."""
        return self.generator.noise

    @property
    def task_kind(self) -> str:
        return str(self.config.get("task", {}).get("kind"))

    @property
    def needs_mask(self) -> bool:
        """Whether :meth:`sample` needs the missing-pixel mask (inpainting)."""
        return self.task_kind == "inpaint_center"

    @torch.no_grad()
    def sample(
        self,
        xT: Tensor,
        *,
        nfe: int | None = None,
        mask: Tensor | None = None,
        generator: torch.Generator | None = None,
        batch_size: int | None = None,
    ) -> Tensor:
        """Restore ``xT`` (B, C, H, W) in [-1, 1] with ``nfe`` (<= N, default N) evaluations.

        ``generator`` drives z and the posterior-step noise, so equal seeds give equal
        samples. For inpainting, ``mask`` (B, 1, H, W), 1 = missing, is required: the known
        pixels are copied from ``xT``. ``batch_size``: images per network call (None = all
        at once). Returns x0 on ``xT``'s device.
        """
        if self.needs_mask and mask is None:
            raise ValueError("this inpainting student needs the mask (known pixels are copied from xT)")
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be >= 1 or None, got {batch_size}")
        chunk = batch_size or max(1, xT.shape[0])
        outputs = []
        for start in range(0, xT.shape[0], chunk):
            part = slice(start, start + chunk)
            x = xT[part].to(self.device, torch.float32)
            hole = None if mask is None else mask[part].to(self.device, torch.float32)
            outputs.append(self.generator(x, mask=hole, nfe=nfe, generator=generator).to(xT.device))
        return torch.cat(outputs)


def student_from_checkpoint(
    checkpoint: Mapping[str, Any],
    *,
    use_ema: bool = True,
    device: torch.device | str = "cpu",
    task_kind: str | None = None,
    image_size: int | None = None,
    channels: int | None = None,
) -> LoadedStudent:
    """Rebuild the student generator stored in ``checkpoint`` (see module docstring).

    ``use_ema``: the generator's EMA weights (the default, as the paper evaluates) or its raw
    weights. Passing ``task_kind``/``image_size``/``channels`` checks that the student fits the
    data; any mismatch, or a checkpoint that is not a student's (e.g. a teacher's), raises
    :class:`CheckpointMismatchError` before any network is built.
    """
    kind = checkpoint.get("kind")
    if kind != "student":
        hint = "; this is the teacher: pass the distill pipeline's student_model" if kind == "teacher" else ""
        raise CheckpointMismatchError(
            f"expected a student checkpoint (kind 'student'), got kind {kind!r}{hint}"
        )
    config = dict(checkpoint["config"])
    check_checkpoint_matches(
        config, what="student", task_kind=task_kind, image_size=image_size, channels=channels
    )
    teacher_config = config["teacher"]
    spec = config["generator"]
    bridge = parse_config(BridgeConfig, teacher_config["bridge"], "student checkpoint config.teacher.bridge")
    unet = parse_config(UNetConfig, spec["unet"], "student checkpoint config.generator.unet")
    schedule = make_schedule(bridge)
    predictor = X0Predictor(UNet(unet), schedule, conditional=bool(spec["conditional"]))
    generator = BridgeGenerator(predictor, nfe=int(spec["nfe"]), noise=bool(spec["noise"]))
    weights = checkpoint["ema" if use_ema else "models"]["generator"]
    try:
        generator.predictor.net.load_state_dict(weights)
    except StateDictMismatchError as err:  # weights of another network than the config describes
        raise CheckpointMismatchError(
            f"the student checkpoint's weights do not fit its network: {err}"
        ) from err
    device = torch.device(device)
    generator.to(device).eval().requires_grad_(False)
    return LoadedStudent(
        generator=generator,
        schedule=schedule,
        config=config,
        version=checkpoint.get("catalog_version"),
        device=device,
    )
