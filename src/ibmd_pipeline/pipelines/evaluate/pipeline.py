"""The ``evaluate`` pipelines: cached references and the cached teacher evaluation, then the
student scored against them.

* ``evaluate_reference``: CA classifier (clean training split) and the Inception reference
  (clean images no model restores), each stamped with a fingerprint of the test data.
* ``evaluate_teacher``: the teacher (and the corrupted input) restored and measured at every
  NFE and seed -> ``teacher_evaluation``, keyed by the teacher's version and the settings.
* ``evaluate_models``: the student on the same test images and seeds, every model timed
  together -> ``metrics`` (JSON), ``metrics_table`` (markdown), ``evaluate_plot``, ``evaluate_grid``.

``evaluate`` is all three. After a new distillation from the same teacher,
``kedro run --pipelines=evaluate_models`` reuses the cached references and teacher evaluation
(and stops, asking for ``evaluate_reference`` or ``evaluate_teacher``, when they are stale).
"""

from kedro.pipeline import Node, Pipeline

from ibmd_pipeline.pipelines.evaluate.nodes import (
    evaluate_models_node,
    evaluate_teacher_node,
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
                inputs=["pairs_test", "pairs_train", "params:evaluate", "params:engine"],
                outputs="fid_reference_stats",
                name="compute_fid_reference",
            ),
        ]
    )


def create_teacher_pipeline(**kwargs) -> Pipeline:
    """Build ``evaluate_teacher``: the teacher measured once for all its students."""
    return Pipeline(
        [
            Node(
                evaluate_teacher_node,
                inputs=[
                    "pairs_test",
                    "teacher_model",
                    "classifier_model",
                    "fid_reference_stats",
                    "params:evaluate",
                    "params:task",
                    "params:engine",
                ],
                outputs="teacher_evaluation",
                name="evaluate_teacher",
            ),
        ]
    )


def create_models_pipeline(**kwargs) -> Pipeline:
    """Build ``evaluate_models``: the student against the cached references and teacher evaluation."""
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
                    "teacher_evaluation",
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
    """Build ``evaluate``: ``evaluate_reference``, ``evaluate_teacher``, then ``evaluate_models``."""
    return create_reference_pipeline() + create_teacher_pipeline() + create_models_pipeline()
