"""Fixtures of the evaluation tests: tiny pairs, teacher, student and cached references.

The builders live in ``evaluation_fakes.py`` (conftest modules cannot be imported by name).
"""

from __future__ import annotations

from typing import Any

import pytest
from evaluation_fakes import make_pairs, make_student, make_teacher, shared_metric_networks, tiny_config

from ibmd_pipeline.evaluation import compute_fid_reference, train_reference_classifier


@pytest.fixture(scope="session", autouse=True)
def metric_networks_built_once():
    with shared_metric_networks():
        yield


@pytest.fixture(scope="session")
def teacher_sr() -> dict[str, Any]:
    return make_teacher("sr4x_bicubic")


@pytest.fixture(scope="session")
def student_sr(teacher_sr: dict[str, Any]) -> dict[str, Any]:
    return make_student(teacher_sr, nfe=1)


@pytest.fixture(scope="session")
def pairs_test() -> dict[str, Any]:
    return make_pairs(12, seed=0)


@pytest.fixture(scope="session")
def pairs_train() -> dict[str, Any]:
    return make_pairs(40, seed=3, split="train")


@pytest.fixture(scope="session")
def references(pairs_train: dict[str, Any], pairs_test: dict[str, Any]) -> dict[str, Any]:
    """The cached references of the tiny config for ``pairs_test``: ``{"classifier", "fid"}``."""
    config = tiny_config()
    classifier = train_reference_classifier(pairs_train, pairs_test, config, progress=False)
    classifier["catalog_version"] = "classifier-v1"
    return {
        "classifier": classifier,
        "fid": compute_fid_reference(pairs_test, config, pairs_train=pairs_train),
    }
