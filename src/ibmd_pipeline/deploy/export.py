"""The distilled student as a self-contained, deterministic model file (TorchScript, optionally ONNX).

An exported student needs neither this package nor the schedule code: everything that depends
only on the step times is computed once at export time, in the same precision the eager
generator uses, and stored in the module as constants. For each run length ``M = 1..N`` (a
student trained with N steps may run fewer, ``distill.generator``) and each step ``k`` of it, on
the grid ``t_k = schedule.grid(M)[k]``:

- the preconditioning ``(c_skip, c_out, c_in)`` of ``x0_hat = c_skip x_t + c_out
  F(c_in x_t [, xT], z; c_noise)`` (docs/method.md sec. 2.1-2.2) and the network's time embedding of
  ``c_noise``;
- the bridge-posterior step ``x_{t_{k+1}} = coef_x0 x0_hat + coef_xt x_t + std eps``
  (docs/method.md sec. 2, as the multi-step students of sec. 4.4 take it; IBMD sec. 3.5).

What remains is the UNet after its time embedding (``UNet.forward_from_embedding``) chained by
the library's posterior chain (``bridges.samplers.posterior_chain``), the loop the eager
generator runs. Each run length is traced (it has no data-dependent control flow) and a small
scripted module checks the inputs and picks the run, so the file reproduces
:meth:`BridgeGenerator.forward` for the same inputs and runs on any device it is moved to. All
randomness is an input, which makes the model a pure function::

    x0 = model(xT, z, mask, step_noise, nfe)
    xT:         (B, C, H, W) in [-1, 1], the corrupted image (for inpainting, hole filled with N(0, 1))
    z:          (B, C, H, W) ~ N(0, I) when metadata "noise" is true, else None
    mask:       (B, 1, H, W), 1 = missing pixel; required when metadata "needs_mask" is true
    step_noise: (M - 1, B, C, H, W) ~ N(0, I), the posterior steps' noise; required when M > 1
                and the schedule is not deterministic, else None
    nfe:        M in [1, N], default N

The metadata a user needs (task, image size, channels, nfe, noise, schedule, teacher version...)
travels inside the file as JSON: a TorchScript extra file ``ibmd_student.json``, or the ONNX
model's ``metadata_props`` entry of the same name.

TorchScript is the format PyTorch can load without the model's source code (also from C++).
PyTorch 2.9+ marks ``torch.jit`` as deprecated in favour of ``torch.export``; it still works, and
the deprecation notice is silenced here only around our own calls.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import warnings
import zipfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor, nn

from ibmd_pipeline.bridges.samplers import ChainStep, chain_steps, posterior_chain
from ibmd_pipeline.distill.student import LoadedStudent, student_from_checkpoint
from ibmd_pipeline.engine.checkpoint import CheckpointError, atomic_write
from ibmd_pipeline.engine.config import require
from ibmd_pipeline.networks.unet import UNet, noise_level_embedding

__all__ = [
    "FORMAT",
    "METADATA_FILE",
    "ONNX_REQUIREMENTS",
    "ExportConfig",
    "ExportError",
    "ExportedOnnx",
    "ExportedStudent",
    "StudentGraph",
    "StudentMetadata",
    "StudentRun",
    "build_student_graph",
    "eager_restore",
    "example_inputs",
    "export_onnx",
    "export_torchscript",
    "is_torchscript_file",
    "load_torchscript",
    "onnx_metadata",
    "onnx_session",
    "run_onnx",
    "save_onnx",
    "save_torchscript",
    "student_metadata",
]

FORMAT = "ibmd-student/1"
METADATA_FILE = "ibmd_student.json"
#: What ``export_onnx`` needs beyond the project's dependencies (verified together with torch 2.14).
ONNX_REQUIREMENTS = ("onnx==1.23.2", "onnxscript==0.7.2")


class ExportError(RuntimeError):
    """The student cannot be exported, or the export does not reproduce the eager model."""


@dataclass(frozen=True)
class ExportConfig:
    """How to export the student (``params:export``).

    use_ema: export the generator's EMA weights (what the paper evaluates) or its raw weights.
    verify_batch_size: images of a random batch on which the export is compared with the eager
        generator right after exporting (every step count 1..N); 0 skips the check.
    atol: largest absolute difference the check accepts (outputs are images in [-1, 1]).
    onnx_opset: ONNX opset of :func:`export_onnx`, 18 (the exporter's lowest; it has every
        operator the UNet needs) to 23.
    """

    use_ema: bool = True
    verify_batch_size: int = 2
    atol: float = 1e-4
    onnx_opset: int = 18

    def validate(self, key: str) -> None:
        prefix = f"{key}." if key else ""
        require(
            self.verify_batch_size >= 0,
            f"{prefix}verify_batch_size",
            f"must be >= 0 (0 = no check), got {self.verify_batch_size}",
        )
        require(0.0 < self.atol <= 0.1, f"{prefix}atol", f"must be in (0, 0.1], got {self.atol}")
        require(
            18 <= self.onnx_opset <= 23, f"{prefix}onnx_opset", f"must be in [18, 23], got {self.onnx_opset}"
        )


# --------------------------------------------------------------------------------------------
# metadata


@dataclass(frozen=True)
class StudentMetadata:
    """What a user of an exported student needs to know, stored with the model as JSON.

    task: the task config dict (``kind``, ...); image_size, channels: the images it was trained
    on; nfe: its steps N; noise: whether it takes z; needs_mask: whether it takes the inpainting
    mask; conditional: whether its network sees xT; deterministic: OT-ODE schedule (no step
    noise); schedule: the teacher's bridge config dict (``kind`` ``i2sb``/``ddbm_vp`` ...);
    teacher_version / student_version: catalog versions, when known; step: generator updates;
    weights: ``ema`` or ``raw``.
    """

    task: dict[str, Any]
    image_size: int
    channels: int
    nfe: int
    noise: bool
    needs_mask: bool
    conditional: bool
    deterministic: bool
    schedule: dict[str, Any]
    teacher_version: str | None = None
    student_version: str | None = None
    step: int | None = None
    weights: str = "ema"
    format: str = FORMAT

    @property
    def task_kind(self) -> str:
        return str(self.task.get("kind"))

    def inputs(self, nfe: int | None = None) -> list[str]:
        """Inputs of an ``nfe``-step run, in order: ``xT``, then whichever of z, mask, step_noise it takes."""
        steps = self.nfe if nfe is None else nfe
        names = ["xT"]
        if self.noise:
            names.append("z")
        if self.needs_mask:
            names.append("mask")
        if steps > 1 and not self.deterministic:
            names.append("step_noise")
        return names

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes, source: str) -> StudentMetadata:
        """Parse the stored JSON; ``source`` names the file in errors."""
        try:
            values = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ExportError(f"'{source}': the stored student metadata is not JSON ({err})") from err
        if not isinstance(values, dict) or values.get("format") != FORMAT:
            found = values.get("format") if isinstance(values, dict) else type(values).__name__
            raise ExportError(
                f"'{source}' is not an exported IBMD student (format {found!r}, expected {FORMAT!r})"
            )
        known = {f.name for f in dataclasses.fields(cls)}
        missing = sorted(
            f.name
            for f in dataclasses.fields(cls)
            if f.name not in values and f.default is dataclasses.MISSING
        )
        if missing:
            raise ExportError(f"'{source}': the student metadata lacks {missing}")
        return cls(**{k: v for k, v in values.items() if k in known})


def student_metadata(
    student: LoadedStudent, *, weights: str = "ema", step: int | None = None
) -> StudentMetadata:
    """The metadata of a loaded student (the same description for a checkpoint and its export)."""
    config = student.config
    return StudentMetadata(
        task=dict(config.get("task") or {}),
        image_size=int(config["image_size"]),
        channels=int(config["channels"]),
        nfe=student.nfe,
        noise=student.noise,
        needs_mask=student.needs_mask,
        conditional=student.generator.conditional,
        deterministic=student.schedule.deterministic,
        schedule=dict(config["teacher"]["bridge"]),
        teacher_version=config.get("teacher_version"),
        student_version=student.version,
        step=step,
        weights=weights,
    )


# --------------------------------------------------------------------------------------------
# the exported computation


class StudentRun(nn.Module):
    """The student's chain for one run length M, with every time-dependent constant precomputed.

    ``net``: the student's UNet, or its ``forward_from_embedding`` traced (shared by every run);
    ``precond`` ``(M, 3)``: ``(c_skip, c_out, c_in)`` of step k; ``sinusoid`` ``(M, model_channels)``:
    the network's embedding of step k's noise level ``c_noise``; ``steps``: the ``M - 1``
    posterior transitions (:func:`~ibmd_pipeline.bridges.samplers.chain_steps`). The loop is the
    library's :func:`~ibmd_pipeline.bridges.samplers.posterior_chain`, which a trace unrolls.
    ``forward(xT, z, mask, step_noise)`` takes every input as a tensor (a traced module has no
    optional inputs): z is read only when the student has noise, step_noise only by the steps
    that take noise.
    """

    def __init__(
        self,
        net: nn.Module,
        precond: Tensor,
        sinusoid: Tensor,
        steps: Sequence[ChainStep],
        *,
        conditional: bool,
        noise: bool,
    ):
        super().__init__()
        evaluations = len(steps) + 1
        if precond.shape != (evaluations, 3) or sinusoid.shape[0] != evaluations:
            raise ValueError(
                f"a run of {evaluations} steps needs {evaluations} table rows, got {tuple(precond.shape)} "
                f"and {tuple(sinusoid.shape)}"
            )
        self.net = net
        self.register_buffer("precond", precond.to(torch.float32))
        self.register_buffer("sinusoid", sinusoid.to(torch.float32))
        self.steps = list(steps)
        self.conditional = conditional
        self.noise = noise

    def forward(self, xT: Tensor, z: Tensor, mask: Tensor, step_noise: Tensor) -> Tensor:
        def predict(x: Tensor, k: int) -> Tensor:
            """``G(x_t, z, t_k [, xT])`` with the arithmetic of :class:`X0Predictor`."""
            c_skip, c_out, c_in = self.precond[k][0], self.precond[k][1], self.precond[k][2]
            parts = [c_in * x]
            if self.conditional:
                parts.append(xT)
            if self.noise:
                parts.append(z)
            # A contiguous batch of equal rows, as the eager UNet embeds a batch of equal times: the
            # time MLP then runs the same matrix product and gives the same bits.
            sinusoid = self.sinusoid[k].unsqueeze(0).expand(x.shape[0], -1).contiguous()
            return c_skip * x + c_out * self.net.forward_from_embedding(torch.cat(parts, dim=1), sinusoid)

        return posterior_chain(predict, xT, self.steps, mask=mask, step_noise=step_noise)


class StudentGraph(nn.Module):
    """The exported student: checks its inputs and runs the :class:`StudentRun` of the asked step count.

    ``runs[M - 1]`` is the M-step run, ``M = 1..N`` (traced for TorchScript). Scriptable with
    traced runs; exportable as is to ONNX.
    """

    # Plain settings, compiled into the TorchScript code as constants.
    __constants__ = ["nfe", "channels", "size_multiple", "noise", "needs_mask", "deterministic"]

    def __init__(
        self,
        runs: Sequence[nn.Module],
        *,
        channels: int,
        size_multiple: int,
        noise: bool,
        needs_mask: bool,
        deterministic: bool,
    ):
        super().__init__()
        self.runs = nn.ModuleList(runs)
        self.nfe = len(runs)
        self.channels = channels
        self.size_multiple = size_multiple
        self.noise = noise
        self.needs_mask = needs_mask
        self.deterministic = deterministic

    def forward(
        self,
        xT: Tensor,
        z: Optional[Tensor] = None,  # noqa: UP045 - TorchScript reads the annotations
        mask: Optional[Tensor] = None,  # noqa: UP045
        step_noise: Optional[Tensor] = None,  # noqa: UP045
        nfe: Optional[int] = None,  # noqa: UP045
    ) -> Tensor:
        """``x0`` from ``xT`` with ``nfe`` (default N) evaluations; all noise is passed in."""
        steps = self.nfe if nfe is None else nfe
        self._check_inputs(xT, z, mask, step_noise, steps)
        # The runs take every input as a tensor: one this student does not read is passed empty.
        # Without a mask every pixel counts as missing, so the known-pixel paste copies nothing and
        # leaves each prediction as it is.
        unused = xT.new_empty(0)
        if mask is None:
            mask = torch.ones_like(xT[:, :1])
        x0 = xT
        for m, run in enumerate(self.runs):
            if m + 1 == steps:
                x0 = run(xT, unused if z is None else z, mask, unused if step_noise is None else step_noise)
        return x0

    def _check_inputs(
        self,
        xT: Tensor,
        z: Optional[Tensor],  # noqa: UP045
        mask: Optional[Tensor],  # noqa: UP045
        step_noise: Optional[Tensor],  # noqa: UP045
        steps: int,
    ) -> None:
        if steps < 1 or steps > self.nfe:
            raise ValueError(f"nfe must be in [1, {self.nfe}] (the steps it was trained with), got {steps}")
        if xT.dim() != 4 or xT.shape[1] != self.channels:
            raise ValueError(f"xT must be (B, {self.channels}, H, W), got {xT.shape}")
        if xT.shape[2] % self.size_multiple != 0 or xT.shape[3] % self.size_multiple != 0:
            raise ValueError(
                f"xT's height and width must be multiples of {self.size_multiple}, got {xT.shape}"
            )
        if self.noise:
            if z is None:
                raise ValueError("this student takes noise z ~ N(0, I) shaped like xT; pass z")
            if z.shape != xT.shape:
                raise ValueError(f"z must have xT's shape {xT.shape}, got {z.shape}")
        elif z is not None:
            raise ValueError("this student takes no noise z (noise: false); pass z=None")
        if mask is None:
            if self.needs_mask:
                raise ValueError("this inpainting student needs the mask (B, 1, H, W), 1 = missing pixel")
        elif (
            mask.dim() != 4
            or mask.shape[1] != 1
            or mask.shape[0] != xT.shape[0]
            or mask.shape[2:] != xT.shape[2:]
        ):
            raise ValueError(f"mask must be (B, 1, H, W) for xT {xT.shape}, got {mask.shape}")
        if steps > 1 and not self.deterministic:
            if step_noise is None:
                raise ValueError(
                    f"a {steps}-step run needs step_noise ~ N(0, I) of shape ({steps - 1}, B, C, H, W)"
                )
            if step_noise.dim() != 5 or step_noise.shape[0] < steps - 1 or step_noise.shape[1:] != xT.shape:
                raise ValueError(
                    f"step_noise must be ({steps - 1}, B, C, H, W) for xT {xT.shape}, got {step_noise.shape}"
                )


def _student_runs(student: LoadedStudent, net: nn.Module) -> list[StudentRun]:
    """One :class:`StudentRun` on ``net`` for each run length ``M = 1..N``, on ``schedule.grid(M)``.

    Computed exactly as the eager generator does: the preconditioning from the float32 time batch
    that :meth:`BridgeGenerator.forward` builds, cast to float32, the posterior steps by the same
    :func:`~ibmd_pipeline.bridges.samplers.chain_steps`, the sinusoids by the network's own
    :func:`noise_level_embedding` (element-wise, so the same for any batch).
    """
    generator, schedule = student.generator, student.schedule
    grids = [schedule.grid(steps) for steps in range(1, generator.nfe + 1)]
    precond, levels = [], []
    for times in grids:
        for t_k in times[:-1].tolist():
            t = torch.full((1,), t_k, dtype=torch.float32)
            c_skip, c_out, c_in, c_noise = schedule.preconditioning(t)
            precond.append(torch.cat([c_skip, c_out, c_in]).to(torch.float32))
            levels.append(c_noise.to(torch.float32))
    sinusoids = noise_level_embedding(torch.cat(levels), generator.predictor.net.config.model_channels)
    runs, first = [], 0
    for times in grids:
        rows = slice(first, first + len(times) - 1)
        first = rows.stop
        runs.append(
            StudentRun(
                net,
                torch.stack(precond[rows]),
                sinusoids[rows],
                chain_steps(schedule, times[:-1], "ancestral"),
                conditional=generator.conditional,
                noise=generator.noise,
            )
        )
    return runs


def _traced(module: nn.Module, method: str, example: tuple[Tensor, ...]) -> torch.jit.ScriptModule:
    """``module.<method>`` traced on ``example``, on the CPU and without autograd."""
    with torch.no_grad(), _quiet_torch_jit(), warnings.catch_warnings():
        # The tracer flags Python numbers read off tensors: GroupNorm's batch check and the
        # chunk sizes of the FiLM scale/shift. Both depend on channel counts only, which the
        # network fixes.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        return torch.jit.trace_module(module, {method: example}, check_trace=False)


def _traced_runs(student: LoadedStudent, net: UNet, metadata: StudentMetadata, side: int) -> list[nn.Module]:
    """The runs for TorchScript: the network's ``forward_from_embedding`` traced once, each run
    traced around it, on zero batches of 2 (batch and image size stay free: checked by the tests)."""
    xT = torch.zeros(2, metadata.channels, side, side)
    net_input = torch.zeros(2, net.config.in_channels, side, side)
    network = _traced(net, "forward_from_embedding", (net_input, torch.zeros(2, net.config.model_channels)))
    unused = xT.new_empty(0)
    z = torch.zeros_like(xT) if metadata.noise else unused
    mask = torch.ones_like(xT[:, :1])
    runs = []
    for run in _student_runs(student, network):
        noisy = len(run.steps) > 0 and not metadata.deterministic
        step_noise = torch.zeros(len(run.steps), *xT.shape) if noisy else unused
        runs.append(_traced(run, "forward", (xT, z, mask, step_noise)))
    return runs


def build_student_graph(student: LoadedStudent, *, trace: bool = False) -> StudentGraph:
    """The exportable form of ``student`` (on the CPU, eval mode, frozen).

    ``trace=True`` traces the runs (for TorchScript); otherwise they are plain modules on the
    student's network (for ONNX export and tests).
    """
    net = student.generator.predictor.net
    if not isinstance(net, UNet):
        raise ExportError(f"only UNet students can be exported, got {type(net).__name__}")
    if any(parameter.device.type != "cpu" for parameter in net.parameters()):
        raise ExportError("export a student loaded on the CPU (student_from_checkpoint(..., device='cpu'))")
    net.eval()
    metadata = student_metadata(student)
    size_multiple = 2 ** (len(net.config.channel_mult) - 1)
    runs: list[nn.Module]
    if trace:
        runs = _traced_runs(student, net, metadata, side=max(net.config.image_size, size_multiple))
    else:
        runs = [*_student_runs(student, net)]
    return StudentGraph(
        runs,
        channels=metadata.channels,
        size_multiple=size_multiple,
        noise=metadata.noise,
        needs_mask=metadata.needs_mask,
        deterministic=metadata.deterministic,
    ).eval()


@contextlib.contextmanager
def _quiet_torch_jit() -> Iterator[None]:
    """Silence torch.jit's deprecation notice (TorchScript is still the portable format we want)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit.* is deprecated", category=FutureWarning)
        warnings.filterwarnings(
            "ignore", message=r".*torch\.jit.* is deprecated", category=DeprecationWarning
        )
        yield


