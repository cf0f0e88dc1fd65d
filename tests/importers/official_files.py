"""Official checkpoint files for the import tests: original networks, random weights, saved their way.

- I2SB ``latest.pt``: ``{"net": Image256Net.state_dict(), "ema": torch_ema state, "optimizer", "sched"}``
  with a real ``torch_ema.ExponentialMovingAverage`` (one update, so EMA and net differ) and its
  ``options.pkl``, the pickled ``argparse.Namespace`` with ``Path`` values (I2SB ``train.py``).
- DDBM ``e2h_ema_0.9999_<step>.pt``: the ``UNetModel`` state dict.

Small networks (32x32, two levels, two-head attention) run in milliseconds on the CPU.
"""

from __future__ import annotations

import argparse
import pickle
from pathlib import Path

import torch
from reference.originals import DDBMUNet, Image256Net, adm_unet, i2sb_noise_levels, randomize_
from torch_ema import ExponentialMovingAverage

from ibmd_pipeline.teacher.importers import AdmArchitecture

SMALL_I2SB = AdmArchitecture(
    image_size=32, in_channels=3, out_channels=3, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
    attention_rates=(2,), num_head_channels=16, resblock_updown=True, use_scale_shift_norm=True,
    attention_order="head_major",
)  # fmt: skip
SMALL_DDBM = AdmArchitecture(
    image_size=32, in_channels=6, out_channels=3, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
    attention_rates=(1, 2), num_head_channels=16, resblock_updown=True, use_scale_shift_norm=True,
    attention_order="qkv_major",
)  # fmt: skip


def build_i2sb_net(
    architecture: AdmArchitecture = SMALL_I2SB, *, seed: int = 0, cond: bool = False
) -> Image256Net:
    generator = torch.Generator().manual_seed(seed)
    in_channels = 6 if cond else 3
    unet = randomize_(adm_unet(architecture, in_channels=in_channels), generator)
    return Image256Net(unet, i2sb_noise_levels(), cond=cond).eval()


def i2sb_options(corrupt: str, **overrides) -> argparse.Namespace:
    """I2SB's training options as ``train.py`` pickles them (the bridge-relevant ones and some paths)."""
    values = dict(
        seed=0, name=corrupt, corrupt=corrupt, image_size=32, t0=1e-4, T=1.0, interval=1000,
        beta_max=1.0 if "inpaint" in corrupt else 0.3, ot_ode="inpaint" in corrupt, clip_denoise=False,
        cond_x1=False, add_x1_noise=False, batch_size=256, microbatch=2, lr=5e-5, ema=0.99,
        dataset_dir=Path("/dataset"), log_dir=Path(".log"), ckpt_path=Path("results") / corrupt,
        load=None, device="cuda", distributed=True, use_fp16=False,
    )  # fmt: skip
    values.update(overrides)
    return argparse.Namespace(**values)


def save_i2sb_checkpoint(
    folder: Path, net: Image256Net, options: argparse.Namespace | None, *, ema_noise: float = 0.01
) -> Path:
    """``folder/latest.pt`` (+ ``options.pkl``) as I2SB's Runner writes them."""
    folder.mkdir(parents=True, exist_ok=True)
    ema = ExponentialMovingAverage(net.parameters(), decay=0.99)
    with torch.no_grad():  # one "training step", so the EMA differs from the raw weights
        generator = torch.Generator().manual_seed(123)
        for parameter in net.parameters():
            parameter.add_(ema_noise * torch.randn(parameter.shape, generator=generator))
    ema.update()
    optimizer = torch.optim.AdamW(net.parameters(), lr=5e-5)
    path = folder / "latest.pt"
    payload = {"net": net.state_dict(), "ema": ema.state_dict(), "optimizer": optimizer.state_dict()}
    torch.save({**payload, "sched": None}, path)
    if options is not None:
        with (folder / "options.pkl").open("wb") as handle:
            pickle.dump(options, handle)
    return path


def ema_network(net: Image256Net, checkpoint: Path) -> Image256Net:
    """The I2SB network with its EMA weights copied in, as ``sample.py`` samples (``ema.copy_to``)."""
    ema = ExponentialMovingAverage(net.parameters(), decay=0.99)
    ema.load_state_dict(torch.load(checkpoint, weights_only=True)["ema"])
    ema.copy_to(net.parameters())
    return net


def build_ddbm_net(architecture: AdmArchitecture = SMALL_DDBM, *, seed: int = 1) -> DDBMUNet:
    generator = torch.Generator().manual_seed(seed)
    return DDBMUNet(randomize_(adm_unet(architecture), generator)).eval()


def save_ddbm_checkpoint(folder: Path, net: DDBMUNet, step: int = 420000) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"e2h_ema_0.9999_{step}.pt"
    torch.save(net.net.state_dict(), path)
    return path
