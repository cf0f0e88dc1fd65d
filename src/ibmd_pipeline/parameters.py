"""The run's parameter sections, each checked by the library function that parses it.

A Kedro run validates every section its pipelines read before the first node starts
(:class:`ibmd_pipeline.hooks.ParameterValidationHooks`), so a bad ``distill.*`` or ``evaluate.*``
value fails in seconds instead of after the teacher has trained. The rules themselves live with
each config (``DataConfig.validate``, ``parse_distill_config``...); this module only names which
function checks which section, and runs the cross-section checks that need no data.

No Kedro here: ``validate_parameters`` takes the parameters as a plain mapping.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from ibmd_pipeline.budget.plan import parse_budget_config
from ibmd_pipeline.data import DataConfig, check_seed
from ibmd_pipeline.degradations import TaskConfig
from ibmd_pipeline.deploy.export import ExportConfig
from ibmd_pipeline.distill.config import parse_distill_config
from ibmd_pipeline.engine.config import ConfigError, parse_config
from ibmd_pipeline.engine.devices import EngineConfig
from ibmd_pipeline.evaluation.config import parse_evaluate_config
from ibmd_pipeline.teacher import parse_teacher_config, plan_teacher
from ibmd_pipeline.teacher.importers.config import parse_import_config
from ibmd_pipeline.tracking import parse_tracking_config

__all__ = ["SECTION_PARSERS", "check_section_names", "parameter_sections", "validate_parameters"]


def _parse_teacher(values: Any) -> Any:
    # The global seed fills `teacher.train.seed` inside the node; any valid seed parses alike here.
    return parse_teacher_config(values, seed=0)


#: Each top-level parameter section and the function that turns it into its validated config
#: (``ConfigError`` naming the dotted key and the allowed values when it is wrong).
SECTION_PARSERS: dict[str, Callable[[Any], Any]] = {
    "seed": check_seed,
    "engine": lambda values: parse_config(EngineConfig, values, "engine"),
    "task": lambda values: parse_config(TaskConfig, values, "task"),
    "data": lambda values: parse_config(DataConfig, values, "data"),
    "teacher": _parse_teacher,
    "teacher_import": parse_import_config,
    "distill": lambda values: parse_distill_config(values, "distill"),
    "export": lambda values: parse_config(ExportConfig, values, "export"),
    "evaluate": lambda values: parse_evaluate_config(values, "evaluate"),
    "tracking": parse_tracking_config,
    "budget": parse_budget_config,
}


def parameter_sections(dataset_names: Iterable[str]) -> set[str]:
    """The top-level parameter sections that pipeline inputs name: ``params:distill`` and
    ``params:distill.train`` -> ``distill``; the whole ``parameters`` -> every known section."""
    sections: set[str] = set()
    for name in dataset_names:
        if name == "parameters":
            sections.update(SECTION_PARSERS)
        elif name.startswith("params:"):
            sections.add(name.removeprefix("params:").split(".", 1)[0])
    return sections


def check_section_names(params: Mapping[str, Any]) -> None:
    """Refuse a top-level parameter that is no section (``--params distil.train.steps=5``), as
    ``parse_config`` refuses an unknown key inside a section."""
    unknown = sorted(set(params) - set(SECTION_PARSERS))
    if unknown:
        raise ConfigError(unknown[0], f"unknown parameter section; allowed: {', '.join(SECTION_PARSERS)}")


def validate_parameters(params: Mapping[str, Any], sections: Iterable[str]) -> dict[str, Any]:
    """Parse each of ``sections`` of ``params`` with its library parser; returns the configs.

    Sections without a parser (none today) pass unchecked. When the teacher, task and data
    sections are all checked, the teacher they describe is planned as the teacher node plans it
    (bridge, network against the image size, grid NFEs), and with ``evaluate`` too, every
    evaluated teacher NFE must be one that teacher's sampler can run.

    Raises :class:`ConfigError` for the first bad value, in a fixed section order.
    """
    wanted = set(sections)
    parsed = {name: parser(params.get(name)) for name, parser in SECTION_PARSERS.items() if name in wanted}
    if {"teacher", "task", "data"} <= parsed.keys():
        data = parsed["data"]
        plan = plan_teacher(
            parsed["teacher"], parsed["task"], image_size=data.image_size, channels=data.channels
        )
        if "evaluate" in parsed:
            for index, nfe in enumerate(parsed["evaluate"].teacher_nfe):
                try:
                    plan.schedule.grid(nfe)
                except ValueError as err:
                    raise ConfigError(f"evaluate.teacher_nfe[{index}]", str(err)) from None
    return parsed
