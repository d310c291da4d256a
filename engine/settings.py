"""The machinery behind EngineConfig's field declarations: one `setting(...)` per field, everything else derived.

Pure, no I/O, no torch. From one dataclass field (its type annotation, default and `Setting` metadata)
come: the `gearshift serve` option (`add_arguments`), the value check (`check`, used by EngineConfig and by
the operator's engineArgs validation), the pod's command-line flags (`to_flags`), and the CRD's
engineArgs OpenAPI schema (`engine_args_schema`; tests/test_config.py fails when the CRD disagrees).
A `Literal[...]` annotation is the field's choice list; `Setting.bytes` marks a Kubernetes byte quantity.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import types
import typing
from dataclasses import dataclass
from typing import Any

from gearshift.engine.errors import GearshiftError
from gearshift.engine.quantity import BYTES_PATTERN, QuantityError, parse_bytes

ENGINES = ("paged", "gguf")


@dataclass(frozen=True)
class Setting:
    help: str
    engines: tuple[str, ...] = ENGINES  # the engines it applies to
    key: str | None = None  # its spec.engineArgs key; None: the operator does not take it from users
    flag: str | None = None  # default: --field-name
    minimum: float | None = None
    maximum: float | None = None
    positive: bool = False  # must be > 0 (a float that may be fractional)
    bytes: bool = False  # a Kubernetes byte quantity ("512Mi", "4Gi") or an int; stored as int bytes
    env: str | None = None  # environment variable that gives the CLI default


def setting(default: Any = dataclasses.MISSING, **kwargs: Any) -> Any:
    """A dataclass field carrying its Setting: `dtype: Literal[...] = setting("auto", help=..., key="dtype")`."""
    return dataclasses.field(default=default, metadata={"setting": Setting(**kwargs)})


@dataclass(frozen=True)
class Declared:
    """One field as the CLI, the operator and the CRD see it."""

    name: str
    type: type  # int | float | str | bool
    optional: bool  # None is allowed
    default: Any  # dataclasses.MISSING when required
    choices: tuple[Any, ...] | None
    setting: Setting

    @property
    def flag(self) -> str:
        return self.setting.flag or "--" + self.name.replace("_", "-")

    @property
    def required(self) -> bool:
        return self.default is dataclasses.MISSING


class SettingError(GearshiftError):
    """A value a setting does not take; `reason` says why, for a message that names the setting."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"{name}: {reason}")
        self.reason = reason


def _unwrap(annotation: Any) -> tuple[type, bool, tuple[Any, ...] | None]:
    """`int | None` -> (int, True, None); `Literal["a", "b"]` -> (str, False, ("a", "b"))."""
    args = typing.get_args(annotation)
    origin = typing.get_origin(annotation)
    optional = False
    if origin in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        optional = len(rest) < len(args)
        assert len(rest) == 1, f"a setting has one type besides None: {annotation}"
        annotation = rest[0]
    if typing.get_origin(annotation) is typing.Literal:
        choices = typing.get_args(annotation)
        return type(choices[0]), optional, choices
    return annotation, optional, None


