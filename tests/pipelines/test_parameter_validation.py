"""Every parameter section a run reads is validated before its first node.

The session tests register a recorder on the session's hooks: it lists every node that starts
and, where a test asks, stops the run at the first one (so a run that passes validation costs
nothing). "No node ran" is then what the recorder saw, not a timing, and the files under
``data/test`` show that nothing was saved.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import pytest
from kedro.framework.hooks import hook_impl
from kedro.framework.session import KedroSession
from kedro.framework.startup import bootstrap_project

from ibmd_pipeline.engine.config import ConfigError
from ibmd_pipeline.parameters import (
    SECTION_PARSERS,
    check_section_names,
    parameter_sections,
    validate_parameters,
)

PROJECT_ROOT = Path(__file__).resolve().parents[2]
TEST_DATA_ROOT = PROJECT_ROOT / "data" / "test"  # conf/test/globals.yml: data_root

BASE_PARAMS = {
    "seed": 0,
    "task": {"kind": "sr4x_bicubic"},
    "data": {"image_size": 32, "channels": 1},
    "teacher": {"model": {"network": {"preset": "tiny"}}},
    "evaluate": {"teacher_nfe": [1, 10]},
    "teacher_import": {"format": "i2sb", "checkpoint": "results/sr4x-bicubic/latest.pt"},
}


class FirstNodeReached(Exception):
    """Raised by the recorder when the run got past validation to its first node."""


class NodeRecorder:
    """Lists the nodes that start; with ``stop=True`` the first one raises instead of running."""

    def __init__(self, stop: bool) -> None:
        self.stop = stop
        self.started: list[str] = []

    @hook_impl
    def before_node_run(self, node: Any) -> None:
        self.started.append(node.name)
        if self.stop:
            raise FirstNodeReached(node.name)


def _files() -> set[Path]:
    return {p for p in TEST_DATA_ROOT.rglob("*") if p.is_file()} if TEST_DATA_ROOT.exists() else set()


def run_session(
    params: dict[str, Any],
    pipelines: list[str] | None = None,
    nodes: list[str] | None = None,
    recorder: NodeRecorder | None = None,
) -> NodeRecorder:
    """``kedro run --env test [--pipelines ...] [--nodes ...] --params ...`` with ``recorder``
    (by default one that stops the run at its first node)."""
    recorder = recorder or NodeRecorder(stop=True)
    with contextlib.chdir(PROJECT_ROOT):
        bootstrap_project(PROJECT_ROOT)
        with KedroSession.create(project_path=PROJECT_ROOT, env="test", runtime_params=params) as session:
            session._hook_manager.register(recorder)
            try:
                session.run(pipeline_names=pipelines, node_names=nodes)
            except FirstNodeReached:
                pass
    return recorder


# ---------------------------------------------------------------- the library function


def test_sections_are_read_from_pipeline_inputs():
    names = ["params:distill", "params:evaluate.fid", "pairs_test", "params:seed"]
    assert parameter_sections(names) == {"distill", "evaluate", "seed"}
    assert parameter_sections(["parameters"]) == set(SECTION_PARSERS)


def test_each_section_fails_with_its_own_key():
    parsed = validate_parameters(BASE_PARAMS, SECTION_PARSERS)
    assert parsed["teacher"].model.network.preset == "tiny" and parsed["seed"] == 0
    bad_values = {
        "seed": -1,
        "engine": {"num_threads": -1},
        "task": {"kind": "sr8x"},
        "data": {"image_size": 4},
        "teacher": {"train": {"steps": 0}},
        "distill": {"train": {"lr_schedule": "linear"}},
        "export": {"atol": 0.5},
        "evaluate": {"num_images": 1},
        "tracking": {"enabled": "yes please"},
        "teacher_import": {"format": "i2sb", "checkpoint": None},
        "budget": {"minutes": 0},
    }
    assert set(bad_values) == set(SECTION_PARSERS)
    for section, value in bad_values.items():
        with pytest.raises(ConfigError, match=rf"^parameter '{section}\b"):
            validate_parameters({**BASE_PARAMS, section: value}, SECTION_PARSERS)
        validate_parameters({**BASE_PARAMS, section: value}, set(SECTION_PARSERS) - {section})


def test_a_section_name_that_is_no_section_is_refused():
    check_section_names(BASE_PARAMS)
    with pytest.raises(ConfigError, match=r"^parameter 'distil': unknown parameter section; allowed: seed, "):
        check_section_names({**BASE_PARAMS, "distil": {"train": {"steps": 5}}})


def test_evaluated_teacher_nfes_are_checked_against_the_teacher_the_run_trains():
    # I2SB's 1000-step discretisation allows at most 999 sampler steps.
    params = {**BASE_PARAMS, "evaluate": {"teacher_nfe": [1, 1000]}}
    with pytest.raises(ConfigError, match=r"evaluate\.teacher_nfe\[1\]"):
        validate_parameters(params, {"teacher", "task", "data", "evaluate"})
    validate_parameters(params, {"evaluate"})  # no teacher described: nothing to check against
    ddbm = {**params, "teacher": {"model": {"schedule": "ddbm_vp", "network": {"preset": "tiny"}}}}
    validate_parameters(ddbm, {"teacher", "task", "data", "evaluate"})  # DDBM takes any NFE


# ---------------------------------------------------------------- real sessions on env test


@pytest.mark.parametrize(
    "params, key",
    [
        ({"distill": {"train": {"steps": 0}}}, r"distill\.train\.steps"),
        ({"evaluate": {"fid": {"dims": 100}}}, r"evaluate\.fid\.dims"),
    ],
)
def test_a_bad_distill_or_evaluate_value_stops_the_full_run_before_any_node(params, key):
    before, recorder = _files(), NodeRecorder(stop=False)  # nodes would really run if validation let them
    with pytest.raises(ConfigError, match=key):
        run_session(params, recorder=recorder)
    assert recorder.started == [] and _files() == before


def test_one_airflow_task_of_the_full_run_checks_the_whole_run():
    """An Airflow task runs one node of ``__default__`` in its own session: the first one
    already refuses a value that only the last one reads."""
    before, recorder = _files(), NodeRecorder(stop=False)
    with pytest.raises(ConfigError, match=r"evaluate\.num_images"):
        run_session({"evaluate": {"num_images": 1}}, ["__default__"], ["make_pairs"], recorder)
    assert recorder.started == [] and _files() == before


def test_a_pipeline_is_not_blocked_by_a_section_it_does_not_read():
    recorder = run_session({"evaluate": {"num_images": 1}}, ["degrade"])
    assert recorder.started == ["make_pairs"]  # validation passed; the recorder stopped it there
    with pytest.raises(ConfigError, match=r"data\.image_size"):
        run_session({"data": {"image_size": 4}}, ["degrade"])
    with pytest.raises(ConfigError, match=r"'distil': unknown parameter section"):  # a typo, in any run
        run_session({"distil": {"train": {"steps": 5}}}, ["degrade"])


def test_the_engine_is_checked_where_a_node_that_uses_it_runs():
    no_such_device = {"engine": {"device": "cuda:99"}}
    recorder = run_session(no_such_device, ["__default__"], ["make_pairs"])  # reads no engine
    assert recorder.started == ["make_pairs"]
    with pytest.raises(ConfigError, match=r"engine\.device"):
        run_session(no_such_device, ["__default__"], ["train_teacher"])
