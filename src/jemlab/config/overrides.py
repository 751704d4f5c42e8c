"""Dotted overrides: ``sampler.steps=10`` from the command line, a preset or a config.json, converted to the field's
declared type; unknown keys are errors that list the valid ones."""

from __future__ import annotations

import json
import types
import typing
from typing import Any

from jemlab.config.schema import SECTIONS, Config
from jemlab.errors import ConfigError


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _convert(value: Any, annotation: Any, key: str) -> Any:
    """Convert a string (from the command line) or JSON value to the annotated type."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        is_none = value is None or (isinstance(value, str) and value.lower() in ("none", "null"))
        if is_none and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(value, inner[0], key)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if annotation in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        try:
            number = annotation(value) if annotation is float else _to_int(value)
        except (TypeError, ValueError, OverflowError):
            kind = "an integer" if annotation is int else "a number"
            raise ConfigError(f"{key} must be {kind}, got {value!r}") from None
        return number
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return value
    if origin is tuple:
        items = value
        if isinstance(value, str):
            # "10,20", "(10, 20)" or "[10, 20]" (the TOML/JSON spelling of the same list)
            items = [v for v in value.strip("[]() ").split(",") if v.strip()]
        if not isinstance(items, (list, tuple)):
            raise ConfigError(f"{key} must be a comma-separated list, got {value!r}")
        item_type = args[0] if args else str
        converted = tuple(_convert(v.strip() if isinstance(v, str) else v, item_type, key) for v in items)
        if len(args) == 2 and args[1] is not Ellipsis and len(converted) != 2:
            raise ConfigError(f"{key} needs exactly 2 values, got {value!r}")
        return converted
    if origin is dict or annotation is dict:
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                raise ConfigError(f"{key} must be a JSON object, got {value!r}") from None
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a JSON object, got {value!r}")
        return dict(value)
    return value


def _to_int(value: Any) -> int:
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError(value)
        return int(value)
    if isinstance(value, str):
        return int(float(value)) if "e" in value.lower() else int(value)
    return int(value)


def _parse_option(value: Any) -> Any:
    """Backbone options have no declared type here: read command-line strings as JSON when possible."""
    if not isinstance(value, str):
        return value
    if value.lower() in ("none", "null"):
        return None
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value


def set_value(config: Config, key: str, value: Any) -> None:
    """Set a dotted key such as ``sampler.steps`` (value converted and checked); unknown keys are errors."""
    parts = key.split(".")
    if key == "preset":
        config.preset = str(value)
        return
    if parts[0] not in SECTIONS or len(parts) < 2:
        raise ConfigError(
            f"unknown config key '{key}'; keys look like <section>.<name> with section one of: {', '.join(SECTIONS)}"
        )
    section = getattr(config, parts[0])
    name = parts[1]
    if parts[0] == "model" and name not in ("name", "energy_head", "options"):
        if len(parts) != 2:
            raise ConfigError(f"unknown config key '{key}'")
        section.options[name] = _parse_option(value)
        return
    if parts[0] == "model" and name == "options" and len(parts) == 3:
        section.options[parts[2]] = _parse_option(value)
        return
    field_types = _field_types(type(section))
    if name not in field_types or len(parts) != 2:
        raise ConfigError(f"unknown config key '{key}'; {parts[0]} has: {', '.join(field_types)}")
    setattr(section, name, _convert(value, field_types[name], key))


def parse_overrides(pairs: list[str]) -> list[tuple[str, str]]:
    """Split ``key=value`` strings from the command line."""
    out = []
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"--set expects key=value (e.g. --set sampler.steps=10), got '{pair}'")
        key, value = pair.split("=", 1)
        out.append((key.strip(), value.strip()))
    return out
