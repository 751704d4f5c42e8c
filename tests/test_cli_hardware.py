"""`jemlab hardware`: the probe's findings and a preset's choices on this machine, as tables or one JSON object."""

from __future__ import annotations

import json

import pytest

from jemlab.accel import CAPABILITIES, reset_probes
from jemlab.cli import main
from jemlab.cli.hardware import IMAGE_SHAPES
from jemlab.data.registry import available_datasets


def _json(capsys, *flags: str) -> dict:
    assert main(["hardware", "--device", "cpu", "--json", *flags]) == 0
    return json.loads(capsys.readouterr().out)


def test_tables_name_every_capability_and_the_choices(capsys):
    assert main(["hardware", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("hardware: cpu=")  # the run header's first line
    rows = {line.split()[0]: line.split()[1] for line in out.splitlines() if line.split()[:1] != []}
    assert all(rows[name] in ("ok", "no") for name in CAPABILITIES)
    assert "preset default (fashion-mnist, model cnn) on cpu:" in out
    assert {"train.precision", "sampler.precision", "sampler.gradient"} <= set(rows)


def test_json_is_one_object_naming_every_capability(capsys):
    record = _json(capsys)
    assert record["device"] == "cpu" and record["preset"] == "default"
    assert set(record["capabilities"]) == set(CAPABILITIES)
    assert all(set(found) == {"ok", "reason"} for found in record["capabilities"].values())
    assert set(record["choices"]) == {"train.precision", "sampler.precision", "sampler.gradient"}
    assert all(choice["reason"] for choice in record["choices"].values())


def test_an_avx2_machine_gets_fp32_chains(capsys, monkeypatch):
    monkeypatch.setenv("JEMLAB_PROBE", "avx2")
    reset_probes()
    record = _json(capsys)
    assert record["capabilities"]["bf16_native"] == {"ok": False, "reason": "set by JEMLAB_PROBE"}
    assert record["choices"]["sampler.precision"]["value"] == "fp32"
    assert "bf16_native" in record["overridden"]


@pytest.mark.parametrize("preset", ["egc", "egc-control"])
def test_egc_presets_resolve_their_one_precision(preset, capsys):
    assert set(_json(capsys, "--preset", preset)["choices"]) == {"egc.precision"}


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--preset", "nope"], "argument --preset: invalid choice: 'nope'"),
        (["--device", "tpu"], "argument --device: expected auto, cpu, cuda or cuda:N, got 'tpu'"),
    ],
)
def test_bad_flags_are_one_line_errors(flags, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["hardware", *flags])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: jemlab hardware: ") and message in err and err.count("\n") == 1


def test_every_dataset_has_an_image_shape():
    assert set(IMAGE_SHAPES) == set(available_datasets())
