"""Kedro datasets for the reports (metrics JSON, tables, images, plots), written atomically.

kedro-datasets' ``json.JSONDataset``, ``text.TextDataset``, ``pillow.ImageDataset`` and
``matplotlib.MatplotlibDataset`` write straight into the final file, so a run killed during a
save leaves a torn ``metrics.json`` or PNG that the next load (a notebook, MLflow, a re-run of
``evaluate``) reads. These datasets write the same content through
``engine.storage.write_atomically``, like the project's other datasets (``io.datasets``): on a local
disk into a temporary file beside the target, moved into place once complete; in an object store
as one complete upload. A versioned save never replaces a file that is already there. They take
local paths or URLs (``s3://``, ``gs://``, ``memory://``) with ``credentials`` and ``fs_args``, and
Kedro's versioning (``io.datasets.VersionedFileDataset``).

* :class:`JSONReportDataset`: any JSON value, indented by 2 as kedro-datasets writes it;
* :class:`TextReportDataset`: a string, UTF-8 (e.g. a markdown table);
* :class:`ImageReportDataset`: a PIL image in the format of the file's extension (PNG);
* :class:`FigureReportDataset`: a matplotlib figure drawn in the format of the file's extension;
  loads back as the PIL image of the saved file.

The JSON and image datasets give kedro-viz its previews, as kedro-datasets' ones do.
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path
from typing import Any

from kedro.io.core import DatasetError
from kedro_datasets._typing import ImagePreview, JSONPreview
from matplotlib.figure import Figure
from PIL import Image

from ibmd_pipeline.io.datasets import VersionedFileDataset

__all__ = ["FigureReportDataset", "ImageReportDataset", "JSONReportDataset", "TextReportDataset"]

#: kedro-datasets' ``json.JSONDataset`` default, so the files read as before.
JSON_INDENT = 2


class _ReportDataset(VersionedFileDataset):
    """Atomic, optionally versioned saves of bytes to one file."""

    def _write_content(self, content: bytes) -> None:
        self._write(lambda handle: handle.write(content))


class JSONReportDataset(_ReportDataset):
    """A JSON value (e.g. the evaluation's metrics) as an indented ``.json`` file."""

    def load(self) -> Any:
        return json.loads(self._read_bytes())

    def save(self, data: Any) -> None:
        self._write_content(json.dumps(data, indent=JSON_INDENT).encode())

    def preview(self) -> JSONPreview:
        """The file's JSON, for kedro-viz."""
        return JSONPreview(json.dumps(self.load()))


class TextReportDataset(_ReportDataset):
    """A string (e.g. a markdown table) as a UTF-8 text file."""

    def load(self) -> str:
        return self._read_bytes().decode()

    def save(self, data: str) -> None:
        if not isinstance(data, str):
            raise DatasetError(f"{type(self).__name__} saves a string, got {type(data).__name__}")
        self._write_content(data.encode())


class _ImageFileDataset(_ReportDataset):
    """Image files: loaded as PIL images, previewed in kedro-viz."""

    def load(self) -> Image.Image:
        with Image.open(io.BytesIO(self._read_bytes())) as image:
            return image.copy()

    def preview(self) -> ImagePreview:
        """The file as base64, for kedro-viz."""
        return ImagePreview(base64.b64encode(self._read_bytes()).decode())

    def _format(self, registry: dict[str, str]) -> str:
        suffix = Path(str(self._filepath)).suffix.lower()
        if suffix not in registry:
            raise DatasetError(
                f"{type(self).__name__} cannot tell an image format from the extension of "
                f"'{self._filepath}'; use one of {', '.join(sorted(registry))}"
            )
        return registry[suffix]


class ImageReportDataset(_ImageFileDataset):
    """A PIL image (e.g. a sample grid), in the format of the file's extension."""

    def save(self, data: Image.Image) -> None:
        if not isinstance(data, Image.Image):
            raise DatasetError(f"{type(self).__name__} saves a PIL image, got {type(data).__name__}")
        image_format = self._format(Image.registered_extensions())
        buffer = io.BytesIO()
        data.save(buffer, format=image_format)
        self._write_content(buffer.getvalue())


class FigureReportDataset(_ImageFileDataset):
    """A matplotlib figure (a plot), drawn in the format of the file's extension."""

    def save(self, data: Figure) -> None:
        if not isinstance(data, Figure):
            raise DatasetError(f"{type(self).__name__} saves a matplotlib Figure, got {type(data).__name__}")
        formats = {f".{name}": name for name in data.canvas.get_supported_filetypes()}
        buffer = io.BytesIO()
        data.savefig(buffer, format=self._format(formats))
        self._write_content(buffer.getvalue())
        if data.canvas.manager is not None:
            # A pyplot figure stays registered (and in memory) until closed, as
            # kedro-datasets' MatplotlibDataset closes it after saving.
            import matplotlib.pyplot as plt

            plt.close(data)
