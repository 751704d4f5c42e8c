"""Config: presets, overrides with types and ranges, unknown keys, JSON round trip."""

from __future__ import annotations

import json

import pytest

from jemlab.config import PRESETS, build_config, config_from_dict, load_config_file, parse_overrides
from jemlab.errors import ConfigError


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
