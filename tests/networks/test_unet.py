"""ADM UNet: shapes, presets, ADM layout, attention head order, config round trip, grown inputs."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from ibmd_pipeline.engine.config import ConfigError, config_to_dict, parse_config
from ibmd_pipeline.networks.unet import (
    AttentionBlock,
    StateDictMismatchError,
    UNet,
    UNetConfig,
    count_parameters,
    noise_level_embedding,
    unet_from_config_dict,
    unet_preset,
)


def tiny(in_channels: int = 1, out_channels: int = 1, **changes) -> UNetConfig:
    config = unet_preset("tiny", image_size=32, in_channels=in_channels, out_channels=out_channels)
    return dataclasses.replace(config, **changes)


def randomised(net: UNet, seed: int = 0) -> UNet:
    """Give every parameter (the zero-initialised ones too) a random value, so outputs are non-trivial."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in net.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    return net


def test_tiny_forward_shape_and_zero_output_at_initialisation():
    torch.manual_seed(0)
    net = UNet(tiny(in_channels=2, out_channels=3))
    x = torch.randn(4, 2, 32, 32)
    out = net(x, torch.tensor([0.0, 10.0, 500.0, 999.0]))
    assert out.shape == (4, 3, 32, 32)
    # ADM zero-initialises the head convolution, so a fresh network outputs exactly 0.
    assert torch.equal(out, torch.zeros_like(out))


def test_preset_sizes():
    tiny_params = count_parameters(UNet(unet_preset("tiny", image_size=32, in_channels=1, out_channels=1)))
    cpu_params = count_parameters(UNet(unet_preset("cpu", image_size=32, in_channels=1, out_channels=1)))
    assert 50_000 <= tiny_params <= 150_000
    assert 0.7e6 <= cpu_params <= 1.5e6
    assert UNetConfig() == unet_preset("cpu", image_size=32, in_channels=1, out_channels=1)


def test_adm256_matches_the_published_adm_model():
    """The ADM 256x256 unconditional model (learned sigma: 6 output channels) has 552,814,086
    parameters; equal counts plus ADM's key names mean its state_dict maps onto ours."""
    config = unet_preset("adm256", image_size=256, in_channels=3, out_channels=6)
    assert config.attention_resolutions == (32, 16, 8)
    with torch.device("meta"):  # no memory, no initialisation cost
        net = UNet(config)
    assert count_parameters(net) == 552_814_086
    shapes = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    assert shapes["input_blocks.0.0.weight"] == (256, 3, 3, 3)
    assert shapes["time_embed.0.weight"] == (1024, 256)
    assert shapes["input_blocks.1.0.emb_layers.1.weight"] == (512, 1024)  # scale and shift
    assert shapes["middle_block.1.qkv.weight"] == (3072, 1024, 1)
    assert shapes["output_blocks.17.0.skip_connection.weight"] == (256, 512, 1, 1)
    assert shapes["out.2.weight"] == (6, 256, 3, 3)


@pytest.mark.parametrize(
    ("changes", "bad_key"),
    [
        ({"attention_resolutions": (12,)}, "model.attention_resolutions[0]"),
        ({"norm_groups": 5}, "model.norm_groups"),
        ({"image_size": 30}, "model.image_size"),
        ({"num_head_channels": 12}, "model.num_head_channels"),
        ({"num_head_channels": -1, "num_heads": 3}, "model.num_heads"),
        ({"dropout": 1.0}, "model.dropout"),
        ({"channel_mult": ()}, "model.channel_mult"),
        ({"num_res_blocks": 0}, "model.num_res_blocks"),
    ],
)
def test_validate_names_the_bad_key(changes, bad_key):
    config = dataclasses.replace(tiny(), **changes)
    with pytest.raises(ConfigError) as info:
        config.validate("model")
    assert info.value.key == bad_key


def test_attention_resolution_error_lists_allowed_sizes():
    with pytest.raises(ConfigError, match="allowed: 32, 16, 8"):
        parse_config(UNetConfig, {**config_to_dict(tiny()), "attention_resolutions": [4]}, "model")


