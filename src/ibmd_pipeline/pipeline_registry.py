"""Project pipelines."""

from kedro.pipeline import Pipeline

from ibmd_pipeline.pipelines import degrade

# Order of the full run: each pipeline consumes the persisted outputs of the previous ones.
PIPELINE_ORDER = ("degrade", "teacher", "distill", "evaluate")


def register_pipelines() -> dict[str, Pipeline]:
    """Register the project's pipelines by name; ``__default__`` runs them all in order."""
    pipelines = {"degrade": degrade.create_pipeline()}
    pipelines["__default__"] = sum(pipelines.values(), Pipeline([]))
    return pipelines
