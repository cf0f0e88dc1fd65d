"""Project pipelines."""

from kedro.pipeline import Pipeline

from ibmd_pipeline.pipelines import degrade, distill, evaluate, export, import_teacher, teacher

# Order of the full run: each pipeline consumes the persisted outputs of the previous ones.
PIPELINE_ORDER = ("degrade", "teacher", "distill", "export", "evaluate")


def register_pipelines() -> dict[str, Pipeline]:
    """Register the project's pipelines by name; ``__default__`` runs them all in order.

    ``evaluate`` = ``evaluate_reference`` (classifier and Inception reference, cached in the
    catalog) + ``evaluate_teacher`` (the teacher's measurements, cached) + ``evaluate_models``;
    rerun ``evaluate_models`` alone after a new distillation from the same teacher.
    ``export_onnx`` is outside the default run: it needs the optional ``onnx`` extra.
    ``import_teacher`` (also outside it) writes an official I2SB/DDBM checkpoint as ``teacher_model``,
    in place of the ``teacher`` pipeline.
    """
    pipelines = {
        "degrade": degrade.create_pipeline(),
        "teacher": teacher.create_pipeline(),
        "distill": distill.create_pipeline(),
        "export": export.create_pipeline(),
        "evaluate": evaluate.create_pipeline(),
    }
    pipelines["__default__"] = sum((pipelines[name] for name in PIPELINE_ORDER), Pipeline([]))
    pipelines["evaluate_reference"] = evaluate.create_reference_pipeline()
    pipelines["evaluate_teacher"] = evaluate.create_teacher_pipeline()
    pipelines["evaluate_models"] = evaluate.create_models_pipeline()
    pipelines["export_onnx"] = export.create_onnx_pipeline()
    pipelines["import_teacher"] = import_teacher.create_pipeline()
    return pipelines
