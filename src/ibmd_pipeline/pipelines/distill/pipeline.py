"""The ``distill`` pipeline: corrupted training images + teacher -> student, curves and a preview.

Its free inputs are ``corrupted_train`` (no clean images), ``teacher_model`` and parameters:
IBMD never sees a clean image (docs/method.md sec. 4.1; IBMD sec. 3.1).
"""

from kedro.pipeline import Node, Pipeline

from ibmd_pipeline.pipelines.distill.nodes import distill_node, make_distill_grid, plot_distill_curves


def create_pipeline(**kwargs) -> Pipeline:
    """Build the ``distill`` pipeline."""
    return Pipeline(
        [
            Node(
                distill_node,
                inputs=["corrupted_train", "teacher_model", "params:distill", "params:task", "params:engine"],
                outputs="student_model",
                name="distill_student",
            ),
            Node(
                plot_distill_curves,
                inputs="student_model",
                outputs="distill_curves_plot",
                name="plot_distill_curves",
            ),
            Node(
                make_distill_grid,
                inputs=["student_model", "teacher_model", "corrupted_train", "params:engine"],
                outputs="distill_grid",
                name="make_distill_grid",
            ),
        ]
    )