def test_unknown_preset_is_a_config_error():
    with pytest.raises(ConfigError, match="'tiny', 'cpu', 'adm256'"):
        unet_preset("huge", image_size=32, in_channels=1, out_channels=1)  # type: ignore[arg-type]


def test_config_round_trip_rebuilds_an_identical_network():
    config = tiny(in_channels=2)
    net = randomised(UNet(config))
    stored = config_to_dict(net.config)
    assert stored["channel_mult"] == list(config.channel_mult)  # plain lists in checkpoints
    rebuilt = unet_from_config_dict(stored)
    assert rebuilt.config == config
    rebuilt.load_state_dict(net.state_dict())
    x, t = torch.randn(2, 2, 32, 32), torch.tensor([3.0, 700.0])
    assert torch.equal(rebuilt(x, t), net(x, t))


def test_mismatched_state_dict_names_channels_and_keys():
    source = UNet(tiny(in_channels=2, out_channels=3))
    with pytest.raises(StateDictMismatchError) as info:
        UNet(tiny(in_channels=1, out_channels=1)).load_state_dict(source.state_dict())
    message = str(info.value)
    assert "in_channels: network 1, state_dict 2" in message
    assert "out_channels: network 1, state_dict 3" in message

    deeper = UNet(tiny(channel_mult=(1, 1, 1, 1), attention_resolutions=(4,)))
    with pytest.raises(
        StateDictMismatchError, match=r"unexpected keys: input_blocks.6.0.op.weight.*\(58 in all\)"
    ):
        UNet(tiny()).load_state_dict(deeper.state_dict())
    with pytest.raises(StateDictMismatchError, match="missing keys"):
        deeper.load_state_dict(UNet(tiny()).state_dict())


def test_noise_level_embedding_values_and_precision():
    t = torch.tensor([0.0, 999.0])
    emb = noise_level_embedding(t, 8)
    assert torch.equal(emb[0], torch.tensor([1.0] * 4 + [0.0] * 4))
    freqs = torch.exp(-math.log(10_000.0) * torch.arange(4) / 4)
    expected = torch.cat([torch.cos(999.0 * freqs), torch.sin(999.0 * freqs)])
    torch.testing.assert_close(emb[1], expected, rtol=0, atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = noise_level_embedding(t, 8)
    assert under_autocast.dtype == torch.float32
    assert torch.equal(under_autocast, emb)
    assert noise_level_embedding(t, 7).shape == (2, 7)


def test_forward_from_an_embedding_is_the_forward_after_the_noise_level_embedding():
    """The method an export traces runs the same layers on the same numbers as forward."""
    net = randomised(UNet(tiny(in_channels=2)))
    x = torch.randn(3, 2, 32, 32, generator=torch.Generator().manual_seed(1))
    level = torch.tensor([0.5, 10.0, 999.0])
    embedding = noise_level_embedding(level, net.config.model_channels)
    with torch.no_grad():
        assert torch.equal(net.forward_from_embedding(x, embedding), net(x, level))


def test_noise_level_changes_output_and_scalar_broadcasts():
    net = randomised(UNet(tiny()))
    x = torch.randn(3, 1, 32, 32)
    a = net(x, torch.full((3,), 10.0))
    b = net(x, torch.full((3,), 11.0))
    c = net(x, torch.full((3,), 0.25))  # EDM-scale noise levels are resolved too
    d = net(x, torch.full((3,), 0.30))
    assert (a - b).abs().max() > 1e-3 and (c - d).abs().max() > 1e-3
    torch.testing.assert_close(net(x, 10.0), a)
    torch.testing.assert_close(net(x, torch.full((3, 1, 1, 1), 10.0)), a)
    with pytest.raises(ValueError, match="noise_level"):
        net(x, torch.zeros(2))


def test_input_checks():
    net = UNet(tiny())
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\)"):
        net(torch.zeros(1, 2, 32, 32), 0.0)
    with pytest.raises(ValueError, match="divisible by 4"):
        net(torch.zeros(1, 1, 31, 31), 0.0)
    assert net(torch.zeros(1, 1, 16, 24), 0.0).shape == (1, 1, 16, 24)  # fully convolutional


