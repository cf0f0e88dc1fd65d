"""The quick loop, ``make test-fast``: the tests marked ``fast``, one place that lists them.

``tests/conftest.py`` marks every test of :data:`FAST_MODULES` and the tests named in
:data:`FAST_TESTS` (quick tests of modules whose other tests train or spawn). Together they touch
every package of the library at least once (``tests/test_fast_selection.py`` checks the imports),
and run in well under two minutes on 2 cores. ``make test`` still runs everything.
"""

from __future__ import annotations

#: Whole test modules (paths relative to ``tests/``).
FAST_MODULES: tuple[str, ...] = (
    "bridges/test_x0_predictor.py",
    "bridges/test_bridge_losses.py",
    "budget/test_budget_plan.py",
    "data/test_folder_sources.py",
    "data/test_splits_and_pairs.py",
    "data/test_teacher_conventions.py",
    "degradations/test_degradation_ops.py",
    "degradations/test_i2sb_operators.py",
    "distill/test_ibmd_losses.py",
    "engine/test_catalog_files.py",
    "engine/test_engine_checkpoint.py",
    "engine/test_engine_config.py",
    "engine/test_grad_accumulation.py",
    "evaluation/test_evaluation_config.py",
    "evaluation/test_evaluation_summary.py",
    "importers/test_import_conf.py",
    "io/test_report_datasets.py",
    "metrics/test_consistency.py",
    "metrics/test_feature_distances.py",
    "metrics/test_metrics_image_quality.py",
    "metrics/test_metrics_speed.py",
    "metrics/test_uncertainty.py",
    "pipelines/test_parameter_validation.py",
    "teacher/test_teacher_config.py",
    "teacher/test_teacher_sampling_and_plots.py",
    "tracking/test_tracking_unit.py",
    "test_conf_envs.py",
    "test_fast_selection.py",
)

#: Single tests (node ids relative to ``tests/``, parameters included by prefix).
FAST_TESTS: tuple[str, ...] = (
    "data/test_stream.py::test_streamed_splits_hold_the_in_memory_images_in_the_same_order",
    "data/test_stream.py::test_the_distillation_reader_yields_no_clean_image",
    "data/test_stream.py::test_an_unreadable_image_or_shard_is_one_error_naming_it",
    "data/test_stream.py::test_data_stream_is_validated",
    "deploy/test_export.py::test_export_config_errors_name_the_key",
    "deploy/test_export.py::test_loading_reports_unusable_files",
    "deploy/test_restore.py::test_clear_errors_for_unusable_models_and_folders",
    "deploy/test_restore.py::test_the_output_folder_may_not_be_or_lie_inside_the_input_folder",
    "engine/test_ddp_training.py::test_catalog_version_names_sort_like_kedro_and_register_refuses_older",
    "engine/test_elastic_training.py::test_a_process_count_that_cannot_keep_the_global_batch_stops_before_any_work",
    "engine/test_launch.py::test_under_a_launcher_the_process_joins_it_and_spawns_nothing",
    "engine/test_preemption.py::test_a_signal_saves_at_the_step_boundary_and_the_rerun_resumes_exactly",
    "engine/test_preemption.py::test_without_a_workdir_the_signal_still_stops_and_says_nothing_was_saved",
    "networks/test_unet.py::test_preset_sizes",
    "networks/test_unet.py::test_mismatched_state_dict_names_channels_and_keys",
    "networks/test_unet.py::test_input_checks",
    "pipelines/test_degrade.py::test_make_pairs_returns_three_disjoint_splits",
    "pipelines/test_degrade.py::test_make_corrupted_train_keeps_only_what_distillation_may_see",
)
