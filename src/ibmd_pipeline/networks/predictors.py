"""x0-prediction wrapper: the schedule's preconditioning around any raw network.

    x0_hat = c_skip(t) x_t + c_out(t) F(cat[c_in(t) x_t, xT (conditional), extra], c_noise(t))

(docs/method.md sec. 2.1-2.2; EDM-style preconditioning). The raw network is any module called as
``net(x, noise_level)`` with ``x`` (B, C_in, H, W) and ``noise_level`` (B,), returning an image
with the channels of ``x_t``. Conditional (DDBM) networks also see ``xT``, concatenated unscaled as
DDBM does; ``extra`` holds additional input channels such as a generator's noise ``z``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ibmd_pipeline.bridges.schedules import BridgeSchedule

__all__ = ["X0Predictor", "expected_in_channels"]


def expected_in_channels(net: nn.Module) -> int | None:
    """Input channel count the network declares (``net.in_channels`` or ``net.config.in_channels``)."""
    for source in (net, getattr(net, "config", None)):
        value = getattr(source, "in_channels", None)
        if isinstance(value, int):
            return value
    return None


def _batch_time(t: Tensor | float, x_t: Tensor) -> Tensor:
    t = torch.as_tensor(t, device=x_t.device)
    if t.ndim == 0:
        t = t.expand(x_t.shape[0])
    if t.shape != (x_t.shape[0],):
        raise ValueError(f"t must be a scalar or of shape ({x_t.shape[0]},), got {tuple(t.shape)}")
    return t if t.is_floating_point() else t.to(torch.float32)


def _per_sample(coef: Tensor, like: Tensor) -> Tensor:
    return coef.to(device=like.device, dtype=like.dtype).reshape((-1,) + (1,) * (like.ndim - 1))


class X0Predictor(nn.Module):
    """``D(x_t, t [, xT] [, extra]) -> x0_hat`` from a raw network and a bridge schedule.

    ``conditional=True`` feeds ``xT`` to the network (DDBM); otherwise ``xT`` is accepted and
    ignored (I2SB), so losses and samplers can always pass it. The state dict is the network's
    under the prefix ``net.``.
    """

    def __init__(self, net: nn.Module, schedule: BridgeSchedule, conditional: bool):
        super().__init__()
        if not isinstance(schedule, BridgeSchedule):
            raise TypeError(f"schedule must be a BridgeSchedule, got {type(schedule).__name__}")
        self.net = net
        self.schedule = schedule
        self.conditional = bool(conditional)

    def extra_repr(self) -> str:
        return f"schedule={self.schedule!r}, conditional={self.conditional}"

    def network_input(self, x_t: Tensor, c_in: Tensor, xT: Tensor | None, extra: Tensor | None) -> Tensor:
        """``cat([c_in x_t, xT (conditional), extra], dim=1)`` with shape checks that name each part."""
        parts = [_per_sample(c_in, x_t) * x_t]
        names = [f"x_t ({x_t.shape[1]})"]
        if self.conditional:
            if xT is None:
                raise ValueError("this predictor is conditional: pass xT (the corrupted image) as well")
            if xT.shape != x_t.shape:
                raise ValueError(f"xT of shape {tuple(xT.shape)} must match x_t of shape {tuple(x_t.shape)}")
            parts.append(xT.to(x_t.dtype))
            names.append(f"xT ({xT.shape[1]})")
        if extra is not None:
            if extra.shape[0] != x_t.shape[0] or extra.shape[2:] != x_t.shape[2:]:
                raise ValueError(
                    f"extra of shape {tuple(extra.shape)} must match x_t {tuple(x_t.shape)} "
                    "except in channels"
                )
            parts.append(extra.to(x_t.dtype))
            names.append(f"extra ({extra.shape[1]})")
        total = sum(p.shape[1] for p in parts)
        expected = expected_in_channels(self.net)
        if expected is not None and expected != total:
            raise ValueError(
                f"the network expects {expected} input channels, got {' + '.join(names)} = {total}; "
                f"check `conditional` (now {self.conditional}) and the extra input channels"
            )
        return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]

    def forward(
        self,
        x_t: Tensor,
        t: Tensor | float,
        xT: Tensor | None = None,
        extra: Tensor | None = None,
    ) -> Tensor:
        """``x0_hat = c_skip x_t + c_out net(cat[c_in x_t, xT?, extra?], c_noise)`` in ``x_t``'s dtype."""
        t = _batch_time(t, x_t)
        c_skip, c_out, c_in, c_noise = self.schedule.preconditioning(t)
        noise_level = c_noise.to(device=x_t.device, dtype=torch.float32)
        out = self.net(self.network_input(x_t, c_in, xT, extra), noise_level)
        if out.shape != x_t.shape:
            raise ValueError(
                f"the network returned shape {tuple(out.shape)}, expected that of x_t {tuple(x_t.shape)}"
            )
        # The output head may run in bf16 under autocast; the skip connection stays in x_t's precision.
        return _per_sample(c_skip, x_t) * x_t + _per_sample(c_out, x_t) * out.to(x_t.dtype)
