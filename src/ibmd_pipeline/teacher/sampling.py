"""Restoring images with a trained teacher, and the columns of its sample grid.

Sampling is ``bridges.samplers.sample`` (docs/method.md sec. 3) run in chunks, on the device,
from a seeded generator; for inpainting the known pixels are reset from ``xT`` at every step.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from ibmd_pipeline.bridges.samplers import sample
from ibmd_pipeline.bridges.schedules import BridgeSchedule
from ibmd_pipeline.engine.devices import autocast_context
from ibmd_pipeline.networks.predictors import X0Predictor

__all__ = ["restore", "sample_grid_columns"]


def restore(
    predictor: X0Predictor,
    schedule: BridgeSchedule,
    corrupted: Tensor,
    *,
    nfe: int,
    mode: Literal["ancestral", "deterministic"] = "ancestral",
    mask: Tensor | None = None,
    seed: int = 0,
    batch_size: int = 256,
    device: torch.device | str | None = None,
    bf16: bool = False,
    progress: bool = False,
) -> Tensor:
    """Teacher samples ``x0`` for each corrupted image ``xT`` (CPU float32, like ``corrupted``).

    nfe: network evaluations (1 = the teacher's posterior mean E[x0 | xT]).
    mask: (N, 1, H, W), 1 = missing pixel: known pixels are reset from ``xT`` at every step.
    seed: the sampler's noise stream (the same seed gives the same samples).
    batch_size: images per network call. device: where to run (default: the predictor's).
    bf16: bfloat16 autocast for the network (CPU too); the sampler's arithmetic stays float32.
    """
    if device is None:
        device = next(predictor.parameters()).device
    device = torch.device(device)
    generator = torch.Generator().manual_seed(seed)
    outputs = []
    for start in range(0, corrupted.shape[0], batch_size):
        part = slice(start, start + batch_size)
        xT = corrupted[part].to(device, torch.float32)
        part_mask = None if mask is None else mask[part].to(device, torch.float32)
        with autocast_context(device, bf16, allow_cpu=True):
            x0 = sample(
                predictor, xT, schedule, nfe, mode=mode, mask=part_mask, generator=generator,
                progress=progress,
            )
        outputs.append(x0.float().cpu())
    return torch.cat(outputs)


def sample_grid_columns(
    predictor: X0Predictor,
    schedule: BridgeSchedule,
    pairs: Mapping[str, Any],
    *,
    nfes: Sequence[int],
    mode: Literal["ancestral", "deterministic"] = "ancestral",
    n_examples: int = 8,
    seed: int = 0,
    device: torch.device | str | None = None,
) -> list[Tensor]:
    """Columns ``[corrupted, restored at each NFE ..., clean]`` for the first ``n_examples`` pairs.

    Every NFE column starts from the same seed, so columns differ by the sampler only.
    """
    corrupted = torch.as_tensor(pairs["corrupted"])[:n_examples].float()
    mask = pairs.get("mask")
    mask = None if mask is None else torch.as_tensor(mask)[:n_examples].float()
    restored = [
        restore(predictor, schedule, corrupted, nfe=nfe, mode=mode, mask=mask, seed=seed, device=device)
        for nfe in nfes
    ]
    return [corrupted, *restored, torch.as_tensor(pairs["clean"])[:n_examples].float()]
