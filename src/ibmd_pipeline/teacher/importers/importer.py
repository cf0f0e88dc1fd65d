"""Import an official I2SB or DDBM checkpoint as this project's teacher checkpoint.

The result is the documented teacher checkpoint (``teacher/model.py``): the network's config and
weights, the bridge set exactly as the original code sets it, the task and image shape it fits.
``kedro run --pipelines=distill`` then distils it like a teacher trained here.

- I2SB (NVlabs/I2SB): unconditional bridge over its symmetric discrete beta schedule
  (``i2sb/runner.py``: ``beta_max``, ``interval`` steps, mirrored halves; OT-ODE for
  inpainting), network ``x0 = x_t - std_fwd[j] * net(x_t, noise_levels[j])`` with I2SB's own
  noise-level table (``BridgeConfig.noise_levels: i2sb``); ``--cond-x1`` networks also see xT.
  Sampled with the EMA weights, as I2SB's ``sample.py`` does.
- DDBM (alexzhou907/DDBM, ``pred_mode vp``): the VP bridge with ``beta_min``, ``beta_d``,
  ``sigma_data``, ``cov_xy``, its preconditioning (``karras_diffusion.py``
  ``get_bridge_scalings``, ``c_noise = 250 log t``) and xT concatenated after ``c_in x_t``.

Anything that does not fit (keys, shapes, channels, the task the checkpoint was trained for,
contradicting settings) raises before anything is returned, so nothing is written.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from ibmd_pipeline.bridges.schedules import BridgeConfig
from ibmd_pipeline.degradations.config import TaskConfig
from ibmd_pipeline.engine.config import ConfigError, config_to_dict
from ibmd_pipeline.teacher.importers.adm import (
    PUBLISHED_ARCHITECTURES,
    AdmArchitecture,
    TeacherImportError,
    convert_adm_state_dict,
    infer_architecture,
)
from ibmd_pipeline.teacher.importers.config import I2SBSettings, TeacherImportConfig
from ibmd_pipeline.teacher.importers.files import (
    OfficialWeights,
    align_ema,
    file_sha256,
    read_ddbm_checkpoint,
    read_i2sb_checkpoint,
    read_i2sb_options,
)

__all__ = ["I2SB_TASKS", "i2sb_bridge", "i2sb_task", "import_teacher"]

#: I2SB's ``--corrupt`` names of the paper's tasks, as this project's task settings.
I2SB_TASKS: dict[str, dict[str, Any]] = {
    "sr4x-pool": {"kind": "sr4x_pool"},
    "sr4x-bicubic": {"kind": "sr4x_bicubic"},
    "jpeg-5": {"kind": "jpeg", "jpeg_quality": 5},
    "jpeg-10": {"kind": "jpeg", "jpeg_quality": 10},
    "inpaint-center": {"kind": "inpaint_center"},
}

#: I2SB's ``train.py`` defaults for the bridge options (``scripts/train.sh`` overrides beta_max/ot_ode).
_I2SB_DEFAULTS = {"interval": 1000, "t0": 1e-4, "T": 1.0}


def i2sb_task(corrupt: str) -> dict[str, Any]:
    """This project's task settings for I2SB's ``--corrupt`` name (only the paper's tasks)."""
    if corrupt not in I2SB_TASKS:
        raise TeacherImportError(
            f"the I2SB checkpoint was trained for '{corrupt}', which has no task here; "
            f"importable: {', '.join(I2SB_TASKS)}"
        )
    return I2SB_TASKS[corrupt]


def _check_task(corrupt: str, task: TaskConfig) -> None:
    wanted = i2sb_task(corrupt)
    if any(getattr(task, name) != value for name, value in wanted.items()):
        settings = ",".join(f"task.{name}={value}" for name, value in wanted.items())
        raise ConfigError(
            "task.kind",
            f"the I2SB checkpoint was trained for '{corrupt}' but the task is {task.kind}"
            + (f" (quality {task.jpeg_quality})" if task.kind == "jpeg" else "")
            + f"; run with --params \"{settings}\"",
        )


def i2sb_bridge(settings: I2SBSettings, options: dict[str, Any] | None, task: TaskConfig) -> BridgeConfig:
    """I2SB's bridge from its ``options.pkl`` (when given) and ``settings``; they may not disagree.

    Missing values: ``interval`` 1000, ``t0`` 1e-4, ``T`` 1 (``train.py``), and the paper's
    ``beta_max`` (0.3; 1.0 for inpainting) and ``ot_ode`` (inpainting only).
    """
    inpainting = task.kind == "inpaint_center"
    defaults = {**_I2SB_DEFAULTS, "beta_max": 1.0 if inpainting else 0.3, "ot_ode": inpainting}
    values: dict[str, Any] = {}
    for name in ("beta_max", "ot_ode", "interval", "t0", "T"):
        mine = getattr(settings, name)
        theirs = None if options is None else options.get(name)
        if mine is not None and theirs is not None and mine != theirs:
            raise ConfigError(
                f"teacher_import.i2sb.{name}",
                f"{mine!r} contradicts the checkpoint's options.pkl ({theirs!r}); set it to null",
            )
        values[name] = next(v for v in (mine, theirs, defaults[name]) if v is not None)
    bridge = BridgeConfig(
        kind="i2sb",
        beta_max=float(values["beta_max"]),
        n_timesteps=int(values["interval"]),
        ot_ode=bool(values["ot_ode"]),
        noise_levels="i2sb",
        i2sb_t0=float(values["t0"]),
        i2sb_T=float(values["T"]),
    )
    bridge.validate("teacher_import.i2sb")
    return bridge


def _options_path(config: TeacherImportConfig, checkpoint: Path) -> Path | None:
    if config.options is not None:
        return Path(config.options).expanduser()
    beside = checkpoint.with_name("options.pkl")
    return beside if beside.is_file() else None


def _architecture(
    config: TeacherImportConfig, weights: OfficialWeights, image_size: int, attention_order: str
) -> AdmArchitecture:
    inferred = infer_architecture(
        weights.raw, image_size=image_size, num_head_channels=config.num_head_channels,
        attention_order=attention_order,  # type: ignore[arg-type]
    )
    if config.architecture == "auto":
        return inferred
    expected = PUBLISHED_ARCHITECTURES[config.architecture]
    differences = [
        f"{field.name}: {getattr(expected, field.name)} expected, {getattr(inferred, field.name)} found"
        for field in dataclasses.fields(AdmArchitecture)
        if getattr(expected, field.name) != getattr(inferred, field.name)
    ]
    if differences:
        raise TeacherImportError(
            f"the checkpoint is not the published '{config.architecture}' network: {'; '.join(differences)}"
        )
    return expected


def _conditional(architecture: AdmArchitecture, channels: int) -> bool:
    if architecture.out_channels != channels:
        raise TeacherImportError(
            f"the network outputs {architecture.out_channels} channels but the data has {channels} "
            "(data.channels)"
        )
    if architecture.in_channels not in (channels, 2 * channels):
        raise TeacherImportError(
            f"the network takes {architecture.in_channels} input channels: neither x_t ({channels}) nor "
            f"x_t and xT ({2 * channels})"
        )
    return architecture.in_channels == 2 * channels


def import_teacher(
    config: TeacherImportConfig, task: TaskConfig, *, image_size: int, channels: int
) -> dict[str, Any]:
    """The teacher checkpoint (``teacher/model.py`` format) of the official file ``config.checkpoint``.

    ``task``, ``image_size`` and ``channels`` are the data the teacher will be distilled on; the
    checkpoint must have been trained for them. Raises :class:`TeacherImportError` or
    :class:`ConfigError` (naming the key) when anything does not fit.
    """
    task.validate("task")
    assert config.checkpoint is not None  # validated by TeacherImportConfig
    path = Path(config.checkpoint).expanduser()
    provenance: dict[str, Any] = {"format": config.format, "checkpoint": str(path)}
    if config.format == "i2sb":
        weights = read_i2sb_checkpoint(path)
        options_path = _options_path(config, path)
        options = read_i2sb_options(options_path) if options_path is not None else None
        if options is not None:
            provenance["options"] = str(options_path)
            if options.get("corrupt") is not None:
                _check_task(str(options["corrupt"]), task)
            if options.get("add_x1_noise"):
                raise TeacherImportError("I2SB's --add-x1-noise (decolorization) teachers cannot be imported")
            trained_size = options.get("image_size")
            if trained_size is not None and int(trained_size) != image_size:
                raise ConfigError(
                    "data.image_size",
                    f"the I2SB checkpoint was trained on {trained_size}x{trained_size} images, "
                    f"got {image_size}",
                )
        if task.operators != "i2sb":
            raise ConfigError(
                "task.operators",
                "an I2SB teacher was trained on I2SB's own corruption operators; set task.operators: i2sb "
                "so the student sees the same inputs",
            )
        bridge = i2sb_bridge(config.i2sb, options, task)
        attention_order = "head_major"  # I2SB's ADM: use_new_attention_order False
    else:
        weights = read_ddbm_checkpoint(path)
        options = None
        settings = config.ddbm
        bridge = BridgeConfig(
            kind="ddbm_vp",
            beta_min=settings.beta_min,
            beta_d=settings.beta_d,
            t_min=settings.sigma_min,
            sigma_data=settings.sigma_data,
            cov_xy=settings.cov_xy,
        )
        bridge.validate("teacher_import.ddbm")
        attention_order = "qkv_major" if settings.attention_type == "flash" else "head_major"

    architecture = _architecture(config, weights, image_size, attention_order)
    conditional = _conditional(architecture, channels)
    if options is not None and options.get("cond_x1") is not None and bool(options["cond_x1"]) != conditional:
        raise TeacherImportError(
            f"options.pkl says cond_x1={options['cond_x1']} but the network takes {architecture.in_channels} "
            "input channels"
        )
    raw = convert_adm_state_dict(weights.raw, architecture, what=f"checkpoint '{path}'")
    if weights.ema is weights.raw:
        ema = raw
    else:  # I2SB: the shadow list is named once the raw keys are known to be right
        shadow = weights.ema if isinstance(weights.ema, list) else list(weights.ema.values())
        ema = convert_adm_state_dict(
            align_ema(weights.raw, shadow, path), architecture, what=f"checkpoint '{path}' (EMA)"
        )
    provenance.update(
        sha256=file_sha256(path),
        architecture=dataclasses.asdict(architecture),
        stored_dtype=weights.dtype,
        **weights.details,
    )
    if options is not None:
        provenance["i2sb_options"] = {
            key: options.get(key)
            for key in ("corrupt", "beta_max", "ot_ode", "interval", "t0", "T", "cond_x1", "image_size")
        }
    return {
        "kind": "teacher",
        "config": {
            "bridge": config_to_dict(bridge),
            "unet": config_to_dict(architecture.unet_config()),
            "conditional": conditional,
            "task": config_to_dict(task),
            "image_size": image_size,
            "channels": channels,
            "teacher": {"import": provenance},
        },
        "models": {"model": raw},
        "ema": {"model": ema},
        "step": weights.step,
        "history": [],
    }
