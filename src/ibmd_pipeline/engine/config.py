"""Typed, frozen configuration objects built once from Kedro parameters.

Every package defines its own frozen dataclasses; :func:`parse_config` turns a plain mapping
(``params:...``) into one, checking unknown keys, types and allowed values, and raising
:class:`ConfigError` with the dotted key at fault. A dataclass may define
``validate(self, key: str) -> None`` for range checks; it is called after the fields are set.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any, Literal, TypeVar, Union

T = TypeVar("T")


class ConfigError(ValueError):
    """A parameter is missing, unknown, of the wrong type or out of range.

    ``key`` is the dotted parameter path (e.g. ``teacher.train.lr``).
    """

    def __init__(self, key: str, message: str):
        self.key = key
        self.message = message
        super().__init__(f"parameter '{key}': {message}" if key else message)

    def __reduce__(self) -> tuple[type, tuple[str, str]]:
        # Rebuild from (key, message): the default would pass only the formatted text, and
        # the error could not cross a process boundary (Kedro's ParallelRunner, Airflow).
        return (type(self), (self.key, self.message))


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Convert ``value`` to the annotated type ``tp`` or raise a ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)

    if tp is Any:
        return value
    if origin is Literal:
        if value not in args:
            allowed = ", ".join(repr(a) for a in args)
            raise ConfigError(key, f"got {value!r}; allowed values: {allowed}")
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in args:
            if option is type(None):
                continue
            try:
                return _convert(value, option, key)
            except ConfigError as err:
                errors.append(err.message)
        raise ConfigError(key, "; or ".join(errors))
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        return parse_config(tp, value, key)
    if origin in (tuple, list) or tp in (tuple, list):
        if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
            raise ConfigError(key, f"expected a list, got {type(value).__name__} {value!r}")
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            items = [_convert(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
        elif origin is tuple and args:
            if len(value) != len(args):
                raise ConfigError(key, f"expected {len(args)} items, got {len(value)}")
            items = [_convert(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True))]
        elif origin is list and args:
            items = [_convert(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
        else:
            items = list(value)
        return tuple(items) if (origin is tuple or tp is tuple) else items
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(key, f"expected a mapping, got {type(value).__name__}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(key, f"expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(key, f"expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(key, f"expected a number, got {value!r}")
        value = float(value)
        if not math.isfinite(value):
            raise ConfigError(key, f"expected a finite number, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(key, f"expected a string, got {value!r}")
        return value
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(key, f"expected {_type_name(tp)}, got {value!r}")
    return value


def parse_config(cls: type[T], mapping: Mapping[str, Any] | None, key: str = "") -> T:
    """Build the frozen dataclass ``cls`` from ``mapping``, validating every field.

    Missing keys take the dataclass default; unknown keys are an error that lists the allowed
    ones. ``key`` is the dotted prefix used in error messages.
    """
    if mapping is None:
        mapping = {}
    if not isinstance(mapping, Mapping):
        raise ConfigError(key, f"expected a mapping of settings, got {type(mapping).__name__} {mapping!r}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(mapping) - set(fields))
    if unknown:
        raise ConfigError(
            _join(key, str(unknown[0])),
            f"unknown setting; allowed keys: {', '.join(sorted(fields))}",
        )
    hints = typing.get_type_hints(cls)
    values = {}
    for name, field in fields.items():
        sub = _join(key, name)
        if name in mapping:
            values[name] = _convert(mapping[name], hints[name], sub)
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ConfigError(sub, "is required")
    try:
        config = cls(**values)
    except ConfigError:
        raise
    except (TypeError, ValueError) as err:  # a __post_init__ that rejected a value
        raise ConfigError(key, str(err)) from err
    validate = getattr(config, "validate", None)
    if callable(validate):
        validate(key)
    return config


def config_to_dict(config: Any) -> dict[str, Any]:
    """Plain, JSON- and ``weights_only``-safe dict of a config dataclass (tuples become lists)."""

    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, Mapping):
            return {str(k): plain(v) for k, v in value.items()}
        return value

    return plain(config)


def require(condition: bool, key: str, message: str) -> None:
    """Raise ``ConfigError(key, message)`` unless ``condition`` holds (for ``validate`` methods)."""
    if not condition:
        raise ConfigError(key, message)
