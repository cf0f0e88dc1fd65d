"""The ``import_teacher`` pipeline: official checkpoint file -> ``teacher_model`` (a new catalog version).

Runs instead of the ``teacher`` pipeline; ``kedro run --pipelines=distill`` then distils the
imported teacher as it would one trained here.
"""

from kedro.pipeline import Node, Pipeline

from ibmd_pipeline.pipelines.import_teacher.nodes import import_teacher_node


def create_pipeline(**kwargs) -> Pipeline:
    """Build the ``import_teacher`` pipeline."""
    return Pipeline(
        [
            Node(
                import_teacher_node,
                inputs=["params:teacher_import", "params:task", "params:data"],
                outputs="teacher_model",
                name="import_teacher",
            )
        ]
    )
