"""What an import checks: keys, shapes, the published networks at full size, settings, task, options files."""

from __future__ import annotations

import argparse
import pickle
from pathlib import Path

import pytest
import torch
from official_files import (
    SMALL_I2SB,
    build_i2sb_net,
    i2sb_options,
    save_ddbm_checkpoint,
    save_i2sb_checkpoint,
)
from reference.originals import adm_unet

from ibmd_pipeline.degradations import TaskConfig
from ibmd_pipeline.engine.config import ConfigError
from ibmd_pipeline.networks.unet import UNet
from ibmd_pipeline.teacher.importers import (
    PUBLISHED_ARCHITECTURES,
    I2SBSettings,
    TeacherImportConfig,
    TeacherImportError,
    convert_adm_state_dict,
    import_teacher,
    infer_architecture,
    parse_import_config,
    qkv_major_to_head_major,
    read_i2sb_options,
)

SR = TaskConfig(kind="sr4x_bicubic", operators="i2sb")


def _import(path: Path, fmt: str = "i2sb", task: TaskConfig = SR, **settings):
    settings.setdefault("num_head_channels", 16)
    return import_teacher(
        TeacherImportConfig(format=fmt, checkpoint=str(path), **settings), task, image_size=32, channels=3
    )


def _edit_net(path: Path, edit) -> None:
    payload = torch.load(path, weights_only=True)
    edit(payload["net"])
    torch.save(payload, path)


@pytest.mark.parametrize("name", sorted(PUBLISHED_ARCHITECTURES))
def test_published_networks_at_full_size_map_key_for_key(name):
    """The real configurations (up to 550M parameters) built on the meta device: no memory, every shape."""
    architecture = PUBLISHED_ARCHITECTURES[name]
    with torch.device("meta"):
        original = adm_unet(architecture)
    state = original.state_dict()
    assert infer_architecture(
        state, image_size=architecture.image_size, attention_order=architecture.attention_order
    ) == architecture
    converted = convert_adm_state_dict(state, architecture)
    with torch.device("meta"):
        ours = UNet(architecture.unet_config())
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == {
        k: tuple(v.shape) for k, v in converted.items()
    }
    if name.startswith("i2sb_adm256"):  # this project's own adm256 preset is the same network
        from ibmd_pipeline.networks.unet import unet_preset

        preset = unet_preset("adm256", image_size=256, in_channels=architecture.in_channels, out_channels=3)
        assert preset == architecture.unet_config()


def test_qkv_major_rows_become_head_major():
    # rows: q of heads 0,1 | k of heads 0,1 | v of heads 0,1, two channels per head
    rows = torch.arange(12.0)
    assert qkv_major_to_head_major(rows, heads=2).tolist() == [0, 1, 4, 5, 8, 9, 2, 3, 6, 7, 10, 11]


def test_unknown_missing_and_misshaped_keys_are_named_and_nothing_is_returned(tmp_path):
    path = save_i2sb_checkpoint(tmp_path / "a", build_i2sb_net(), i2sb_options("sr4x-bicubic"))

    def drop(net):
        del net["diffusion_model.input_blocks.1.0.emb_layers.1.bias"]

    _edit_net(path, drop)
    with pytest.raises(TeacherImportError, match=r"missing keys.*input_blocks\.1\.0\.emb_layers\.1\.bias"):
        _import(path)

    path = save_i2sb_checkpoint(tmp_path / "b", build_i2sb_net(), i2sb_options("sr4x-bicubic"))

    def grow(net):
        net["diffusion_model.middle_block.0.in_layers.2.weight"] = torch.zeros(64, 64, 3, 1)

    _edit_net(path, grow)
    with pytest.raises(TeacherImportError, match=r"shape mismatches: middle_block\.0\.in_layers\.2\.weight"):
        _import(path)

    path = save_i2sb_checkpoint(tmp_path / "c", build_i2sb_net(), i2sb_options("sr4x-bicubic"))

    def extra(net):
        net["diffusion_model.input_blocks.1.0.extra.weight"] = torch.zeros(3)

    _edit_net(path, extra)
    with pytest.raises(TeacherImportError, match=r"(unexpected keys|shadow parameters).*"):
        _import(path)

    path = save_i2sb_checkpoint(tmp_path / "d", build_i2sb_net(), i2sb_options("sr4x-bicubic"))

    def foreign(net):
        net["noise_levels"] = torch.zeros(1000)

    _edit_net(path, foreign)
    outside = r"outside I2SB's Image256Net.diffusion_model: \['noise_levels'\]"
    with pytest.raises(TeacherImportError, match=outside):
        _import(path)


def test_wrong_format_wrong_file_and_a_published_name_that_does_not_fit(tmp_path):
    i2sb = save_i2sb_checkpoint(tmp_path / "i2sb", build_i2sb_net(), i2sb_options("sr4x-bicubic"))
    with pytest.raises(TeacherImportError, match="I2SB's format"):
        _import(i2sb, "ddbm", TaskConfig(kind="paired"))
    ddbm = save_ddbm_checkpoint(tmp_path / "ddbm", type("N", (), {"net": adm_unet(SMALL_I2SB)})())
    with pytest.raises(TeacherImportError, match="DDBM's format"):
        _import(ddbm)
    garbage = tmp_path / "latest.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(TeacherImportError, match="cannot be read with weights_only=True"):
        _import(garbage)
    with pytest.raises(TeacherImportError, match=r"not the published 'i2sb_adm256' network: image_size: 256"):
        _import(i2sb, architecture="i2sb_adm256")
    with pytest.raises(TeacherImportError, match="does not exist"):
        _import(tmp_path / "missing.pt")


