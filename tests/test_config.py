"""Config: presets, overrides with types and ranges, unknown keys, JSON round trip."""

from __future__ import annotations

import json
from importlib import resources

import pytest

from jemlab.config import (
    PRESETS,
    Config,
    build_config,
    config_from_dict,
    load_config_file,
    parse_overrides,
    set_value,
)
from jemlab.config.presets import load_presets
from jemlab.errors import ConfigError

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_resolves_and_round_trips(preset):
    config = build_config(preset)
    assert config_from_dict(json.loads(config.to_json())) == config


def test_course_preset_is_spec_s2():
    c = build_config("course")
    assert (c.sampler.steps, c.sampler.step_size, c.sampler.noise, c.sampler.grad_clamp) == (60, 10.0, 0.005, 0.03)
    assert (c.sampler.buffer_size, c.sampler.buffer_mode, c.model.energy_head) == (8192, "queue", "separate")
    assert (c.optim.lr, c.optim.betas, c.optim.gamma, c.objective.energy_l2) == (1e-4, (0.0, 0.999), 0.97, 0.1)


def test_jem_preset_is_paper_recipe():
    c = build_config("jem")
    assert c.model.options == {"depth": 28, "widen": 10, "norm": None, "act": "leaky_relu"}
    assert (c.sampler.steps, c.sampler.step_size, c.sampler.noise, c.sampler.reinit_prob) == (20, 1.0, 0.01, 0.05)
    assert (c.optim.lr, c.optim.warmup_steps, c.train.batch_size, c.objective.input_noise) == (1e-4, 1000, 64, 0.03)


def test_overrides_are_typed():
    c = build_config(
        "default",
        parse_overrides(
            [
                "sampler.steps=7",
                "optim.betas=0,0.9",
                "sampler.grad_clamp=none",
                "model.width=24",
                "train.tensorboard=false",
            ]
        ),
    )
    assert c.sampler.steps == 7 and c.optim.betas == (0.0, 0.9) and c.sampler.grad_clamp is None
    assert c.model.options["width"] == 24 and c.train.tensorboard is False


@pytest.mark.parametrize(
    ("pair", "message"),
    [
        ("sampler.stepz=3", "unknown config key 'sampler.stepz'"),
        ("bogus.x=1", "unknown config key"),
        ("sampler.steps=ten", "must be an integer"),
        ("sampler.reinit_prob=1.5", r"must be in \[0, 1\]"),
        ("optim.lr=-1", "optim.lr must be in"),
        ("train.device=tpu", "train.device must be"),
        ("model.depth=3", "has no option"),
        ("train.tensorboard=maybe", "true or false"),
    ],
)
def test_bad_values_are_one_line_errors(pair, message):
    with pytest.raises(ConfigError, match=message) as info:
        build_config("default", parse_overrides([pair]))
    assert "\n" not in str(info.value)


def test_set_without_equals_and_bad_json(tmp_path):
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["sampler.steps"])
    bad = tmp_path / "c.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config_file(bad)
    bad.write_text(json.dumps({"sampler": {"nope": 1}}))
    with pytest.raises(ConfigError, match="unknown config key"):
        load_config_file(bad)


# --- preset files ---------------------------------------------------------------------------------------------


def _preset_tables() -> dict:
    """Each shipped preset file's own table (before its base is merged in)."""
    folder = resources.files("jemlab.config.presets")
    files = [entry for entry in folder.iterdir() if entry.name.endswith(".toml")]
    return {entry.name.removesuffix(".toml"): tomllib.loads(entry.read_text(encoding="utf-8")) for entry in files}


def _resolved(tables: dict, name: str | None) -> dict:
    """Defaults plus a preset or fragment's keys (its base's first), as a plain dict."""
    config = Config()
    flat: dict = {}
    while name is not None:  # own keys over the base's
        table = tables[name]
        own = {f"{s}.{k}": v for s, section in table.items() if s != "extends" for k, v in section.items()}
        flat = {**own, **flat}
        name = table.get("extends")
    for key, value in flat.items():
        set_value(config, key, value)
    return config.to_dict()


@pytest.mark.parametrize("name", sorted(_preset_tables()))
def test_preset_files_state_only_what_differs(name):
    """score_sde's rule: a preset sets a key only where it changes what the defaults (or its base) would give."""
    tables = _preset_tables()
    base = tables[name].get("extends")
    before = _resolved(tables, base)
    for section, values in tables[name].items():
        if section == "extends":
            continue
        for key, value in values.items():
            after = Config()
            for k, v in before[section].items():
                setattr(getattr(after, section), k, v)
            set_value(after, f"{section}.{key}", value)
            assert after.to_dict()[section][key] != before[section][key], f"{name}: {section}.{key} is the default"


def test_unknown_preset_is_one_line_error_listing_the_choices():
    with pytest.raises(ConfigError, match="unknown preset 'nope'; choose one of: course, default") as info:
        build_config("nope")
    assert "\n" not in str(info.value)
    assert "_cpu-cnn" not in PRESETS and "_cpu-cnn" not in str(info.value)  # a fragment, not a preset


def test_presets_extend_their_base_key_by_key():
    assert PRESETS["jem"] == PRESETS["jem-cifar10"]
    assert PRESETS["jem-svhn"] == {**PRESETS["jem-cifar10"], "data.dataset": "svhn", "data.augment": "crop"}
    assert build_config("jem-cifar10").model.options["norm"] is None  # "none" in TOML, as on the command line


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ({"a.toml": 'extends = "b"\n', "b.toml": 'extends = "a"\n'}, "in a circle: a -> b -> a"),
        ({"a.toml": 'extends = "zz"\n'}, "preset 'a' extends unknown preset 'zz'"),
        ({"a.toml": "steps = 3\n"}, r"'steps' must be inside a \[section\] table"),
        ({"a.toml": "[sampler\n"}, r"preset 'a' \(a.toml\) is not valid TOML"),
    ],
)
def test_bad_preset_files_are_one_line_errors(tmp_path, files, message):
    for file_name, text in files.items():
        (tmp_path / file_name).write_text(text)
    with pytest.raises(ConfigError, match=message) as info:
        load_presets(tmp_path)
    assert "\n" not in str(info.value)


def test_list_values_take_the_toml_spelling_too():
    for spelling in ("10,20", "[10, 20]", "(10,20)"):
        assert build_config("default", [("optim.milestones", spelling)]).optim.milestones == (10, 20)
    assert build_config("default", [("optim.milestones", "[]")]).optim.milestones == ()
