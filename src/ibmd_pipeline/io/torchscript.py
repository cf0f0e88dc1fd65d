"""Kedro datasets for exported students: TorchScript and ONNX files with their metadata inside.

* :class:`TorchScriptStudentDataset` saves an :class:`~ibmd_pipeline.deploy.export.ExportedStudent`
  with ``torch.jit.save`` (metadata as the extra file ``ibmd_student.json``) and loads it back on
  the CPU.
* :class:`OnnxStudentDataset` saves an :class:`~ibmd_pipeline.deploy.export.ExportedOnnx`
  (metadata in the model's ``metadata_props``); loading needs the ``onnx`` package.

Both take a local path or a URL, support Kedro versioning and write atomically like
``io.datasets`` (``io.datasets.VersionedFileDataset``). TorchScript reads and writes files by
name, so a remote export is written to a local temporary file by ``deploy.export`` and uploaded
once complete, and read from a downloaded copy.
"""

from __future__ import annotations

import tempfile
from pathlib import Path, PurePosixPath

from kedro.io.core import DatasetError

from ibmd_pipeline.deploy.export import (
    ExportedOnnx,
    ExportedStudent,
    load_torchscript,
    onnx_metadata,
    save_torchscript,
)
from ibmd_pipeline.engine.checkpoint import CheckpointError
from ibmd_pipeline.io.datasets import VersionedFileDataset

__all__ = ["OnnxStudentDataset", "TorchScriptStudentDataset"]


class TorchScriptStudentDataset(VersionedFileDataset):
    """An exported student as a TorchScript file; loads as ``ExportedStudent`` on the CPU."""

    def load(self) -> ExportedStudent:
        if self._fs is None:
            return load_torchscript(Path(self._load_path()), device="cpu")
        url = self._url(self._load_path())
        content = self._read_bytes()
        with tempfile.TemporaryDirectory(prefix="ibmd-download-") as folder:
            copy = Path(folder) / PurePosixPath(str(self._filepath)).name
            copy.write_bytes(content)
            try:
                return load_torchscript(copy, device="cpu")
            except CheckpointError as err:
                raise CheckpointError(str(err).replace(str(copy), url)) from err

    def save(self, data: ExportedStudent) -> None:
        if not isinstance(data, ExportedStudent):
            raise DatasetError(f"{type(self).__name__} saves an ExportedStudent, got {type(data).__name__}")
        if self._fs is None:
            save_torchscript(data, Path(self._save_path()))
            return
        with tempfile.TemporaryDirectory(prefix="ibmd-export-") as folder:
            staged = save_torchscript(data, Path(folder) / PurePosixPath(str(self._filepath)).name)
            content = staged.read_bytes()
        self._write(lambda handle: handle.write(content))


class OnnxStudentDataset(VersionedFileDataset):
    """An exported student as an ONNX file; loads as ``ExportedOnnx`` (needs ``onnx`` to read metadata)."""

    def load(self) -> ExportedOnnx:
        model = self._read_bytes()
        return ExportedOnnx(model=model, metadata=onnx_metadata(model, self._url(self._load_path())))

    def save(self, data: ExportedOnnx) -> None:
        if not isinstance(data, ExportedOnnx):
            raise DatasetError(f"{type(self).__name__} saves an ExportedOnnx, got {type(data).__name__}")
        self._write(lambda handle: handle.write(data.model))
