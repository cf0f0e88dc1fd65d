"""ADM (guided-diffusion ``UNetModel``) state dicts: their architecture, their weights as this project's UNet.

Both published teacher families run guided-diffusion's ``UNetModel`` (openai/guided-diffusion
``guided_diffusion/unet.py``): I2SB wraps it in ``Image256Net`` (NVlabs/I2SB ``i2sb/network.py``),
DDBM carries a copy with a concatenated condition (alexzhou907/DDBM ``ddbm/unet.py``). This
project's :class:`~ibmd_pipeline.networks.unet.UNet` keeps ADM's parameter names, so the weights
map one to one once three differences are handled:

- the original names attention by *downsample rate* (``attention_resolutions = 32,16,8`` at 256
  means rates 8, 16, 32); this project by *feature-map side* (32, 16, 8 at 256);
- attention's fused ``qkv`` projection is laid out head by head in ADM's "legacy" order, which
  this project uses, but q|k|v-major in DDBM's flash attention (and guided-diffusion's
  ``use_new_attention_order``): those rows are permuted here, exactly (no arithmetic);
- ADM normalises with ``GroupNorm(32)`` everywhere and its first level has ``channel_mult[0] = 1``
  in every published configuration.

:func:`infer_architecture` reads an :class:`AdmArchitecture` from the tensor shapes alone (only
the attention head width is not stored in the weights); :data:`PUBLISHED_ARCHITECTURES` restates
the configurations of the paper's teachers from the original scripts.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from ibmd_pipeline.networks.unet import UNet, UNetConfig, describe_state_dict_mismatch

__all__ = [
    "ADM_NORM_GROUPS",
    "PUBLISHED_ARCHITECTURES",
    "AdmArchitecture",
    "TeacherImportError",
    "convert_adm_state_dict",
    "infer_architecture",
    "qkv_major_to_head_major",
]

#: guided-diffusion's ``normalization(channels)`` is ``GroupNorm32(32, channels)``.
ADM_NORM_GROUPS = 32

AttentionOrder = Literal["head_major", "qkv_major"]


class TeacherImportError(ValueError):
    """An official checkpoint cannot be imported; the message names the keys or settings at fault."""


@dataclass(frozen=True)
class AdmArchitecture:
    """The shape of a guided-diffusion ``UNetModel``, in the original's own terms.

    attention_rates: downsample rates with self-attention (ADM's ``attention_ds``: 1 = full
        resolution); the middle block always has attention.
    attention_order: ``head_major`` (ADM's legacy ``QKVAttentionLegacy``) or ``qkv_major``
        (DDBM's flash attention, guided-diffusion's ``QKVAttention``).
    """

    image_size: int
    in_channels: int
    out_channels: int
    model_channels: int
    channel_mult: tuple[int, ...]
    num_res_blocks: int
    attention_rates: tuple[int, ...]
    num_head_channels: int
    resblock_updown: bool
    use_scale_shift_norm: bool
    attention_order: AttentionOrder = "head_major"

    def unet_config(self) -> UNetConfig:
        """This project's :class:`UNetConfig` of the same network (dropout 0: the teacher is frozen)."""
        if any(self.image_size % rate for rate in self.attention_rates):
            raise TeacherImportError(
                f"attention at downsample rates {self.attention_rates} does not fit image size "
                f"{self.image_size}"
            )
        config = UNetConfig(
            image_size=self.image_size,
            in_channels=self.in_channels,
            out_channels=self.out_channels,
            model_channels=self.model_channels,
            channel_mult=self.channel_mult,
            num_res_blocks=self.num_res_blocks,
            attention_resolutions=tuple(self.image_size // rate for rate in self.attention_rates),
            num_head_channels=self.num_head_channels,
            use_scale_shift_norm=self.use_scale_shift_norm,
            resblock_updown=self.resblock_updown,
            norm_groups=ADM_NORM_GROUPS,
        )
        try:
            config.validate("architecture")
        except ValueError as err:
            raise TeacherImportError(
                f"the checkpoint's network does not fit this project's UNet: {err}"
            ) from err
        return config


def _published(
    image_size: int,
    channels: int,
    mult: tuple[int, ...],
    blocks: int,
    order: AttentionOrder,
    conditional: bool,
) -> AdmArchitecture:
    # attention_resolutions "32,16,8" in every published script: rates image_size // res.
    return AdmArchitecture(
        image_size=image_size,
        in_channels=6 if conditional else 3,
        out_channels=3,
        model_channels=channels,
        channel_mult=mult,
        num_res_blocks=blocks,
        attention_rates=tuple(image_size // res for res in (32, 16, 8)),
        num_head_channels=64,
        resblock_updown=True,
        use_scale_shift_norm=True,
        attention_order=order,
    )


#: The paper's teachers, restated from their scripts: I2SB's ADM-256 (``i2sb/ckpt_util.py``
#: ``create_argparser``: 256 channels, 2 blocks, heads of 64, residual up/down, learn_sigma off;
#: ``--cond-x1`` doubles the input), DDBM's Edges->Handbags 64 and DIODE 256 (``args.sh``,
#: ``sample_ddbm.sh``: 192 channels and 3 blocks at 64, 256 and 2 at 256, ``condition_mode
#: concat``, flash attention).
PUBLISHED_ARCHITECTURES: dict[str, AdmArchitecture] = {
    "i2sb_adm256": _published(256, 256, (1, 1, 2, 2, 4, 4), 2, "head_major", conditional=False),
    "i2sb_adm256_cond": _published(256, 256, (1, 1, 2, 2, 4, 4), 2, "head_major", conditional=True),
    "ddbm_e2h64": _published(64, 192, (1, 2, 3, 4), 3, "qkv_major", conditional=True),
    "ddbm_diode256": _published(256, 256, (1, 1, 2, 2, 4, 4), 2, "qkv_major", conditional=True),
}


# ------------------------------------------------------------------------------------------------
# reading the architecture from the weights


def _shape(state: Mapping[str, Tensor], key: str) -> tuple[int, ...]:
    if key not in state:
        raise TeacherImportError(
            f"the state dict has no '{key}', which every guided-diffusion UNetModel has "
            f"(found keys such as {', '.join(list(state)[:4])})"
        )
    return tuple(state[key].shape)


def _has_layer(state: Mapping[str, Tensor], prefix: str) -> bool:
    return any(key.startswith(prefix) for key in state)


def _count_blocks(state: Mapping[str, Tensor], group: str) -> int:
    pattern = re.compile(rf"^{group}\.(\d+)\.")
    indices = {int(m.group(1)) for key in state if (m := pattern.match(key))}
    if not indices or indices != set(range(max(indices) + 1)):
        raise TeacherImportError(f"the state dict's '{group}' blocks are missing or not numbered 0..n")
    return max(indices) + 1


def infer_architecture(
    state: Mapping[str, Tensor],
    *,
    image_size: int,
    num_head_channels: int = 64,
    attention_order: AttentionOrder = "head_major",
) -> AdmArchitecture:
    """The :class:`AdmArchitecture` a guided-diffusion ``UNetModel`` state dict was built with.

    Read from shapes: the input convolution gives the input channels and base width, the output
    convolution the output channels, the up-sampling blocks the number of levels, the block
    counts ``num_res_blocks``, each level's first residual block its width and whether it
    attends, the down-sampling blocks ``resblock_updown`` and the embedding projections
    ``use_scale_shift_norm``. ``image_size`` and the head width are not stored in the weights.
    """
    if _has_layer(state, "label_emb."):
        raise TeacherImportError("class-conditional networks (a 'label_emb' layer) cannot be imported")
    width0, in_channels = _shape(state, "input_blocks.0.0.weight")[:2]
    emb_width, model_channels = _shape(state, "time_embed.0.weight")
    if model_channels != width0 or emb_width != 4 * model_channels:
        raise TeacherImportError(
            f"time_embed.0.weight {(emb_width, model_channels)} and input_blocks.0.0.weight width {width0} "
            "are not an ADM network with channel_mult[0] = 1"
        )
    out_channels = _shape(state, "out.2.weight")[0]
    n_in, n_out = _count_blocks(state, "input_blocks"), _count_blocks(state, "output_blocks")

    def upsamples(k: int) -> bool:
        # layers of an output block: ResBlock, optional attention, optional up-sampler
        prefix = f"output_blocks.{k}."
        last = max(int(key[len(prefix):].split(".")[0]) for key in state if key.startswith(prefix))
        return last >= 1 and not _has_layer(state, f"{prefix}{last}.qkv.")

    levels = 1 + sum(upsamples(k) for k in range(n_out))
    blocks_per_level, remainder = divmod(n_out, levels)
    if remainder or blocks_per_level < 2 or n_in != levels * blocks_per_level:
        raise TeacherImportError(
            f"{n_in} input and {n_out} output blocks over {levels} levels do not form an ADM UNet"
        )
    num_res_blocks = blocks_per_level - 1

    mult, rates = [], []
    for level in range(levels):
        first = 1 + level * blocks_per_level
        width = _shape(state, f"input_blocks.{first}.0.out_layers.3.weight")[0]
        if width % model_channels:
            raise TeacherImportError(
                f"level {level} has {width} channels, not a multiple of the base {model_channels}"
            )
        mult.append(width // model_channels)
        if _has_layer(state, f"input_blocks.{first}.1.qkv."):
            rates.append(2**level)
    updown = levels > 1 and _has_layer(state, f"input_blocks.{blocks_per_level}.0.in_layers.")
    emb_out = _shape(state, "input_blocks.1.0.emb_layers.1.weight")[0]
    return AdmArchitecture(
        image_size=image_size,
        in_channels=in_channels,
        out_channels=out_channels,
        model_channels=model_channels,
        channel_mult=tuple(mult),
        num_res_blocks=num_res_blocks,
        attention_rates=tuple(rates),
        num_head_channels=num_head_channels,
        resblock_updown=updown,
        use_scale_shift_norm=emb_out == 2 * model_channels * mult[0],
        attention_order=attention_order,
    )


# ------------------------------------------------------------------------------------------------
# the weights


def qkv_major_to_head_major(tensor: Tensor, heads: int) -> Tensor:
    """Reorder a fused ``qkv`` projection's output rows from ``[q_0..q_H, k_.., v_..]`` to ADM's
    legacy ``[q_0, k_0, v_0, q_1, ...]`` (the layout this project's attention splits)."""
    rows = tensor.shape[0]
    head_width = rows // (3 * heads)
    return (
        tensor.reshape(3, heads, head_width, *tensor.shape[1:])
        .transpose(0, 1)
        .reshape(rows, *tensor.shape[1:])
        .contiguous()
    )


def convert_adm_state_dict(
    state: Mapping[str, Tensor], architecture: AdmArchitecture, *, what: str = "checkpoint"
) -> dict[str, Tensor]:
    """The ADM weights ``state`` as a float32 state dict of this project's UNet for ``architecture``.

    Every key must exist in the project's network with the same shape and every network key
    must be present; otherwise an :class:`TeacherImportError` names the missing, unknown and
    mis-shaped keys (at most a few of each). Checked against a network built on the ``meta``
    device, so the check costs no memory even for 550M-parameter networks.
    """
    config = architecture.unet_config()
    with torch.device("meta"):
        network = UNet(config)
    problem = describe_state_dict_mismatch(network, state)
    if problem:
        raise TeacherImportError(f"the {what} does not match the network {architecture}: {problem}")
    converted: dict[str, Tensor] = {}
    for key, tensor in state.items():
        tensor = tensor.detach().to(torch.float32)
        if architecture.attention_order == "qkv_major" and key.endswith((".qkv.weight", ".qkv.bias")):
            tensor = qkv_major_to_head_major(tensor, config.heads_for(tensor.shape[0] // 3))
        converted[key] = tensor.contiguous()
    return converted
