"""The ``evaluate`` pipelines: cached references, then teacher and student scored against them.

* ``evaluate_reference``: CA classifier (clean training split) and FID reference statistics
  (clean test images), each stamped with a fingerprint of the test data.
* ``evaluate_models``: the teacher at several NFE and the student on the same test images and
  seeds -> ``metrics`` (JSON), ``metrics_table`` (markdown), ``evaluate_plot``, ``evaluate_grid``.

``evaluate`` is both. After a new distillation, ``kedro run --pipelines=evaluate_models`` reuses
the cached references (and stops, asking for ``evaluate_reference``, when they are stale).
"""

from kedro.pipeline import Node, Pipeline

from ibmd_pipeline.pipelines.evaluate.nodes import (
    evaluate_models_node,
    fid_reference_node,
    make_metrics_table,
    plot_metrics,
    train_classifier_node,
)


def create_reference_pipeline(**kwargs) -> Pipeline:
    """Build ``evaluate_reference``: the model-independent references, computed once."""
    return Pipeline(
        [
            Node(
                train_classifier_node,
                inputs=["pairs_train", "pairs_test", "params:evaluate", "params:engine"],
                outputs="classifier_model",
                name="train_ca_classifier",
            ),
            Node(
                fid_reference_node,
                inputs=["pairs_test", "params:evaluate", "params:engine"],
                outputs="fid_reference_stats",
                name="compute_fid_reference",
            ),
        ]
    )


def create_models_pipeline(**kwargs) -> Pipeline:
    """Build ``evaluate_models``: teacher and student against the cached references."""
    return Pipeline(
        [
            Node(
                evaluate_models_node,
                inputs=[
                    "pairs_test",
                    "teacher_model",
                    "student_model",
                    "classifier_model",
                    "fid_reference_stats",
                    "params:evaluate",
                    "params:data",
                    "params:task",
                    "params:engine",
                ],
                outputs=["metrics", "evaluate_grid"],
                name="evaluate_models",
            ),
            Node(make_metrics_table, inputs="metrics", outputs="metrics_table", name="make_metrics_table"),
            Node(plot_metrics, inputs="metrics", outputs="evaluate_plot", name="plot_metrics"),
        ]
    )


def create_pipeline(**kwargs) -> Pipeline:
    """Build ``evaluate``: ``evaluate_reference`` then ``evaluate_models``."""
    return create_reference_pipeline() + create_models_pipeline()
