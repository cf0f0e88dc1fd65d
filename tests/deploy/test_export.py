"""Exported students: TorchScript round trips against the eager generator, metadata, ONNX."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import zipfile

import pytest
import torch

from ibmd_pipeline.deploy import export as export_module
from ibmd_pipeline.deploy.export import (
    METADATA_FILE,
    ExportConfig,
    ExportError,
    StudentMetadata,
    build_student_graph,
    eager_restore,
    example_inputs,
    export_onnx,
    export_torchscript,
    is_torchscript_file,
    load_torchscript,
    save_torchscript,
)
from ibmd_pipeline.distill.student import student_from_checkpoint
from ibmd_pipeline.engine.checkpoint import CheckpointError
from ibmd_pipeline.engine.config import ConfigError, parse_config
from ibmd_pipeline.networks.unet import UNet
from ibmd_pipeline.teacher.model import CheckpointMismatchError

IMAGE_SIZE = 16  # the students of conftest.py
NO_CHECK = ExportConfig(verify_batch_size=0)

# (task, student steps N, noise z): one-step, without z, inpainting (mask, OT-ODE), two-step I2SB,
# two-step conditional DDBM, and a four-step inpainting student run with fewer steps.
STUDENTS = [
    ("sr4x_bicubic", 1, True),
    ("sr4x_bicubic", 1, False),
    ("inpaint_center", 1, False),
    ("sr4x_bicubic", 2, True),
    ("sketch", 2, True),
    ("inpaint_center", 4, True),
]


def _exported_round_trip(tmp_path, checkpoint, config=NO_CHECK):
    path = save_torchscript(export_torchscript(checkpoint, config), tmp_path / "student.ts.pt")
    return load_torchscript(path)


@pytest.mark.parametrize(("task", "nfe", "noise"), STUDENTS)
def test_saved_torchscript_reproduces_the_eager_student_for_every_step_count(
    tmp_path, task, nfe, noise, student_checkpoint
):
    checkpoint = student_checkpoint(task, nfe=nfe, noise=noise)
    loaded = _exported_round_trip(tmp_path, checkpoint)
    student = student_from_checkpoint(checkpoint, use_ema=True)
    for steps in range(1, nfe + 1):
        # A batch of 3 (the trunk was traced with 2): shapes are not baked in.
        inputs = example_inputs(loaded.metadata, 3, nfe=steps, seed=steps)
        expected = eager_restore(student, inputs, nfe=steps)
        got = loaded(inputs["xT"], inputs["z"], inputs["mask"], inputs["step_noise"], steps)
        assert got.shape == expected.shape == (3, 1, IMAGE_SIZE, IMAGE_SIZE)
        assert (got - expected).abs().max() <= 1e-5
        if inputs["mask"] is not None:  # known pixels are pasted from xT
            known = inputs["mask"].expand_as(got) == 0
            assert torch.equal(got[known], inputs["xT"][known])
    default = loaded(inputs["xT"], inputs["z"], inputs["mask"], inputs["step_noise"])
    assert torch.equal(default, got)  # nfe defaults to the trained N


def test_the_export_is_a_function_of_its_noise_inputs(tmp_path, student_checkpoint):
    checkpoint = student_checkpoint("sr4x_bicubic", nfe=2, noise=True)
    loaded = _exported_round_trip(tmp_path, checkpoint)
    inputs = example_inputs(loaded.metadata, 2, seed=0)
    base = loaded(**inputs)
    assert torch.equal(loaded(**inputs), base)  # deterministic
    other_z = loaded(**{**inputs, "z": torch.randn_like(inputs["z"])})
    other_steps = loaded(**{**inputs, "step_noise": torch.randn_like(inputs["step_noise"])})
    assert (other_z - base).abs().max() > 1e-3 and (other_steps - base).abs().max() > 1e-3


def test_metadata_travels_inside_the_torchscript_file(tmp_path, student_checkpoint):
    checkpoint = student_checkpoint("inpaint_center", nfe=2, noise=False)
    exported = export_torchscript(checkpoint, NO_CHECK)
    path = save_torchscript(exported, tmp_path / "student.ts.pt")
    with zipfile.ZipFile(path) as archive:
        stored = [name for name in archive.namelist() if name.endswith(f"extra/{METADATA_FILE}")]
        values = json.loads(archive.read(stored[0]))
    assert values["task"]["kind"] == "inpaint_center"
    assert (values["image_size"], values["channels"], values["nfe"]) == (IMAGE_SIZE, 1, 2)
    assert values["noise"] is False and values["needs_mask"] is True
    assert values["schedule"]["kind"] == "i2sb" and values["schedule"]["ot_ode"] is True
    assert values["deterministic"] is True and values["conditional"] is False
    assert values["teacher_version"] == checkpoint["config"]["teacher_version"]
    assert values["weights"] == "ema" and values["step"] == 7
    loaded = load_torchscript(path)
    assert loaded.metadata == exported.metadata
    # OT-ODE: no step noise even for two steps; the mask is required.
    assert loaded.metadata.inputs() == ["xT", "mask"]
    assert is_torchscript_file(path) and not is_torchscript_file(tmp_path / "missing.pt")


def test_conditional_ddbm_student_metadata(student_checkpoint):
    exported = export_torchscript(student_checkpoint("sketch", nfe=2, noise=True), NO_CHECK)
    meta = exported.metadata
    assert meta.schedule["kind"] == "ddbm_vp" and meta.conditional and not meta.deterministic
    assert meta.inputs() == ["xT", "z", "step_noise"] and meta.inputs(nfe=1) == ["xT", "z"]


def test_export_takes_the_ema_weights_unless_told_otherwise(tmp_path, student_checkpoint):
    checkpoint = student_checkpoint("sr4x_bicubic", nfe=1, noise=True)
    ema = export_torchscript(checkpoint, NO_CHECK)
    raw = export_torchscript(checkpoint, ExportConfig(use_ema=False, verify_batch_size=0))
    inputs = example_inputs(ema.metadata, 2)
    raw_student = student_from_checkpoint(checkpoint, use_ema=False)
    assert raw.metadata.weights == "raw" and ema.metadata.weights == "ema"
    assert torch.equal(raw(**inputs), eager_restore(raw_student, inputs))
    assert (raw(**inputs) - ema(**inputs)).abs().max() > 1e-3


def test_the_export_has_no_device_baked_in(student_checkpoint):
    # Tracing the whole UNet records its embedding's CPU `arange`; the export precomputes it, so
    # the file runs on whatever device it is loaded to.
    exported = export_torchscript(student_checkpoint("sr4x_bicubic", nfe=2), NO_CHECK)
    cpu_constant = 'Constant[value="cpu"]'
    assert cpu_constant not in str(exported.module.inlined_graph)
    net = student_from_checkpoint(student_checkpoint("sr4x_bicubic")).generator.predictor.net
    assert isinstance(net, UNet)
    with export_module._quiet_torch_jit(), pytest.warns(torch.jit.TracerWarning):
        whole = torch.jit.trace(
            net, (torch.zeros(2, 2, IMAGE_SIZE, IMAGE_SIZE), torch.ones(2)), check_trace=False
        )
    assert cpu_constant in str(whole.inlined_graph)


def test_the_exported_file_runs_without_this_package(tmp_path, student_checkpoint):
    checkpoint = student_checkpoint("sr4x_bicubic", nfe=2, noise=True)
    exported = export_torchscript(checkpoint, NO_CHECK)
    path = save_torchscript(exported, tmp_path / "student.ts.pt")
    inputs = example_inputs(exported.metadata, 2)
    torch.save({k: v for k, v in inputs.items() if v is not None}, tmp_path / "inputs.pt")
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["ibmd_pipeline"] = None  # any import of the package fails
        import torch
        torch.set_num_threads({torch.get_num_threads()})  # as here: the thread count sets reduction orders
        model = torch.jit.load({str(path)!r})
        inputs = torch.load({str(tmp_path / "inputs.pt")!r})
        torch.save(model(inputs["xT"], inputs["z"], None, inputs["step_noise"]), {str(tmp_path / "out.pt")!r})
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, timeout=120)
    assert torch.equal(torch.load(tmp_path / "out.pt"), exported(**inputs))


def test_the_exported_module_checks_its_inputs(student_checkpoint):
    exported = export_torchscript(student_checkpoint("sr4x_bicubic", nfe=2, noise=True), NO_CHECK)
    inputs = example_inputs(exported.metadata, 2)
    cases = [
        ({"z": None}, "pass z"),
        ({"step_noise": None}, "needs step_noise"),
        ({"xT": inputs["xT"][:, :, :, :15], "z": inputs["z"][:, :, :, :15]}, "multiples of 4"),
        ({"nfe": 3}, r"nfe must be in \[1, 2\]"),
    ]
    for change, message in cases:
        with pytest.raises(torch.jit.Error, match=message):
            exported(**{**inputs, "nfe": None, **change})
    inpainting = export_torchscript(student_checkpoint("inpaint_center", noise=False), NO_CHECK)
    xT = inputs["xT"]
    with pytest.raises(torch.jit.Error, match="needs the mask"):
        inpainting(xT)
    with pytest.raises(torch.jit.Error, match="takes no noise z"):
        inpainting(xT, torch.zeros_like(xT), torch.zeros(2, 1, IMAGE_SIZE, IMAGE_SIZE))


def test_export_refuses_a_teacher_checkpoint(teacher_checkpoint):
    with pytest.raises(CheckpointMismatchError, match="this is the teacher"):
        export_torchscript(teacher_checkpoint())


def test_export_verification_catches_a_wrong_export(monkeypatch, student_checkpoint):
    real = build_student_graph

    def off_by_a_little(student, *, trace=False):
        graph = real(student, trace=trace)
        for run in graph.runs:
            run.precond[:, 0] += 1e-3  # c_skip of every step
        return graph

    monkeypatch.setattr(export_module, "build_student_graph", off_by_a_little)
    with pytest.raises(ExportError, match="differs from the eager student"):
        export_torchscript(student_checkpoint("sr4x_bicubic"), ExportConfig(verify_batch_size=1))


def test_loading_reports_unusable_files(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_torchscript(tmp_path / "missing.pt")
    (tmp_path / "text.pt").write_text("hello")
    with pytest.raises(CheckpointError, match="cannot be read as a TorchScript student"):
        load_torchscript(tmp_path / "text.pt")
    with export_module._quiet_torch_jit():
        torch.jit.save(torch.jit.script(torch.nn.Identity()), str(tmp_path / "plain.pt"))
    with pytest.raises(CheckpointError, match="without IBMD student metadata"):
        load_torchscript(tmp_path / "plain.pt")
    with pytest.raises(ExportError, match="not an exported IBMD student"):
        StudentMetadata.from_json('{"format": "other"}', "x.pt")


def test_export_config_errors_name_the_key():
    with pytest.raises(ConfigError) as err:
        parse_config(ExportConfig, {"atol": 0.0}, "export")
    assert err.value.key == "export.atol"
    with pytest.raises(ConfigError) as err:
        parse_config(ExportConfig, {"opset": 18}, "export")
    assert err.value.key == "export.opset"


# ---------------------------------------------------------------- ONNX


def test_onnx_export_explains_what_to_install(monkeypatch, student_checkpoint):
    real = export_module.importlib.util.find_spec
    monkeypatch.setattr(
        export_module.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "onnxscript" else real(name, *a),
    )
    with pytest.raises(ExportError, match=r"pip install onnx==\S+ onnxscript==\S+"):
        export_onnx(student_checkpoint())


def test_onnx_export_matches_the_eager_student(student_checkpoint):
    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxruntime")
    checkpoint = student_checkpoint("sr4x_bicubic", nfe=2, noise=True)
    exported = export_onnx(checkpoint, ExportConfig(verify_batch_size=0))
    assert export_module.onnx_metadata(exported.model, "student.onnx") == exported.metadata
    session = export_module.onnx_session(exported.model)
    assert [i.name for i in session.get_inputs()] == ["xT", "z", "step_noise"]
    student = student_from_checkpoint(checkpoint)
    for batch in (1, 3):  # the batch dimension is dynamic
        inputs = example_inputs(exported.metadata, batch, seed=batch)
        got = export_module.run_onnx(session, exported.metadata, inputs)
        assert (got - eager_restore(student, inputs)).abs().max() <= 1e-4
