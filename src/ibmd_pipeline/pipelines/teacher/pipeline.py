"""The ``teacher`` pipeline: pairs -> a trained bridge teacher, its loss curves and a sample grid."""

from kedro.pipeline import Node, Pipeline

from ibmd_pipeline.pipelines.teacher.nodes import make_teacher_grid, plot_teacher_loss, train_teacher_node


def create_pipeline(**kwargs) -> Pipeline:
    """Build the ``teacher`` pipeline."""
    return Pipeline(
        [
            Node(
                train_teacher_node,
                inputs=[
                    "pairs_train",
                    "pairs_val",
                    "params:teacher",
                    "params:task",
                    "params:engine",
                    "params:seed",
                ],
                outputs="teacher_model",
                name="train_teacher",
            ),
            Node(
                plot_teacher_loss,
                inputs="teacher_model",
                outputs="teacher_loss_plot",
                name="plot_teacher_loss",
            ),
            Node(
                make_teacher_grid,
                inputs=["teacher_model", "pairs_val", "params:teacher", "params:engine"],
                outputs="teacher_grid",
                name="make_teacher_grid",
            ),
        ]
    )
