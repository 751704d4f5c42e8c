"""The hardware probe, the choices made from it, the run-time fallback, and where private operators may live.

`JEMLAB_PROBE` makes another machine's findings reproducible here: ``avx2`` answers as a CPU without AVX-512 (no
native bf16, no bf16 weight packing), so the paths such a CPU takes run on any host.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest
import torch

from jemlab.accel import CAPABILITIES, choose_gradient, choose_precision, fallbacks, private_ops, probe, reset_probes
from jemlab.accel import explicit as explicit_module
from jemlab.accel.probe import parse_overrides
from jemlab.config import build_config
from jemlab.errors import ConfigError
from jemlab.models import build_model
from jemlab.sampling import run_chains

SRC = Path(__file__).resolve().parents[1] / "src" / "jemlab"


def use_probe(monkeypatch, text: str) -> None:
    monkeypatch.setenv("JEMLAB_PROBE", text)
    reset_probes()


class Records(logging.Handler):
    """Collects jemlab's log records (the run logger stops propagation to the root, so caplog may not see them)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture()
def jemlab_warnings():
    handler = Records()
    logger = logging.getLogger("jemlab")
    logger.addHandler(handler)
    yield handler.messages
    logger.removeHandler(handler)


def course_model():
    torch.manual_seed(0)
    model = build_model("course_cnn", (1, 28, 28), 10, "separate", {}).eval()
    return model


# --- the probe -----------------------------------------------------------------------------------------------------


def test_every_capability_is_found_with_a_reason_on_this_machine(monkeypatch):
    use_probe(monkeypatch, "")  # this machine's own findings, whatever JEMLAB_PROBE the suite runs under
    found = probe("cpu")
    for name in CAPABILITIES:
        assert isinstance(found[name].ok, bool)
        assert found[name].reason
    summary = found.summary()
    assert summary["device"] == "cpu" and summary["name"]
    assert set(summary["capabilities"]) == set(CAPABILITIES)
    # every machine torch 2.13 runs on can do fp32 convolutions and the fp32 oneDNN path it ships with
    assert found.ok("packed_conv_fp32") == torch.backends.mkldnn.is_available()
    assert found.ok("version_counter")


def test_native_bf16_agrees_with_what_torch_reports_about_this_cpu(monkeypatch):
    use_probe(monkeypatch, "")
    isa = private_ops.torch_cpu_isa()
    native = probe("cpu")["bf16_native"]
    expected = isa["avx512_bf16"] or isa["amx_tile"] or "avx_ne_convert" in private_ops.os_cpu_flags()
    assert native.ok == expected, native.reason


def test_the_override_answers_as_an_avx2_cpu(monkeypatch):
    use_probe(monkeypatch, "avx2")
    found = probe("cpu")
    assert not found.ok("bf16_native") and not found.ok("packed_conv_bf16")
    assert found["bf16_native"].reason == "set by JEMLAB_PROBE"
    assert found.summary()["overridden"] == ["bf16_native", "fp16_native", "packed_conv_bf16"]
    use_probe(monkeypatch, "bf16_native=1,compile=0")
    assert probe("cpu").ok("bf16_native") and not probe("cpu").ok("compile")


@pytest.mark.parametrize("text", ["avx3", "bf16_native=yes", "nonsense=1", "bf16_native"])
def test_a_bad_override_is_a_one_line_error(text):
    with pytest.raises(ConfigError, match="JEMLAB_PROBE") as info:
        parse_overrides(text)
    assert "\n" not in str(info.value) and "bf16_native" in str(info.value)


def test_a_failing_operator_is_reported_as_missing(monkeypatch):
    """'Does it work' is decided by trying: an operator that raises (as oneDNN's bf16 reorder does on AVX2) is no."""
    use_probe(monkeypatch, "")

    def raising(*args, **kwargs):
        raise RuntimeError("mkldnn_reorder_conv2d_weight: bf16 path needs the cpu support avx_ne_convert or avx512bw")

    monkeypatch.setattr(private_ops, "pack_conv_weight", raising)
    found = probe("cpu")
    if not torch.backends.mkldnn.is_available():
        pytest.skip("no oneDNN in this torch build")
    assert not found.ok("packed_conv_bf16")
    assert "avx_ne_convert" in found["packed_conv_bf16"].reason


def test_a_wrong_answer_is_reported_as_missing(monkeypatch):
    monkeypatch.setitem(
        private_ops.ACTIVATION_BACKWARD,
        "silu",
        (lambda g, pre, slope, out: out.copy_(g), private_ops.ACTIVATION_BACKWARD["silu"][1]),
    )
    found = probe("cpu")
    assert not found.ok("activation_backward")
    assert found["activation_backward"].reason.startswith("silu: wrong answer")


# --- choices -------------------------------------------------------------------------------------------------------


def test_auto_precision_is_bf16_only_where_native(monkeypatch):
    use_probe(monkeypatch, "avx2")
    choice = choose_precision("auto", "cpu", "sampler.precision")
    assert choice.value == "fp32" and choice.reason.startswith("auto:")
    use_probe(monkeypatch, "bf16_native=1")
    assert choose_precision("auto", "cpu", "sampler.precision").value == "bf16"
    # the JEM training step stays fp32 on a CPU either way; the EGC step takes bf16 where it is native
    assert choose_precision("auto", "cpu", "train.precision").value == "fp32"
    assert choose_precision("auto", "cpu", "egc.precision").value == "bf16"
    assert choose_precision("fp32", "cpu", "sampler.precision").value == "fp32"
    use_probe(monkeypatch, "avx2")
    assert choose_precision("auto", "cpu", "egc.precision").value == "fp32"


