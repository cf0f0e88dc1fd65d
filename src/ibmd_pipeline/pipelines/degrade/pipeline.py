"""The ``degrade`` pipeline: data source -> clean/corrupted pairs per split, a corrupted-only
training set for distillation, and a preview grid."""

from kedro.pipeline import Node, Pipeline

from ibmd_pipeline.pipelines.degrade.nodes import make_corrupted_train, make_degrade_grid, make_pairs


def create_pipeline(**kwargs) -> Pipeline:
    """Build the ``degrade`` pipeline."""
    return Pipeline(
        [
            Node(
                make_pairs,
                inputs=["params:data", "params:task", "params:seed"],
                outputs=["pairs_train", "pairs_val", "pairs_test"],
                name="make_pairs",
            ),
            Node(
                make_corrupted_train,
                inputs="pairs_train",
                outputs="corrupted_train",
                name="make_corrupted_train",
            ),
            Node(make_degrade_grid, inputs="pairs_val", outputs="degrade_grid", name="make_degrade_grid"),
        ]
    )