# --------------------------------------------------------------------------------------------
# verification against the eager generator


def example_inputs(
    metadata: StudentMetadata, batch: int, *, nfe: int | None = None, seed: int = 0, size: int | None = None
) -> dict[str, Tensor | None]:
    """Random inputs for an ``nfe``-step run (``xT``, ``z``, ``mask``, ``step_noise``), seeded."""
    steps = metadata.nfe if nfe is None else nfe
    side = metadata.image_size if size is None else size
    generator = torch.Generator().manual_seed(seed)
    shape = (batch, metadata.channels, side, side)
    xT = torch.rand(shape, generator=generator) * 2.0 - 1.0
    mask = None
    if metadata.needs_mask:
        mask = torch.zeros(batch, 1, side, side)
        mask[:, :, side // 4 : side // 4 + side // 2, side // 4 : side // 4 + side // 2] = 1.0
        xT = torch.lerp(xT, torch.randn(shape, generator=generator), mask)
    z = torch.randn(shape, generator=generator) if metadata.noise else None
    step_noise = None
    if steps > 1 and not metadata.deterministic:
        step_noise = torch.randn((steps - 1, *shape), generator=generator)
    return {"xT": xT, "z": z, "mask": mask, "step_noise": step_noise}


def eager_restore(
    student: LoadedStudent, inputs: Mapping[str, Tensor | None], nfe: int | None = None
) -> Tensor:
    """The eager generator on explicit inputs (the reference an export must reproduce)."""
    step_noise = inputs.get("step_noise")
    device = student.device

    def moved(value: Tensor | None) -> Tensor | None:
        return None if value is None else value.to(device, torch.float32)

    with torch.no_grad():
        return student.generator(
            moved(inputs["xT"]),
            moved(inputs.get("z")),
            mask=moved(inputs.get("mask")),
            nfe=nfe,
            step_noise=None if step_noise is None else list(moved(step_noise).unbind(0)),
        )


def _verify(
    run: Callable[[Mapping[str, Tensor | None], int], Tensor],
    student: LoadedStudent,
    metadata: StudentMetadata,
    config: ExportConfig,
    *,
    what: str,
    step_counts: Sequence[int],
) -> float:
    """Largest difference between ``run(inputs, nfe)`` and the eager generator; raises beyond ``atol``."""
    worst = 0.0
    if config.verify_batch_size == 0:
        return worst
    for steps in step_counts:
        inputs = example_inputs(metadata, config.verify_batch_size, nfe=steps, seed=steps)
        expected = eager_restore(student, inputs, nfe=steps).cpu()
        worst = max(worst, float((run(inputs, steps).cpu() - expected).abs().max()))
    if not worst <= config.atol:
        raise ExportError(
            f"the {what} export differs from the eager student by {worst:.3g} (> export.atol = {config.atol})"
        )
    return worst


# --------------------------------------------------------------------------------------------
# TorchScript


@dataclass
class ExportedStudent:
    """A TorchScript student and its metadata (``module(xT, z, mask, step_noise, nfe) -> x0``)."""

    module: torch.jit.ScriptModule
    metadata: StudentMetadata

    def __call__(
        self,
        xT: Tensor,
        z: Tensor | None = None,
        mask: Tensor | None = None,
        step_noise: Tensor | None = None,
        nfe: int | None = None,
    ) -> Tensor:
        with torch.no_grad():
            return self.module(xT, z, mask, step_noise, nfe)


def _load_student(checkpoint: Mapping[str, Any], config: ExportConfig) -> LoadedStudent:
    return student_from_checkpoint(checkpoint, use_ema=config.use_ema, device="cpu")


def _metadata(student: LoadedStudent, checkpoint: Mapping[str, Any], config: ExportConfig) -> StudentMetadata:
    step = checkpoint.get("step")
    return student_metadata(
        student, weights="ema" if config.use_ema else "raw", step=None if step is None else int(step)
    )


def export_torchscript(checkpoint: Mapping[str, Any], config: ExportConfig | None = None) -> ExportedStudent:
    """Export a student checkpoint (``distill.student`` format) to TorchScript, and verify it.

    The exported module reproduces the eager generator for equal inputs (checked on a random
    batch for every step count unless ``config.verify_batch_size`` is 0); it is on the CPU and
    may be moved to any device. A checkpoint that is not a student's raises
    :class:`~ibmd_pipeline.teacher.model.CheckpointMismatchError`.
    """
    config = config or ExportConfig()
    student = _load_student(checkpoint, config)
    metadata = _metadata(student, checkpoint, config)
    graph = build_student_graph(student, trace=True)
    with _quiet_torch_jit():
        module = torch.jit.script(graph)
    exported = ExportedStudent(module=module, metadata=metadata)

    def run(inputs: Mapping[str, Tensor | None], steps: int) -> Tensor:
        return exported(inputs["xT"], inputs["z"], inputs["mask"], inputs["step_noise"], steps)

    _verify(run, student, metadata, config, what="TorchScript", step_counts=range(1, metadata.nfe + 1))
    return exported


def save_torchscript(exported: ExportedStudent, path: Path | str) -> Path:
    """Write the module with its metadata as the extra file ``ibmd_student.json`` (atomically)."""
    extra = {METADATA_FILE: exported.metadata.to_json()}
    with _quiet_torch_jit():
        return atomic_write(path, lambda handle: torch.jit.save(exported.module, handle, _extra_files=extra))


def is_torchscript_file(path: Path | str) -> bool:
    """Whether ``path`` is a TorchScript archive carrying an exported student's metadata."""
    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.split("/", 1)[-1] == f"extra/{METADATA_FILE}" for name in archive.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def load_torchscript(path: Path | str, device: torch.device | str = "cpu") -> ExportedStudent:
    """Load an exported student on ``device``; :class:`CheckpointError` names the file on any fault."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"model file '{path}' does not exist")
    extra = {METADATA_FILE: ""}
    try:
        with _quiet_torch_jit():
            module = torch.jit.load(str(path), map_location=torch.device(device), _extra_files=extra)
    except Exception as err:  # torch raises RuntimeError and others for damaged archives
        raise CheckpointError(
            f"'{path}' cannot be read as a TorchScript student: {type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}"
        ) from err
    if not extra[METADATA_FILE]:
        raise CheckpointError(
            f"'{path}' is a TorchScript file without IBMD student metadata ({METADATA_FILE})"
        )
    metadata = StudentMetadata.from_json(extra[METADATA_FILE], str(path))
    return ExportedStudent(module=module.eval(), metadata=metadata)


# --------------------------------------------------------------------------------------------
# ONNX


@dataclass
class ExportedOnnx:
    """An ONNX student (serialised model bytes, metadata included) and its metadata.

    Inputs, by name: those of :meth:`StudentMetadata.inputs` for N steps (the graph is fixed
    to the trained N); the batch dimension is dynamic, the image size fixed. Output: ``x0``.
    """

    model: bytes
    metadata: StudentMetadata


class _OnnxSignature(nn.Module):
    """The N-step graph with only the inputs this student uses, in a fixed order (ONNX has no None)."""

    def __init__(self, graph: StudentGraph, inputs: list[str]):
        super().__init__()
        self.student = graph
        self.names = inputs

    def forward(self, *tensors: Tensor) -> Tensor:
        given = dict(zip(self.names, tensors, strict=True))
        return self.student(given["xT"], given.get("z"), given.get("mask"), given.get("step_noise"))


def _require_onnx() -> None:
    missing = [name for name in ("onnx", "onnxscript") if importlib.util.find_spec(name) is None]
    if missing:
        raise ExportError(
            f"ONNX export needs {' and '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} not "
            f"installed: pip install {' '.join(ONNX_REQUIREMENTS)}"
        )


def export_onnx(checkpoint: Mapping[str, Any], config: ExportConfig | None = None) -> ExportedOnnx:
    """Export a student checkpoint to ONNX (torch's dynamo exporter), fixed to its N steps.

    Needs ``onnx`` and ``onnxscript`` (:data:`ONNX_REQUIREMENTS`). GroupNorm becomes
    InstanceNormalization with reshapes and attention becomes MatMul/Softmax, all in opset 18.
    When ``onnxruntime`` is installed, the model is run on a random batch and compared with the
    eager generator (``config.atol``).
    """
    _require_onnx()
    import onnx

    config = config or ExportConfig()
    student = _load_student(checkpoint, config)
    metadata = _metadata(student, checkpoint, config)
    names = metadata.inputs()
    wrapper = _OnnxSignature(build_student_graph(student), names).eval()
    example = example_inputs(metadata, 2)
    batch = torch.export.Dim("batch", min=1)
    # The batch is dim 0 of every input except step_noise (steps, batch, C, H, W).
    dynamic = tuple({1 if name == "step_noise" else 0: batch} for name in names)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter warns about every decomposition it applies
        program = torch.onnx.export(
            wrapper,
            tuple(example[name] for name in names),
            input_names=names,
            output_names=["x0"],
            opset_version=config.onnx_opset,
            dynamic_shapes=(dynamic,),
            dynamo=True,
            external_data=False,
            verbose=False,
        )
    model = program.model_proto
    onnx.helper.set_model_props(model, {METADATA_FILE: metadata.to_json()})
    exported = ExportedOnnx(model=model.SerializeToString(), metadata=metadata)
    if importlib.util.find_spec("onnxruntime") is not None:
        session = onnx_session(exported.model)
        _verify(
            lambda inputs, _: run_onnx(session, metadata, inputs),
            student,
            metadata,
            config,
            what="ONNX",
            step_counts=[metadata.nfe],
        )
    return exported


def onnx_session(model: bytes | str | Path) -> Any:
    """An ``onnxruntime.InferenceSession`` on the CPU for a serialised model or a file."""
    try:
        import onnxruntime
    except ImportError as err:
        raise ExportError("running an ONNX student needs onnxruntime: pip install onnxruntime") from err
    source = model if isinstance(model, bytes) else str(model)
    return onnxruntime.InferenceSession(source, providers=["CPUExecutionProvider"])


def run_onnx(session: Any, metadata: StudentMetadata, inputs: Mapping[str, Tensor | None]) -> Tensor:
    """Run an ONNX student's session on the inputs it declares (:meth:`StudentMetadata.inputs`)."""
    feeds = {name: inputs[name].detach().cpu().numpy() for name in metadata.inputs()}
    return torch.from_numpy(session.run(["x0"], feeds)[0])


def save_onnx(exported: ExportedOnnx, path: Path | str) -> Path:
    """Write the ONNX model (metadata inside) atomically."""
    return atomic_write(path, lambda handle: handle.write(exported.model))


def onnx_metadata(model: bytes, source: str) -> StudentMetadata:
    """The student metadata stored in a serialised ONNX model's ``metadata_props``."""
    _require_onnx()
    import onnx

    try:
        proto = onnx.load_model_from_string(model)
    except Exception as err:  # protobuf raises DecodeError and others for damaged bytes
        raise ExportError(f"'{source}' is not a readable ONNX model: {type(err).__name__}: {err}") from err
    props = {entry.key: entry.value for entry in proto.metadata_props}
    if METADATA_FILE not in props:
        raise ExportError(f"'{source}' is an ONNX model without IBMD student metadata ({METADATA_FILE})")
    return StudentMetadata.from_json(props[METADATA_FILE], source)