def test_attention_uses_adm_legacy_head_order():
    """qkv channels are laid out per head as [q_h, k_h, v_h]; check against that reference."""
    torch.manual_seed(0)
    config = tiny(num_head_channels=8)
    block = AttentionBlock(16, num_heads=2, config=config)
    with torch.no_grad():
        block.proj_out.weight.normal_()
    x = torch.randn(2, 16, 4, 4)
    out = block(x, torch.zeros(2, 4))

    tokens = x.reshape(2, 16, 16)
    qkv = block.qkv(block.norm(tokens))
    heads = []
    for h in range(2):
        q, k, v = (
            qkv[:, 24 * h : 24 * h + 8],
            qkv[:, 24 * h + 8 : 24 * h + 16],
            qkv[:, 24 * h + 16 : 24 * h + 24],
        )
        weights = torch.softmax(torch.einsum("bct,bcs->bts", q, k) / math.sqrt(8), dim=-1)
        heads.append(torch.einsum("bts,bcs->bct", weights, v))
    expected = tokens + block.proj_out(torch.cat(heads, dim=1))
    torch.testing.assert_close(out, expected.reshape(2, 16, 4, 4), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "changes",
    [
        {"resblock_updown": True},
        {"use_scale_shift_norm": False},
        {
            "channel_mult": (1, 2, 2),
            "num_res_blocks": 2,
            "attention_resolutions": (16, 8),
            "num_head_channels": -1,
            "num_heads": 2,
        },
    ],
)
def test_variants_run_and_learn(changes):
    net = randomised(UNet(tiny(**changes)))
    x = torch.randn(2, 1, 32, 32)
    out = net(x, torch.tensor([1.0, 2.0]))
    assert out.shape == (2, 1, 32, 32)
    out.square().mean().backward()
    assert all(p.grad is not None for p in net.parameters())


def test_gradient_checkpointing_gives_the_same_gradients():
    base = randomised(UNet(tiny()))
    checkpointed = UNet(tiny(use_checkpoint=True))
    checkpointed.load_state_dict(base.state_dict())
    x, t = torch.randn(2, 1, 32, 32), torch.tensor([5.0, 50.0])
    base(x, t).square().sum().backward()
    checkpointed(x, t).square().sum().backward()
    for (name, p), q in zip(base.named_parameters(), checkpointed.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, msg=name)


def test_add_input_channels_keeps_output_and_receives_gradients():
    net = randomised(UNet(tiny(in_channels=2)))
    x, t = torch.randn(3, 2, 32, 32), torch.tensor([1.0, 100.0, 900.0])
    before = net(x, t)
    net.add_input_channels(3)
    assert net.config.in_channels == 5 and net.input_conv.in_channels == 5
    assert net.input_conv.weight.shape[1] == 5
    extra = torch.randn(3, 3, 32, 32) * 10
    after = net(torch.cat([x, extra], dim=1), t)
    torch.testing.assert_close(after, before, rtol=0, atol=1e-5)

    after.square().mean().backward()
    new_grad = net.input_conv.weight.grad[:, 2:]
    assert new_grad.abs().sum() > 0
    # The grown network round-trips through its own (updated) config.
    rebuilt = unet_from_config_dict(config_to_dict(net.config))
    rebuilt.load_state_dict(net.state_dict())
    with pytest.raises(ValueError, match="n >= 1"):
        net.add_input_channels(0)


def test_dropout_is_active_in_train_mode_only():
    net = randomised(UNet(tiny(dropout=0.5)))
    x, t = torch.randn(2, 1, 32, 32), torch.tensor([1.0, 2.0])
    net.eval()
    assert torch.equal(net(x, t), net(x, t))
    net.train()
    assert not torch.equal(net(x, t), net(x, t))
