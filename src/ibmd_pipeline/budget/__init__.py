"""The run's time budget (``params:budget``): measured step times, the expected run time, and
fewer training steps when the run would not fit (README, "The default run on your CPU")."""

from ibmd_pipeline.budget.plan import (
    DISTILL_STEPS,
    TEACHER_STEPS,
    BudgetConfig,
    BudgetPlan,
    StepTimes,
    explicit_step_keys,
    format_plan,
    format_revision,
    parse_budget_config,
    plan_budget,
    planned_parameters,
    revise_distillation,
    stage_seconds,
    summarize_plan,
)
from ibmd_pipeline.budget.probe import measure_step_times, precision_path

__all__ = [
    "DISTILL_STEPS",
    "TEACHER_STEPS",
    "BudgetConfig",
    "BudgetPlan",
    "StepTimes",
    "explicit_step_keys",
    "format_plan",
    "format_revision",
    "measure_step_times",
    "parse_budget_config",
    "plan_budget",
    "planned_parameters",
    "precision_path",
    "revise_distillation",
    "stage_seconds",
    "summarize_plan",
]