def test_forced_bf16_where_emulated_runs_with_one_warning(monkeypatch, jemlab_warnings):
    use_probe(monkeypatch, "avx2")
    first = choose_precision("bf16", "cpu", "sampler.precision")
    choose_precision("bf16", "cpu", "sampler.precision")
    assert first.value == "bf16" and "emulated" in first.reason
    warnings = [m for m in jemlab_warnings if "sampler.precision=bf16" in m]
    assert len(warnings) == 1 and "auto" in warnings[0]


def test_a_precision_the_device_cannot_run_is_a_one_line_error(monkeypatch):
    use_probe(monkeypatch, "bf16_works=0,bf16_native=0")
    with pytest.raises(ConfigError, match=r"sampler\.precision=bf16 does not run .*use sampler\.precision=auto"):
        choose_precision("bf16", "cpu", "sampler.precision")
    with pytest.raises(ConfigError, match=r"train\.precision=fp16 needs a CUDA GPU"):
        choose_precision("fp16", "cpu", "train.precision")


def test_gradient_choice_names_its_reason(monkeypatch):
    model = course_model()
    choice = choose_gradient("auto", model, "cpu", torch.float32)
    assert choice.value == "explicit"
    assert choose_gradient("auto", model, "cpu", torch.float32, traced=True).value == "autograd"
    use_probe(monkeypatch, "avx2")
    bf16 = choose_gradient("auto", model, "cpu", torch.bfloat16)
    assert bf16.value == "explicit" and "plain conv2d" in bf16.reason
    wrn = build_model("wide_resnet", (3, 8, 8), 10, "logsumexp", {"depth": 10, "widen": 1})
    assert choose_gradient("auto", wrn, "cpu", None).value == "autograd"


# --- the run-time fallback -----------------------------------------------------------------------------------------


def sampler_config(gradient: str = "auto"):
    cfg = build_config("course").sampler
    cfg.steps, cfg.precision, cfg.chain_groups, cfg.gradient = 4, "fp32", 1, gradient
    return cfg


def test_an_explicit_gradient_that_fails_at_run_time_falls_back_once_and_the_chain_goes_on(
    monkeypatch, jemlab_warnings
):
    model = course_model()
    x0 = torch.rand(8, 1, 28, 28, generator=torch.Generator().manual_seed(1)) * 2 - 1
    expected, _ = run_chains(model, x0, sampler_config("autograd"), generator=torch.Generator().manual_seed(2))
    calls = []

    def broken(self, x, labels=None):
        calls.append(1)
        raise RuntimeError("could not create a primitive")

    monkeypatch.setattr(explicit_module.ExplicitGradient, "__call__", broken)
    got, _ = run_chains(model, x0, sampler_config(), generator=torch.Generator().manual_seed(2))
    again, _ = run_chains(model, x0, sampler_config(), generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(again, expected, rtol=1e-4, atol=1e-5)
    assert len(calls) == 1  # tried once; later steps and chains go straight to autograd
    assert "could not create a primitive" in fallbacks()["the explicit input gradient"]
    logged = [m for m in jemlab_warnings if "failed at run time" in m]
    assert len(logged) == 1
    assert choose_gradient("auto", model, "cpu", None).value == "autograd"


def test_a_plan_that_cannot_be_built_falls_back_and_insisting_is_a_one_line_error(monkeypatch):
    model = course_model()
    x0 = torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(1)) * 2 - 1

    def broken(*args, **kwargs):
        raise RuntimeError("reorder failed")

    monkeypatch.setattr(explicit_module, "ExplicitGradient", broken)
    with pytest.raises(ConfigError, match=r"sampler\.gradient=explicit failed .*reorder failed.*gradient=auto"):
        run_chains(model, x0, sampler_config("explicit"), generator=torch.Generator().manual_seed(2))
    run_chains(model, x0, sampler_config("auto"), generator=torch.Generator().manual_seed(2))
    assert "reorder failed" in fallbacks()["the explicit input gradient"]


# --- the run reports what it chose ---------------------------------------------------------------------------------


def test_the_run_header_log_and_metrics_name_the_hardware_and_the_choices(monkeypatch, tmp_path, tiny_config_overrides):
    from jemlab.training.loop import Trainer

    use_probe(monkeypatch, "avx2")
    config = build_config("default", [*tiny_config_overrides, ("train.epochs", "1")])
    run_dir = tmp_path / "run"
    Trainer(config, run_dir).fit()
    log_text = (run_dir / "train.log").read_text()
    assert re.search(r"hardware: cpu=.* bf16=not native \(set by JEMLAB_PROBE\)", log_text)
    assert "sampler.precision=fp32 (auto: set by JEMLAB_PROBE)" in log_text
    assert "sampler.gradient=explicit (auto: a plain layer sequence on a CPU; oneDNN packed weights)" in log_text
    assert "train.precision=fp32 (auto: the training step stays fp32 on a CPU)" in log_text
    hardware = json.loads((run_dir / "metrics.json").read_text())["hardware"]
    assert hardware["choices"]["sampler.precision"]["value"] == "fp32"
    assert hardware["capabilities"]["bf16_native"] == {"ok": False, "reason": "set by JEMLAB_PROBE"}
    assert hardware["fallbacks"] == {}


# --- private operators live in one place ---------------------------------------------------------------------------

PRIVATE = re.compile(r"torch\.ops\.|\._version\b|torch\._(?!_)|torch\.cpu\._|_backward\.grad_input")


def test_private_torch_operators_appear_only_in_accel_private_ops():
    holders = {
        str(path.relative_to(SRC))
        for path in SRC.rglob("*.py")
        for line in path.read_text().splitlines()
        if PRIVATE.search(line.split("#", 1)[0])
    }
    assert holders == {"accel/private_ops.py"}  # and it does hold them: the pattern is not vacuous
