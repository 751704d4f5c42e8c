"""Presets: one TOML file per recipe, each stating only what differs from the defaults (as score_sde's configs do).

A file's tables are config sections: ``[sampler]`` followed by ``steps = 20`` sets ``sampler.steps``, exactly as
``--set sampler.steps=20`` would, and values are converted and checked the same way (TOML has no null: write
``"none"``, as on the command line). ``extends = "name"`` at the top starts from another preset, or from a shared
fragment, a file whose name starts with ``_`` that is not a preset itself; the file's own keys then replace the
base's one by one (``model.options`` counts as one key).

Why TOML: presets are data, not code (a preset cannot run anything); comments stay next to the values they
explain; tables match the config's sections. Its parser is in the standard library from Python 3.11 (``tomllib``);
on 3.10 it comes from ``tomli``, the same parser published on its own (a dependency for that version only).
"""

from __future__ import annotations

import sys
from importlib import resources
from typing import TYPE_CHECKING, Any

from jemlab.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10
    import tomli as tomllib

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

_SUFFIX = ".toml"


def load_presets(folder: Traversable | None = None) -> dict[str, dict[str, Any]]:
    """Read every preset in a folder of ``*.toml`` files.

    Args:
        folder: where to look (a ``pathlib.Path`` will do); None = the presets shipped with jemlab.

    Returns:
        preset name → its dotted keys and values (``{"sampler.steps": 20, ...}``), base presets already merged in,
        in alphabetical order of names. Fragments (``_name.toml``) are merged into presets but not returned.

    Raises:
        ConfigError: on a file that is not valid TOML, a value outside a section, or an unknown or circular base.
    """
    files = {
        entry.name[: -len(_SUFFIX)]: entry
        for entry in (folder or resources.files(__name__)).iterdir()
        if entry.name.endswith(_SUFFIX)
    }
    tables = {name: _read(name, entry) for name, entry in sorted(files.items())}
    return {name: _resolve(name, tables, ()) for name in tables if not name.startswith("_")}


def _read(name: str, entry: Traversable) -> dict[str, Any]:
    try:
        return tomllib.loads(entry.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"preset '{name}' ({entry.name}) is not valid TOML: {err}") from None


def _resolve(name: str, tables: dict[str, dict[str, Any]], chain: tuple[str, ...]) -> dict[str, Any]:
    """The preset's own keys over those of its base (recursively); ``chain`` is the path here, to catch cycles."""
    if name in chain:
        raise ConfigError(f"presets extend each other in a circle: {' -> '.join([*chain, name])}")
    if name not in tables:
        choices = ", ".join(n for n in tables if n != chain[-1])
        raise ConfigError(f"preset '{chain[-1]}' extends unknown preset '{name}'; choose one of: {choices}")
    table = tables[name]
    base = table.get("extends")
    if base is not None and not isinstance(base, str):
        raise ConfigError(f"preset '{name}': extends must be a preset name in quotes, got {base!r}")
    flat = _resolve(base, tables, (*chain, name)) if base is not None else {}
    flat.update(_flatten(name, table))
    return flat


def _flatten(name: str, table: dict[str, Any]) -> dict[str, Any]:
    """``{"sampler": {"steps": 20}}`` → ``{"sampler.steps": 20}``; ``model.options`` stays one dict."""
    flat = {}
    for section, values in table.items():
        if section == "extends":
            continue
        if not isinstance(values, dict):
            raise ConfigError(f"preset '{name}': '{section}' must be inside a [section] table (or be 'extends')")
        for key, value in values.items():
            flat[f"{section}.{key}"] = value
    return flat
