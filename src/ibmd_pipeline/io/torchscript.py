"""Kedro datasets for exported students: TorchScript and ONNX files with their metadata inside.

* :class:`TorchScriptStudentDataset` saves an :class:`~ibmd_pipeline.deploy.export.ExportedStudent`
  with ``torch.jit.save`` (metadata as the extra file ``ibmd_student.json``) and loads it back on
  the CPU.
* :class:`OnnxStudentDataset` saves an :class:`~ibmd_pipeline.deploy.export.ExportedOnnx`
  (metadata in the model's ``metadata_props``); loading needs the ``onnx`` package.

Both write to a temporary file in the target folder, then rename it into place
(``engine.checkpoint.atomic_write``), and support Kedro versioning like ``io.datasets``.
"""

from __future__ import annotations

from pathlib import Path

from kedro.io.core import DatasetError

from ibmd_pipeline.deploy.export import (
    ExportedOnnx,
    ExportedStudent,
    load_torchscript,
    onnx_metadata,
    save_onnx,
    save_torchscript,
)
from ibmd_pipeline.io.datasets import _LocalVersionedDataset

__all__ = ["OnnxStudentDataset", "TorchScriptStudentDataset"]


class TorchScriptStudentDataset(_LocalVersionedDataset):
    """An exported student as a TorchScript file; loads as ``ExportedStudent`` on the CPU."""

    def load(self) -> ExportedStudent:
        return load_torchscript(Path(self._get_load_path()), device="cpu")

    def save(self, data: ExportedStudent) -> None:
        if not isinstance(data, ExportedStudent):
            raise DatasetError(f"{type(self).__name__} saves an ExportedStudent, got {type(data).__name__}")
        save_torchscript(data, Path(self._get_save_path()))


class OnnxStudentDataset(_LocalVersionedDataset):
    """An exported student as an ONNX file; loads as ``ExportedOnnx`` (needs ``onnx`` to read metadata)."""

    def load(self) -> ExportedOnnx:
        load_path = Path(self._get_load_path())
        model = load_path.read_bytes()
        return ExportedOnnx(model=model, metadata=onnx_metadata(model, str(load_path)))

    def save(self, data: ExportedOnnx) -> None:
        if not isinstance(data, ExportedOnnx):
            raise DatasetError(f"{type(self).__name__} saves an ExportedOnnx, got {type(data).__name__}")
        save_onnx(data, Path(self._get_save_path()))
