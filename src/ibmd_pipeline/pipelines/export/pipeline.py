"""The ``export`` pipelines: ``student_model`` -> ``student_torchscript`` (and ``student_onnx``).

``export`` needs only PyTorch. ``export_onnx`` needs the optional packages ``onnx`` and
``onnxscript`` (``deploy.export.ONNX_REQUIREMENTS``), so it is a pipeline of its own, run on
request (``kedro run --pipelines=export_onnx``).
"""

from kedro.pipeline import Node, Pipeline

from ibmd_pipeline.pipelines.export.nodes import export_student, export_student_onnx


def create_pipeline(**kwargs) -> Pipeline:
    """Build the ``export`` pipeline (TorchScript)."""
    return Pipeline(
        [
            Node(
                export_student,
                inputs=["student_model", "params:export"],
                outputs="student_torchscript",
                name="export_student",
            )
        ]
    )


def create_onnx_pipeline(**kwargs) -> Pipeline:
    """Build the ``export_onnx`` pipeline."""
    return Pipeline(
        [
            Node(
                export_student_onnx,
                inputs=["student_model", "params:export"],
                outputs="student_onnx",
                name="export_student_onnx",
            )
        ]
    )
