"""Typed config parsing (engine.config): conversions, error keys, round trips."""

from __future__ import annotations

import dataclasses
import math
import pickle
from dataclasses import dataclass, field
from typing import Literal

import pytest

from ibmd_pipeline.engine.config import ConfigError, config_to_dict, parse_config, require


@dataclass(frozen=True)
class Inner:
    width: int = 8
    mult: tuple[int, ...] = (1, 2)

    def validate(self, key: str) -> None:
        require(self.width > 0, f"{key}.width" if key else "width", f"must be > 0, got {self.width}")


@dataclass(frozen=True)
class Outer:
    name: str
    rate: float = 0.1
    kind: Literal["a", "b"] = "a"
    pair: tuple[float, float] = (0.9, 0.99)
    flag: bool = False
    maybe: int | None = None
    number_or_text: int | str = 0
    tags: list[str] = field(default_factory=list)
    inner: Inner = field(default_factory=Inner)
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Checked:
    value: int = 1

    def __post_init__(self) -> None:
        if self.value == 13:
            raise ValueError("13 is unlucky")


def test_conversions():
    config = parse_config(
        Outer,
        {
            "name": "run",
            "rate": 1,
            "kind": "b",
            "pair": [0.5, 1],
            "flag": True,
            "maybe": 3.0,
            "number_or_text": "x",
            "tags": ["u", "v"],
            "inner": {"width": 4, "mult": [1, 2, 4]},
            "extra": {"k": 1},
        },
        "root",
    )
    assert config.rate == 1.0 and isinstance(config.rate, float)
    assert config.pair == (0.5, 1.0) and isinstance(config.pair, tuple)
    assert config.maybe == 3 and isinstance(config.maybe, int)
    assert config.inner == Inner(width=4, mult=(1, 2, 4))
    assert config.tags == ["u", "v"] and config.number_or_text == "x" and config.extra == {"k": 1}


def test_defaults_and_none_mapping():
    assert parse_config(Inner, None) == Inner()
    assert parse_config(Outer, {"name": "n"}).inner == Inner()


@pytest.mark.parametrize(
    ("mapping", "key", "fragment"),
    [
        ({}, "root.name", "is required"),
        ({"name": "n", "rte": 1.0}, "root.rte", "allowed keys: extra, flag, inner"),
        ({"name": "n", "kind": "c"}, "root.kind", "allowed values: 'a', 'b'"),
        ({"name": "n", "flag": 1}, "root.flag", "expected true or false"),
        ({"name": "n", "rate": "fast"}, "root.rate", "expected a number"),
        ({"name": "n", "rate": math.inf}, "root.rate", "finite"),
        ({"name": "n", "rate": True}, "root.rate", "expected a number"),
        ({"name": "n", "maybe": 2.5}, "root.maybe", "expected an integer"),
        ({"name": "n", "pair": [1.0]}, "root.pair", "expected 2 items"),
        ({"name": "n", "pair": "ab"}, "root.pair", "expected a list"),
        ({"name": "n", "inner": {"mult": [1, "x"]}}, "root.inner.mult[1]", "expected an integer"),
        ({"name": "n", "inner": {"width": 0}}, "root.inner.width", "must be > 0"),
        ({"name": "n", "inner": 3}, "root.inner", "expected a mapping"),
        ({"name": "n", "extra": [1]}, "root.extra", "expected a mapping"),
        ({"name": 5}, "root.name", "expected a string"),
    ],
)
def test_errors_name_the_dotted_key(mapping, key, fragment):
    with pytest.raises(ConfigError) as info:
        parse_config(Outer, mapping, "root")
    assert info.value.key == key
    assert fragment in str(info.value)
    assert str(info.value).startswith(f"parameter '{key}': ")


def test_post_init_errors_become_config_errors():
    with pytest.raises(ConfigError, match="13 is unlucky") as info:
        parse_config(Checked, {"value": 13}, "section")
    assert info.value.key == "section"


def test_not_a_mapping():
    with pytest.raises(ConfigError, match="expected a mapping of settings"):
        parse_config(Inner, [1, 2], "x")  # type: ignore[arg-type]


def test_config_to_dict_round_trip():
    config = Outer(name="n", pair=(0.1, 0.2), tags=["t"], inner=Inner(width=2, mult=(3,)))
    plain = config_to_dict(config)
    assert plain["pair"] == [0.1, 0.2] and plain["inner"] == {"width": 2, "mult": [3]}
    assert parse_config(Outer, plain) == config
    assert config_to_dict(dataclasses.replace(config, extra={1: (2, 3)}))["extra"] == {"1": [2, 3]}


def test_config_error_survives_pickling():
    """Errors raised in worker processes (parallel runners) must reach the parent intact."""
    error = pickle.loads(pickle.dumps(ConfigError("a.b", "is wrong")))
    assert isinstance(error, ConfigError) and error.key == "a.b" and error.message == "is wrong"
    assert str(error) == "parameter 'a.b': is wrong"


def test_require():
    require(True, "k", "unused")
    with pytest.raises(ConfigError, match="parameter 'k': bad"):
        require(False, "k", "bad")
