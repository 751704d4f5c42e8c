"""Typed configuration: defaults → preset → ``--set key=value`` overrides → validation → saved as JSON.

One idea per module: ``schema.py`` (the dataclasses and their defaults), ``presets/`` (one TOML file per recipe,
stating only what differs from the defaults, as in score_sde's configs), ``overrides.py`` (dotted keys converted to
each field's type; unknown keys are errors that list the valid ones) and ``validation.py`` (range checks, one
function per section). This module puts them together and reads configs back from JSON.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from jemlab.config.overrides import parse_overrides, set_value
from jemlab.config.presets import load_presets
from jemlab.config.schema import (
    SECTIONS,
    Config,
    DataConfig,
    EGCConfig,
    ModelConfig,
    ObjectiveConfig,
    OptimConfig,
    QualityConfig,
    RecoveryConfig,
    SamplerConfig,
    TrainConfig,
)
from jemlab.config.validation import validate_config
from jemlab.errors import ConfigError

__all__ = [
    "PRESETS",
    "SECTIONS",
    "Config",
    "DataConfig",
    "EGCConfig",
    "ModelConfig",
    "ObjectiveConfig",
    "OptimConfig",
    "QualityConfig",
    "RecoveryConfig",
    "SamplerConfig",
    "TrainConfig",
    "build_config",
    "config_from_dict",
    "load_config_file",
    "parse_overrides",
    "set_value",
    "validate_config",
]

# Preset name → its dotted keys (base presets merged in), read once from presets/*.toml.
PRESETS: dict[str, dict[str, Any]] = load_presets()

_SECTIONS = SECTIONS  # the name tests/test_fuzz_parsers.py imports


def build_config(
    preset: str = "default", overrides: list[tuple[str, Any]] | None = None, validate: bool = True
) -> Config:
    """Defaults, then the preset, then the overrides in order; validated unless asked not to."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset '{preset}'; choose one of: {', '.join(PRESETS)}")
    config = Config(preset=preset)
    for key, value in PRESETS[preset].items():
        if key == "model.options":  # replaces the options; each read as on the command line ("none" is None)
            config.model.options = {}
            for name, option in value.items():
                set_value(config, f"model.options.{name}", copy.deepcopy(option))
        else:
            set_value(config, key, value)
    for key, value in overrides or []:
        set_value(config, key, value)
    if validate:
        validate_config(config)
    return config


def config_from_dict(data: dict[str, Any]) -> Config:
    """Rebuild a Config from its JSON form (a run's config.json or a checkpoint); unknown keys are errors."""
    if not isinstance(data, dict):
        raise ConfigError("a config must be a JSON object")
    config = Config(preset=str(data.get("preset", "default")))
    for section, values in data.items():
        if section == "preset":
            continue
        if section not in SECTIONS or not isinstance(values, dict):
            raise ConfigError(f"unknown config section '{section}'; sections: {', '.join(SECTIONS)}")
        for name, value in values.items():
            if section == "model" and name == "options":
                if not isinstance(value, dict):
                    raise ConfigError(f"model.options must be a JSON object, got {value!r}")
                config.model.options = dict(value)
            else:
                set_value(config, f"{section}.{name}", value)
    validate_config(config)
    return config


def load_config_file(path: str | Path) -> Config:
    """Read a config JSON file written by jemlab (or by hand)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except OSError as err:
        raise ConfigError(
            f"{path}: cannot read the config file ({err.strerror or err}); pass a readable file"
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: not valid JSON ({err}); fix or regenerate it with --dry-run") from None
    except RecursionError:
        raise ConfigError(
            f"{path}: JSON nested too deeply to be a jemlab config; regenerate it with --dry-run"
        ) from None
    return config_from_dict(data)
