"""ADM-style UNet (Dhariwal & Nichol 2021), the backbone of the I2SB and DDBM teachers.

The network maps an image-shaped input and a per-sample noise level to an image-shaped
output, ``UNet(config)(x, noise_level) -> (B, out_channels, H, W)``. It knows nothing about
schedules: the predictors (``networks.predictors``) choose what the noise level is (I2SB's
step index in [0, 1000), EDM's ``c_noise``...) and how the output is read.

Architecture: a sinusoidal noise-level embedding and a two-layer MLP; residual blocks with
GroupNorm, SiLU and the embedding injected as a FiLM scale/shift; multi-head self-attention at
the configured feature-map sizes and always in the middle; strided-conv (or residual) down and
nearest (or residual) up sampling; skip connections from every encoder block; zero-initialised
output convolutions in every residual branch and in the head, so a fresh network outputs 0.

The parameter names follow ADM's layout (``input_blocks.{i}.{j}``, ``middle_block``,
``output_blocks``, ``out``, ``in_layers``/``emb_layers``/``out_layers``, ``qkv``/``proj_out``
with ADM's "legacy" head order), so a state_dict of the ADM 256x256 model that I2SB fine-tunes
maps onto :func:`unet_preset` ``"adm256"`` with its prefix stripped.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ibmd_pipeline.engine.config import ConfigError, parse_config, require

PresetName = Literal["tiny", "cpu", "adm256"]


@dataclass(frozen=True)
class UNetConfig:
    """Shape of an ADM UNet (the defaults are the ``cpu`` preset for 32x32 gray images).

    image_size: side of the square training images; sets which feature-map sizes exist.
        Inputs of other sizes work if their sides are divisible by ``2**(len(channel_mult)-1)``.
    in_channels / out_channels: image channels in and out (the predictor concatenates x_t,
        optionally xT and the generator's noise z on the input side).
    model_channels: base width; level ``i`` has ``model_channels * channel_mult[i]`` channels.
    channel_mult: one multiplier per resolution level; ``len(channel_mult) - 1`` halvings.
    num_res_blocks: residual blocks per level in the encoder (the decoder has one more).
    attention_resolutions: feature-map sides (e.g. ``(32, 16, 8)`` at 256x256) that get a
        self-attention block after each residual block; the middle block always has one.
    num_heads: attention heads, used when ``num_head_channels`` is -1.
    num_head_channels: channels per head (> 0 overrides ``num_heads``), ADM's choice at 256.
    dropout: dropout rate inside residual blocks, in [0, 1).
    use_scale_shift_norm: inject the embedding as ``norm(h) * (1 + scale) + shift`` (FiLM)
        rather than adding it before the norm.
    resblock_updown: down/up-sample with residual blocks (ADM 256) instead of a strided conv /
        nearest-neighbour upsampling followed by a conv.
    norm_groups: GroupNorm groups; must divide ``model_channels`` (then it divides every width
        in the network, skip concatenations included). ADM uses 32.
    use_checkpoint: recompute block activations in the backward pass (gradient checkpointing),
        trading ~30% more compute for much less memory; for large models on accelerators.
    """

    image_size: int = 32
    in_channels: int = 1
    out_channels: int = 1
    model_channels: int = 16
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 1
    attention_resolutions: tuple[int, ...] = (8,)
    num_heads: int = 1
    num_head_channels: int = 32
    dropout: float = 0.0
    use_scale_shift_norm: bool = True
    resblock_updown: bool = False
    norm_groups: int = 8
    use_checkpoint: bool = False

    def validate(self, key: str) -> None:
        prefix = f"{key}." if key else ""
        require(len(self.channel_mult) >= 1, f"{prefix}channel_mult", "needs at least one level")
        for i, mult in enumerate(self.channel_mult):
            require(mult >= 1, f"{prefix}channel_mult[{i}]", f"must be >= 1, got {mult}")
        factor = 2 ** (len(self.channel_mult) - 1)
        require(
            self.image_size >= factor and self.image_size % factor == 0,
            f"{prefix}image_size",
            f"must be a positive multiple of 2**(len(channel_mult)-1) = {factor}, got {self.image_size}",
        )
        require(self.in_channels >= 1, f"{prefix}in_channels", f"must be >= 1, got {self.in_channels}")
        require(self.out_channels >= 1, f"{prefix}out_channels", f"must be >= 1, got {self.out_channels}")
        require(
            self.model_channels >= 1, f"{prefix}model_channels", f"must be >= 1, got {self.model_channels}"
        )
        require(
            self.num_res_blocks >= 1, f"{prefix}num_res_blocks", f"must be >= 1, got {self.num_res_blocks}"
        )
        sizes = self.feature_sizes
        for i, res in enumerate(self.attention_resolutions):
            require(
                res in sizes,
                f"{prefix}attention_resolutions[{i}]",
                f"{res} is not a feature-map size of this network; allowed: {', '.join(map(str, sizes))}",
            )
        require(0.0 <= self.dropout < 1.0, f"{prefix}dropout", f"must be in [0, 1), got {self.dropout}")
        require(
            self.norm_groups >= 1 and self.model_channels % self.norm_groups == 0,
            f"{prefix}norm_groups",
            f"must be >= 1 and divide model_channels={self.model_channels}, got {self.norm_groups}",
        )
        if self.num_head_channels == -1:
            require(self.num_heads >= 1, f"{prefix}num_heads", f"must be >= 1, got {self.num_heads}")
        else:
            require(
                self.num_head_channels >= 1,
                f"{prefix}num_head_channels",
                f"must be >= 1 or -1 (then num_heads is used), got {self.num_head_channels}",
            )
        # Attention widths: every attended level plus the middle block.
        attended = {self.level_channels[-1]}
        attended.update(
            self.level_channels[level]
            for level, size in enumerate(sizes)
            if size in self.attention_resolutions
        )
        for channels in sorted(attended):
            if self.num_head_channels > 0:
                require(
                    channels % self.num_head_channels == 0,
                    f"{prefix}num_head_channels",
                    f"must divide every attention width ({sorted(attended)}), got {self.num_head_channels}",
                )
            else:
                require(
                    channels % self.num_heads == 0,
                    f"{prefix}num_heads",
                    f"must divide every attention width ({sorted(attended)}), got {self.num_heads}",
                )

    @property
    def feature_sizes(self) -> tuple[int, ...]:
        """Feature-map side at each level, for ``image_size`` inputs (e.g. 32, 16, 8)."""
        return tuple(self.image_size // 2**level for level in range(len(self.channel_mult)))

    @property
    def level_channels(self) -> tuple[int, ...]:
        """Channels at each level."""
        return tuple(self.model_channels * mult for mult in self.channel_mult)

    def heads_for(self, channels: int) -> int:
        """Number of attention heads for a block of ``channels`` channels."""
        return channels // self.num_head_channels if self.num_head_channels > 0 else self.num_heads


def unet_preset(name: PresetName, *, image_size: int, in_channels: int, out_channels: int) -> UNetConfig:
    """A named UNet shape for ``image_size`` inputs.

    ``tiny``: ~0.11M parameters, for tests: widths 16/16/16, one residual block per level,
        attention only in the middle block (a forward at 32x32 takes milliseconds).
    ``cpu``: ~1.1M parameters, the default for laptops (image_size a multiple of 8). Widths
        16/32/64/64 at sides 32/16/8/4 for 32x32 inputs: the parameters sit at the low
        resolutions, where they cost little, while the 32x32 level, which dominates CPU time,
        stays thin; one residual block per level; attention at side image_size/4 and in the
        middle block. Measured fwd+bwd at batch 64, 1x32x32, 2 threads: about 2.3x faster
        than widths 32/64/64 at the same parameter count. channels_last was slower on CPU.
    ``adm256``: the ADM 256x256 model that the I2SB teachers fine-tune (model_channels 256,
        channel_mult (1, 1, 2, 2, 4, 4), 2 residual blocks, attention at sides 32, 16 and 8
        for 256 inputs, 64 channels per head, residual up/down sampling, scale-shift norm;
        ~550M parameters). At other sizes the attention levels stay the three lowest ones.
    """
    if name == "tiny":
        config = UNetConfig(
            image_size=image_size,
            in_channels=in_channels,
            out_channels=out_channels,
            model_channels=16,
            channel_mult=(1, 1, 1),
            num_res_blocks=1,
            attention_resolutions=(),
            num_head_channels=16,
            norm_groups=8,
        )
    elif name == "cpu":
        config = UNetConfig(
            image_size=image_size,
            in_channels=in_channels,
            out_channels=out_channels,
            model_channels=16,
            channel_mult=(1, 2, 4, 4),
            num_res_blocks=1,
            attention_resolutions=(image_size // 4,),
            num_head_channels=32,
            norm_groups=8,
        )
    elif name == "adm256":
        config = UNetConfig(
            image_size=image_size,
            in_channels=in_channels,
            out_channels=out_channels,
            model_channels=256,
            channel_mult=(1, 1, 2, 2, 4, 4),
            num_res_blocks=2,
            attention_resolutions=(image_size // 8, image_size // 16, image_size // 32),
            num_head_channels=64,
            use_scale_shift_norm=True,
            resblock_updown=True,
            norm_groups=32,
        )
    else:
        raise ConfigError("model.preset", f"got {name!r}; allowed values: 'tiny', 'cpu', 'adm256'")
    config.validate("model")
    return config


def unet_from_config_dict(mapping: Mapping[str, Any], key: str = "model") -> UNet:
    """Rebuild a UNet from the plain config dict stored in a checkpoint (``config_to_dict``)."""
    return UNet(parse_config(UNetConfig, mapping, key))


def noise_level_embedding(noise_level: Tensor, dim: int, max_period: float = 10_000.0) -> Tensor:
    """Sinusoidal embedding ``[cos(c * f_k), sin(c * f_k)]`` with ``f_k`` from 1 down to 1/max_period.

    The geometric frequency ladder resolves noise levels of any scale, from EDM's
    ``c_noise = ln(sigma)/4`` (order 1) to I2SB's step index (up to 1000). Computed in float32
    even under autocast: in bfloat16, ``c * f`` for c ~ 1000 would lose the low digits. The
    frequencies are rounded in ADM's order (guided-diffusion ``nn.timestep_embedding``), so an
    imported ADM network sees exactly its own embedding; when ``dim / 2`` is a power of two
    (every preset) the division is exact and the order makes no difference.
    """
    half = dim // 2
    with torch.autocast(noise_level.device.type, enabled=False):
        ladder = torch.arange(half, device=noise_level.device, dtype=torch.float32)
        freqs = torch.exp(-math.log(max_period) * ladder / half)
        args = noise_level.float()[:, None] * freqs[None, :]
        embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
        if dim % 2:
            embedding = F.pad(embedding, (0, 1))
    return embedding


def _zero(module: nn.Module) -> nn.Module:
    """Zero a module's parameters (ADM initialises every residual branch's last layer to 0)."""
    for parameter in module.parameters():
        nn.init.zeros_(parameter)
    return module


class _Block(nn.Module):
    """A layer of the UNet trunk; ``forward(x, emb)`` ignores ``emb`` where it has no use."""

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError


class _Sequence(nn.Sequential):
    """ADM's ``TimestepEmbedSequential``: passes the embedding to the blocks that take it."""

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:  # type: ignore[override]
        for layer in self:
            x = layer(x, emb) if isinstance(layer, _Block) else layer(x)
        return x


