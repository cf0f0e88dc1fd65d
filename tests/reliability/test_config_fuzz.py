"""Random parameter overrides through each pipeline's validation: a clear error or a config.

Overrides pick random keys of the real parameter trees (``conf/base/parameters*.yml``, plus
unknown keys) and random values (wrong types, negatives, huge numbers, NaN/inf, strings, None,
lists, nested dicts). Each pipeline's validation must either accept them or raise one of the
project's own errors (``ConfigError`` naming a key of that pipeline's section, ``DataError``,
``CheckpointMismatchError``) -- never a raw ``TypeError``/``KeyError``/``AttributeError`` from
deep inside.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ibmd_pipeline.data import DataConfig, check_seed
from ibmd_pipeline.data.image_set import DataError
from ibmd_pipeline.data.pairs import check_data_and_task
from ibmd_pipeline.degradations import TaskConfig
from ibmd_pipeline.deploy.export import ExportConfig
from ibmd_pipeline.distill.config import parse_distill_config, resolve_distill
from ibmd_pipeline.engine.config import ConfigError, parse_config
from ibmd_pipeline.engine.devices import EngineConfig
from ibmd_pipeline.evaluation.config import parse_evaluate_config
from ibmd_pipeline.teacher.config import parse_teacher_config
from ibmd_pipeline.teacher.model import CheckpointMismatchError
from ibmd_pipeline.teacher.trainer import plan_teacher

CONF = Path(__file__).resolve().parents[2] / "conf" / "base"
PROJECT_ERRORS = (ConfigError, DataError, CheckpointMismatchError)


def _base_parameters() -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for path in sorted(CONF.glob("parameters*.yml")):
        merged.update(yaml.safe_load(path.read_text()) or {})
    return merged


BASE = _base_parameters()


def _paths(tree: Any, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every key path of a nested mapping, inner nodes included."""
    found = []
    if isinstance(tree, Mapping):
        for key, value in tree.items():
            found.append((*prefix, str(key)))
            found.extend(_paths(value, (*prefix, str(key))))
    return found


def _dict_paths(tree: Any, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    found = [prefix] if isinstance(tree, Mapping) else []
    if isinstance(tree, Mapping):
        for key, value in tree.items():
            found.extend(_dict_paths(value, (*prefix, str(key))))
    return found


scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**12), max_value=10**12),
    st.sampled_from([0, 1, 2, 3, 4, -1, 8, 16, 32, 64, 10**9]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, 0.5, 1.0, -0.5, 1e-5, 1e30]),
    st.text(max_size=6),
    st.sampled_from(["auto", "cpu", "cuda", "tiny", "i2sb", "ddbm_vp", "chain", "embedded", "folder",
                     "sr4x_pool", "jpeg", "inpaint_center", "sketch", "paired", "", " "]),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=4), inner, max_size=2)
    ),
    max_leaves=4,
)


@st.composite
def overridden(draw, section: str) -> tuple[dict[str, Any], list[str]]:
    """The base parameters with 1-3 random overrides inside ``section`` (dotted keys returned)."""
    params = copy.deepcopy(BASE)
    paths = [p for p in _paths(BASE) if p[0] == section]
    parents = [p for p in _dict_paths(BASE) if p and p[0] == section]
    changed = []
    for _ in range(draw(st.integers(1, 3))):
        if draw(st.booleans()) or not paths:
            path = (*draw(st.sampled_from(parents)), draw(st.sampled_from(["bogus", "Steps", "lr ", "x"])))
        else:
            path = draw(st.sampled_from(paths))
        node = params
        for part in path[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[path[-1]] = draw(values)
        changed.append(".".join(path))
    return params, changed


def _degrade(params: dict[str, Any]) -> None:
    # The degrade node's validation (pipelines/degrade/nodes.make_pairs) without loading images.
    data = parse_config(DataConfig, params["data"], "data")
    task = parse_config(TaskConfig, params["task"], "task")
    check_seed(params["seed"])
    check_data_and_task(data, task)


def _teacher(params: dict[str, Any]) -> None:
    parse_config(EngineConfig, params["engine"], "engine")
    config = parse_teacher_config(params["teacher"], seed=params["seed"])
    task = parse_config(TaskConfig, BASE["task"], "task")
    plan_teacher(config, task, image_size=32, channels=1)


def _distill(params: dict[str, Any]) -> None:
    config = parse_distill_config(params["distill"])
    for bridge_kind, conditional, inpainting in (("i2sb", False, False), ("ddbm_vp", True, True)):
        resolve_distill(config, bridge_kind=bridge_kind, conditional=conditional, inpainting=inpainting)


def _evaluate(params: dict[str, Any]) -> None:
    parse_evaluate_config(params["evaluate"])


def _export(params: dict[str, Any]) -> None:
    parse_config(ExportConfig, params["export"], "export")


PIPELINES: dict[str, tuple[list[str], Callable[[dict[str, Any]], None]]] = {
    "degrade": (["data", "task", "seed"], _degrade),
    "teacher": (["teacher", "engine"], _teacher),
    "distill": (["distill"], _distill),
    "evaluate": (["evaluate"], _evaluate),
    "export": (["export"], _export),
}


def test_base_parameters_pass_every_validation():
    for _, check in PIPELINES.values():
        check(copy.deepcopy(BASE))


def _check(
    check: Callable[[dict[str, Any]], None], params: dict[str, Any], roots: list[str], changed: list[str]
):
    try:
        check(params)
    except PROJECT_ERRORS as err:
        message = str(err)
        assert message.strip(), f"empty error for overrides {changed}"
        if isinstance(err, ConfigError):
            assert err.key and err.key in message, f"{err!r} does not name its key"
            assert err.key.split(".")[0].split("[")[0] in roots, f"{err.key} is outside {roots} ({changed})"
    except Exception as err:  # noqa: BLE001 - the point: nothing else may escape
        pytest.fail(f"overrides {changed} raised {type(err).__name__}: {err}")


@pytest.mark.parametrize("pipeline", PIPELINES)
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_random_overrides_pass_or_raise_a_project_error_naming_the_key(pipeline: str, data):
    roots, check = PIPELINES[pipeline]
    section = data.draw(st.sampled_from(roots))
    if section not in BASE or not isinstance(BASE[section], Mapping):
        params, changed = copy.deepcopy(BASE), [section]
        params[section] = data.draw(values)
    else:
        params, changed = data.draw(overridden(section))
    _check(check, params, roots, changed)