@functools.cache
def declared(cls: type) -> tuple[Declared, ...]:
    """Every field of `cls` that carries a Setting, in declaration order."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        s = f.metadata.get("setting")
        if s is None:
            continue
        typ, optional, choices = _unwrap(hints[f.name])
        out.append(Declared(f.name, typ, optional, f.default, choices, s))
    return tuple(out)


@functools.cache
def engine_args(cls: type) -> dict[str, Declared]:
    """spec.engineArgs key -> the field it sets."""
    return {d.setting.key: d for d in declared(cls) if d.setting.key}


def check(d: Declared, value: Any) -> Any:
    """`value` as the setting stores it (a byte quantity becomes int bytes), or SettingError."""
    s = d.setting
    if value is None:
        if d.optional:
            return None
        raise SettingError(d.name, "is required")
    if s.bytes:
        try:
            return parse_bytes(value)
        except QuantityError as e:
            raise SettingError(d.name, str(e)) from None
    if d.type is bool:
        if not isinstance(value, bool):
            raise SettingError(d.name, f"must be true or false, got {value!r}")
        return value
    if d.type is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise SettingError(d.name, f"must be an integer, got {value!r}")
    if d.type is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SettingError(d.name, f"must be a number, got {value!r}")
        value = float(value)
    if d.type is str and not isinstance(value, str):
        raise SettingError(d.name, f"must be a string, got {value!r}")
    if d.choices is not None and value not in d.choices:
        raise SettingError(d.name, f"{value!r} is not one of {', '.join(map(str, d.choices))}")
    if s.minimum is not None and value < s.minimum:
        word = "a positive integer" if d.type is int and s.minimum == 1 else f"at least {s.minimum:g}"
        raise SettingError(d.name, f"must be {word}, got {value!r}")
    if s.maximum is not None and value > s.maximum:
        raise SettingError(d.name, f"must be at most {s.maximum:g}, got {value!r}")
    if s.positive and not value > 0:
        raise SettingError(d.name, f"must be positive, got {value!r}")
    return value


def validate(obj: Any) -> None:
    """Check (and normalize in place) every setting of a dataclass instance; errors name the CLI flag."""
    for d in declared(type(obj)):
        try:
            object.__setattr__(obj, d.name, check(d, getattr(obj, d.name)))
        except SettingError as e:
            raise GearshiftError(f"{d.name} ({d.flag}): {e.reason}") from None


def _help(d: Declared, cli: bool = True) -> str:
    s = d.setting
    notes = []
    if s.engines != ENGINES:
        notes.append(f"{' and '.join(s.engines)} only")
    if cli and d.default not in (dataclasses.MISSING, None) and d.type is not bool:
        notes.append(f"default {d.default}")
    if cli and s.env:
        notes.append(f"env {s.env}")
    return s.help + (f" ({'; '.join(notes)})" if notes else "")


def add_arguments(parser: argparse.ArgumentParser, cls: type, names: tuple[str, ...] | None = None,
                  defaults: dict[str, Any] | None = None) -> None:
    """One option per setting of `cls` (or of those in `names`, with `defaults` overriding the field
    defaults); the parsed namespace holds each under its field name."""
    for d in declared(cls):
        if names is not None and d.name not in names:
            continue
        default = (defaults or {}).get(d.name, d.default)
        if d.setting.env and os.environ.get(d.setting.env):
            default = os.environ[d.setting.env]
        kwargs: dict[str, Any] = {"dest": d.name, "help": _help(d)}
        if d.required:
            kwargs["required"] = True
        else:
            kwargs["default"] = default
        if d.type is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = str if d.setting.bytes else d.type
            if d.choices is not None:
                kwargs["choices"] = d.choices
        parser.add_argument(d.flag, **kwargs)


def from_namespace(cls: type, ns: argparse.Namespace, **overrides: Any) -> Any:
    """An instance of `cls` from what `add_arguments` parsed."""
    values = {d.name: getattr(ns, d.name) for d in declared(cls)}
    return cls(**{**values, **overrides})


def to_flags(cls: type, values: dict[str, Any]) -> list[str]:
    """field name -> value, as command-line flags in the given order; None values are left out."""
    by_name = {d.name: d for d in declared(cls)}
    out: list[str] = []
    for name, value in values.items():
        d = by_name[name]
        if value is None:
            continue
        if d.type is bool:
            out.append(d.flag if value else "--no-" + d.flag[2:])
        else:
            out += [d.flag, str(value)]
    return out


def engine_args_schema(cls: type) -> dict[str, Any]:
    """The CRD's spec.engineArgs.properties (OpenAPI v3), key by key."""
    out: dict[str, Any] = {}
    for key, d in engine_args(cls).items():
        s = d.setting
        schema: dict[str, Any] = {"description": _help(d, cli=False)}
        if s.bytes:
            schema.update(type="string", pattern=BYTES_PATTERN)
        else:
            schema["type"] = {bool: "boolean", int: "integer", float: "number", str: "string"}[d.type]
        if d.choices is not None:
            schema["enum"] = list(d.choices)
        if s.minimum is not None:
            schema["minimum"] = s.minimum
        if s.maximum is not None:
            schema["maximum"] = s.maximum
        if s.positive:
            schema.update(minimum=0, exclusiveMinimum=True)
        out[key] = schema
    return out


CRD_MARKER = "# generated from EngineConfig"


def rewrite_crd(text: str, cls: type) -> str:
    """The CRD's text with the lines under its CRD_MARKER comment (down to the first line indented less)
    replaced by engine_args_crd_lines: what `python -m gearshift.engine.config --write` does."""
    lines = text.splitlines(keepends=True)
    start = next(i for i, line in enumerate(lines) if line.strip().startswith(CRD_MARKER)) + 1
    indent = len(lines[start - 1]) - len(lines[start - 1].lstrip())
    end = start
    while end < len(lines) and len(lines[end]) - len(lines[end].lstrip()) >= indent and lines[end].strip():
        end += 1
    return "".join(lines[:start]) + engine_args_crd_lines(cls, indent) + "".join(lines[end:])


def engine_args_crd_lines(cls: type, indent: int = 20) -> str:
    """engine_args_schema as the CRD's lines under engineArgs.properties (JSON is YAML: one line a key)."""
    return "".join(f"{' ' * indent}{key}: {json.dumps(schema)}\n" for key, schema in engine_args_schema(cls).items())