class Downsample(nn.Module):
    """Halve the resolution with a stride-2 3x3 convolution."""

    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """Double the resolution by nearest-neighbour repetition followed by a 3x3 convolution."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class ResBlock(_Block):
    """GroupNorm-SiLU-conv, embedding injection, GroupNorm-SiLU-dropout-conv(zero), plus skip.

    ``resample`` ``"down"``/``"up"`` resamples both branches in the middle of the block (ADM's
    ``resblock_updown``: 2x2 average pooling / nearest-neighbour upsampling).
    """

    def __init__(
        self,
        channels: int,
        out_channels: int,
        emb_channels: int,
        config: UNetConfig,
        resample: Literal["none", "down", "up"] = "none",
    ):
        super().__init__()
        groups = config.norm_groups
        self.use_scale_shift_norm = config.use_scale_shift_norm
        self.use_checkpoint = config.use_checkpoint
        self.resample = resample
        self.in_layers = nn.Sequential(
            nn.GroupNorm(groups, channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1)
        )
        emb_out = 2 * out_channels if self.use_scale_shift_norm else out_channels
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, emb_out))
        self.out_layers = nn.Sequential(
            nn.GroupNorm(groups, out_channels),
            nn.SiLU(),
            nn.Dropout(config.dropout),
            _zero(nn.Conv2d(out_channels, out_channels, 3, padding=1)),
        )
        self.skip_connection: nn.Module = (
            nn.Identity() if channels == out_channels else nn.Conv2d(channels, out_channels, 1)
        )

    def _resample(self, x: Tensor) -> Tensor:
        if self.resample == "down":
            return F.avg_pool2d(x, 2)
        if self.resample == "up":
            return F.interpolate(x, scale_factor=2.0, mode="nearest")
        return x

    def _forward(self, x: Tensor, emb: Tensor) -> Tensor:
        norm, act, conv = self.in_layers
        h = act(norm(x))
        h, x = self._resample(h), self._resample(x)
        h = conv(h)
        emb_out = self.emb_layers(emb).to(h.dtype)[:, :, None, None]
        out_norm, out_act, dropout, out_conv = self.out_layers
        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)
            h = out_norm(h) * (1 + scale) + shift
        else:
            h = out_norm(h + emb_out)
        h = out_conv(dropout(out_act(h)))
        return self.skip_connection(x) + h

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        if self.use_checkpoint and torch.is_grad_enabled():
            return checkpoint(self._forward, x, emb, use_reentrant=False)
        return self._forward(x, emb)


class AttentionBlock(_Block):
    """Multi-head self-attention over all positions of a feature map, with a zero-init output.

    The fused ``qkv`` projection is laid out head by head (``[q_0, k_0, v_0, q_1, ...]``), ADM's
    legacy order, so ADM weights keep their meaning.
    """

    def __init__(self, channels: int, num_heads: int, config: UNetConfig):
        super().__init__()
        self.num_heads = num_heads
        self.use_checkpoint = config.use_checkpoint
        self.norm = nn.GroupNorm(config.norm_groups, channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = _zero(nn.Conv1d(channels, channels, 1))

    def _forward(self, x: Tensor) -> Tensor:
        b, c, height, width = x.shape
        tokens = x.reshape(b, c, height * width)
        qkv = self.qkv(self.norm(tokens))
        head_channels = c // self.num_heads
        # (B, heads, 3*ch, T) -> q, k, v of (B, heads, T, ch): the fused SDPA kernel's layout.
        q, k, v = qkv.reshape(b, self.num_heads, 3 * head_channels, height * width).split(
            head_channels, dim=2
        )
        out = F.scaled_dot_product_attention(q.transpose(2, 3), k.transpose(2, 3), v.transpose(2, 3))
        out = out.transpose(2, 3).reshape(b, c, height * width)
        return (tokens + self.proj_out(out)).reshape(b, c, height, width)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        if self.use_checkpoint and torch.is_grad_enabled():
            return checkpoint(self._forward, x, use_reentrant=False)
        return self._forward(x)


class StateDictMismatchError(ValueError):
    """A state_dict was built for a differently shaped network; the message says what differs."""


class UNet(nn.Module):
    """ADM UNet: ``forward(x (B, in_channels, H, W), noise_level (B,)) -> (B, out_channels, H, W)``.

    ``config`` holds the shape (and changes when :meth:`add_input_channels` grows the input).
    """

    def __init__(self, config: UNetConfig):
        super().__init__()
        config.validate("model")
        self.config = config
        emb_channels = 4 * config.model_channels
        self.time_embed = nn.Sequential(
            nn.Linear(config.model_channels, emb_channels), nn.SiLU(), nn.Linear(emb_channels, emb_channels)
        )

        sizes = config.feature_sizes
        channels = config.level_channels[0]
        self.input_blocks = nn.ModuleList([_Sequence(nn.Conv2d(config.in_channels, channels, 3, padding=1))])
        skip_channels = [channels]
        for level, width in enumerate(config.level_channels):
            for _ in range(config.num_res_blocks):
                layers: list[nn.Module] = [ResBlock(channels, width, emb_channels, config)]
                channels = width
                if sizes[level] in config.attention_resolutions:
                    layers.append(AttentionBlock(channels, config.heads_for(channels), config))
                self.input_blocks.append(_Sequence(*layers))
                skip_channels.append(channels)
            if level != len(sizes) - 1:
                down = (
                    ResBlock(channels, channels, emb_channels, config, resample="down")
                    if config.resblock_updown
                    else Downsample(channels)
                )
                self.input_blocks.append(_Sequence(down))
                skip_channels.append(channels)

        self.middle_block = _Sequence(
            ResBlock(channels, channels, emb_channels, config),
            AttentionBlock(channels, config.heads_for(channels), config),
            ResBlock(channels, channels, emb_channels, config),
        )

        self.output_blocks = nn.ModuleList()
        for level in reversed(range(len(sizes))):
            width = config.level_channels[level]
            for i in range(config.num_res_blocks + 1):
                layers = [ResBlock(channels + skip_channels.pop(), width, emb_channels, config)]
                channels = width
                if sizes[level] in config.attention_resolutions:
                    layers.append(AttentionBlock(channels, config.heads_for(channels), config))
                if level and i == config.num_res_blocks:
                    layers.append(
                        ResBlock(channels, channels, emb_channels, config, resample="up")
                        if config.resblock_updown
                        else Upsample(channels)
                    )
                self.output_blocks.append(_Sequence(*layers))

        self.out = nn.Sequential(
            nn.GroupNorm(config.norm_groups, channels),
            nn.SiLU(),
            _zero(nn.Conv2d(channels, config.out_channels, 3, padding=1)),
        )

    @property
    def input_conv(self) -> nn.Conv2d:
        """The first convolution, the only layer that sees the input channels."""
        conv = self.input_blocks[0][0]
        assert isinstance(conv, nn.Conv2d)
        return conv

    def forward(self, x: Tensor, noise_level: Tensor | float) -> Tensor:
        """Apply the network.

        x: (B, in_channels, H, W), H and W divisible by ``2**(len(channel_mult)-1)``.
        noise_level: (B,) (or a scalar / one value, broadcast to the batch), any float scale.
        """
        self._check_input(x)
        level = torch.as_tensor(noise_level, device=x.device)
        if level.numel() == 1:
            level = level.reshape(1).expand(x.shape[0])
        elif level.numel() == x.shape[0]:
            level = level.reshape(x.shape[0])
        else:
            raise ValueError(
                f"noise_level must hold 1 or B={x.shape[0]} values, got shape {tuple(level.shape)}"
            )
        return self.forward_from_embedding(x, noise_level_embedding(level, self.config.model_channels))

    def forward_from_embedding(self, x: Tensor, embedding: Tensor) -> Tensor:
        """The network after the sinusoidal embedding of the noise level (:meth:`forward` without its checks).

        embedding: ``noise_level_embedding(noise_level, config.model_channels)``, (B, model_channels).
        An export precomputes the embeddings of its fixed step times and traces this method: the
        embedding's ``arange`` would otherwise fix the device in the traced graph.
        """
        # The embedding is float32 (see noise_level_embedding); a float64 network takes it in its own dtype.
        emb = self.time_embed(embedding.to(self.time_embed[0].weight.dtype))
        skips = []
        h = x
        for block in self.input_blocks:
            h = block(h, emb)
            skips.append(h)
        h = self.middle_block(h, emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
        return self.out(h)

    def _check_input(self, x: Tensor) -> None:
        config = self.config
        if x.ndim != 4 or x.shape[1] != config.in_channels:
            raise ValueError(
                f"UNet expects input of shape (B, {config.in_channels}, H, W), got {tuple(x.shape)}"
            )
        factor = 2 ** (len(config.channel_mult) - 1)
        if x.shape[2] % factor or x.shape[3] % factor:
            raise ValueError(
                f"UNet with {len(config.channel_mult)} levels needs H and W divisible by {factor}, "
                f"got {x.shape[2]}x{x.shape[3]}"
            )

    @torch.no_grad()
    def add_input_channels(self, n: int) -> None:
        """Append ``n`` zero-initialised input channels to the first convolution, in place.

        The new channels' weights are zero, so the output is unchanged whatever they carry
        until training moves those weights (docs/method.md sec. 4.3, IBMD App. B: the generator's noise z
        enters this way, so at initialisation the generator equals the teacher). Build
        optimizers and EMAs after calling this: the first conv's weight is a new Parameter.
        """
        if n < 1:
            raise ValueError(f"add_input_channels needs n >= 1, got {n}")
        conv = self.input_conv
        old = conv.weight
        extra = old.new_zeros(old.shape[0], n, *old.shape[2:])
        conv.weight = nn.Parameter(torch.cat([old, extra], dim=1), requires_grad=old.requires_grad)
        conv.in_channels += n
        self.config = dataclasses.replace(self.config, in_channels=self.config.in_channels + n)

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):
        """``nn.Module.load_state_dict`` with a message that names what differs when strict."""
        if strict:
            problem = describe_state_dict_mismatch(self, state_dict)
            if problem:
                raise StateDictMismatchError(problem)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)


def describe_state_dict_mismatch(network: UNet, state_dict: Mapping[str, Any], limit: int = 5) -> str | None:
    """Say how ``state_dict`` differs from ``network``'s own (None when keys and shapes agree).

    The first and last convolutions give the input/output channels and the base width, so
    the usual mistakes (conditional vs unconditional teacher, added noise channels, another
    preset) are named in those terms before the raw key lists.
    """
    own = network.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    shapes = [
        (k, tuple(own[k].shape), tuple(state_dict[k].shape))
        for k in own
        if k in state_dict and tuple(own[k].shape) != tuple(getattr(state_dict[k], "shape", ()))
    ]
    if not (missing or unexpected or shapes):
        return None

    facts = []
    first, last = "input_blocks.0.0.weight", "out.2.weight"
    if first in state_dict and first in own:
        theirs, mine = tuple(state_dict[first].shape), tuple(own[first].shape)
        if theirs[1] != mine[1]:
            facts.append(f"in_channels: network {mine[1]}, state_dict {theirs[1]}")
        if theirs[0] != mine[0]:
            facts.append(
                f"base width (model_channels * channel_mult[0]): network {mine[0]}, state_dict {theirs[0]}"
            )
    if last in state_dict and last in own and state_dict[last].shape[0] != own[last].shape[0]:
        facts.append(f"out_channels: network {own[last].shape[0]}, state_dict {state_dict[last].shape[0]}")

    def listed(items: list[Any]) -> str:
        more = f" ... ({len(items)} in all)" if len(items) > limit else ""
        return ", ".join(str(i) for i in items[:limit]) + more

    parts = ["state_dict does not fit this UNet"]
    if facts:
        parts.append("; ".join(facts))
    if shapes:
        parts.append(
            "shape mismatches: " + listed([f"{k} network {a} vs state_dict {b}" for k, a, b in shapes])
        )
    if missing:
        parts.append(
            "missing keys (another depth, attention placement or up/down style?): " + listed(missing)
        )
    if unexpected:
        parts.append("unexpected keys: " + listed(unexpected))
    return "; ".join(parts)


def count_parameters(module: nn.Module) -> int:
    """Number of scalar parameters."""
    return sum(p.numel() for p in module.parameters())