def test_task_image_size_operators_and_contradicting_settings_are_refused(tmp_path):
    path = save_i2sb_checkpoint(tmp_path / "jpeg", build_i2sb_net(), i2sb_options("jpeg-5"))
    with pytest.raises(ConfigError, match=r"trained for 'jpeg-5' but the task is jpeg \(quality 10\)") as err:
        _import(path, task=TaskConfig(kind="jpeg", jpeg_quality=10, operators="i2sb"))
    assert err.value.key == "task.kind"
    with pytest.raises(ConfigError) as err:
        _import(path, task=TaskConfig(kind="jpeg", jpeg_quality=5))
    assert err.value.key == "task.operators"
    with pytest.raises(ConfigError) as err:
        jpeg5 = TaskConfig(kind="jpeg", jpeg_quality=5, operators="i2sb")
        _import(path, task=jpeg5, i2sb=I2SBSettings(beta_max=0.5))
    assert err.value.key == "teacher_import.i2sb.beta_max"
    with pytest.raises(ConfigError) as err:
        import_teacher(
            TeacherImportConfig(checkpoint=str(path), num_head_channels=16),
            TaskConfig(kind="jpeg", jpeg_quality=5, operators="i2sb"), image_size=64, channels=3,
        )  # fmt: skip
    assert err.value.key == "data.image_size"
    with pytest.raises(TeacherImportError, match="outputs 3 channels but the data has 1"):
        import_teacher(
            TeacherImportConfig(checkpoint=str(path), num_head_channels=16),
            TaskConfig(kind="jpeg", jpeg_quality=5, operators="i2sb"), image_size=32, channels=1,
        )  # fmt: skip


def test_without_options_the_papers_bridge_is_used_per_task(tmp_path):
    path = save_i2sb_checkpoint(tmp_path / "inpaint", build_i2sb_net(), None)
    bridge = _import(path, task=TaskConfig(kind="inpaint_center", operators="i2sb"))["config"]["bridge"]
    assert (bridge["beta_max"], bridge["ot_ode"], bridge["n_timesteps"]) == (1.0, True, 1000)
    assert (bridge["noise_levels"], bridge["i2sb_t0"], bridge["i2sb_T"]) == ("i2sb", 1e-4, 1.0)
    bridge = _import(path, i2sb=I2SBSettings(beta_max=0.5, interval=500))["config"]["bridge"]
    assert (bridge["beta_max"], bridge["ot_ode"], bridge["n_timesteps"]) == (0.5, False, 500)


def test_conditional_i2sb_networks_see_xT(tmp_path):
    net = build_i2sb_net(cond=True)
    path = save_i2sb_checkpoint(tmp_path / "cond", net, i2sb_options("sr4x-bicubic", cond_x1=True))
    assert _import(path)["config"]["conditional"] is True
    path = save_i2sb_checkpoint(tmp_path / "liar", net, i2sb_options("sr4x-bicubic", cond_x1=False))
    with pytest.raises(TeacherImportError, match="cond_x1=False but the network takes 6"):
        _import(path)


def test_options_pkl_is_read_without_running_code(tmp_path):
    options = tmp_path / "options.pkl"
    with options.open("wb") as handle:
        pickle.dump(argparse.Namespace(corrupt="jpeg-5", ckpt_path=Path("results/x"), beta_max=0.3), handle)
    assert read_i2sb_options(options) == {"corrupt": "jpeg-5", "ckpt_path": "results/x", "beta_max": 0.3}

    class Payload:
        def __reduce__(self):
            return (print, ("this must never run",))

    with options.open("wb") as handle:
        pickle.dump(argparse.Namespace(corrupt=Payload()), handle)
    with pytest.raises(TeacherImportError, match="refusing to unpickle global 'builtins.print'"):
        read_i2sb_options(options)


def test_parameters_are_validated_with_their_keys():
    with pytest.raises(ConfigError) as err:
        parse_import_config({"format": "i2sb"})
    assert err.value.key == "teacher_import.checkpoint"
    with pytest.raises(ConfigError) as err:
        parse_import_config({"format": "ddbm", "checkpoint": "x.pt", "architecture": "i2sb_adm256"})
    assert err.value.key == "teacher_import.architecture"
    with pytest.raises(ConfigError) as err:
        parse_import_config({"format": "ddbm", "checkpoint": "x.pt", "ddbm": {"sigma_max": 80.0}})
    assert err.value.key == "teacher_import.ddbm.sigma_max"
    with pytest.raises(ConfigError) as err:
        parse_import_config({"format": "ddbm", "checkpoint": "x.pt", "ddbm": {"pred_mode": "ve"}})
    assert err.value.key == "teacher_import.ddbm.pred_mode"


def test_bridge_settings_for_i2sb_noise_levels_are_validated():
    from ibmd_pipeline.bridges.schedules import BridgeConfig

    with pytest.raises(ConfigError) as err:
        BridgeConfig(kind="ddbm_vp", noise_levels="i2sb").validate("bridge")
    assert err.value.key == "bridge.noise_levels"
    with pytest.raises(ConfigError) as err:
        BridgeConfig(noise_levels="i2sb", i2sb_t0=1.0, i2sb_T=1.0).validate("bridge")
    assert err.value.key == "bridge.i2sb_t0"
