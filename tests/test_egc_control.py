"""The control of the EGC comparison (egc.parameterisation=epsilon, --preset egc-control): the same UNet as a plain
ε-prediction diffusion model. Its head and missing classifier, the config checks, the default (energy) path left as
it was, training, exact resume, sampling through the shared DDIM/DDPM loop, and `jemlab eval --parts samples`."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch

from jemlab.cli import main
from jemlab.config import PRESETS, build_config, config_from_dict
from jemlab.errors import ConfigError, JemlabError
from jemlab.generate import generate
from jemlab.models import build_model
from jemlab.models.egc_unet import NoClassifierError
from jemlab.objectives import egc_loss, epsilon_loss
from jemlab.run import load_run
from jemlab.training.egc import EGCTraining
from jemlab.training.loop import Trainer

TINY_NET = {"width": 8, "channel_mult": [1, 2], "num_res_blocks": 1, "patch": 2, "attention": []}
TINY = [("egc.sample_steps", 3), ("egc.ema", 0.9)]


def control_config(overrides):
    return build_config("egc-control", [*overrides, ("model.options", {**TINY_NET, "output": "epsilon"}), *TINY])


# --- config ------------------------------------------------------------------------------------------------------


def test_control_preset_is_egc_with_the_epsilon_head_and_no_classifier_terms():
    egc, control = PRESETS["egc"], PRESETS["egc-control"]
    assert control["model.options"] == {**egc["model.options"], "output": "epsilon"}
    changed = {key for key in control if control[key] != egc.get(key)}
    assert changed == {"model.options", "egc.parameterisation", "egc.gamma", "egc.gamma_clean", "egc.guidance"}
    assert build_config("egc").egc.parameterisation == "energy"  # the default: EGC itself
    c = build_config("egc-control")
    assert (c.egc.parameterisation, c.model.options["output"], c.egc.guidance) == ("epsilon", "epsilon", 0.0)


@pytest.mark.parametrize(
    "preset, overrides, message",
    [
        ("egc", [("egc.parameterisation", "x0")], "egc.parameterisation must be energy or epsilon, got 'x0'"),
        ("egc", [("egc.parameterisation", "epsilon")], "set model.output=epsilon (got 'logits')"),
        ("egc", [("model.output", "epsilon")], "model.output=epsilon gives the UNet no energy"),
        ("egc", [("model.output", "eps")], "model.output must be logits or epsilon"),
        ("egc", [("model.energy_scale", "noise")], "model.energy_scale must be none or sigma"),
        ("egc", [("model.energy_base", "normal")], "model.energy_base must be none or gaussian"),
        ("egc", [("model.pool", "max")], "model.pool must be mean, attention or mean_log_softmax"),
        ("egc-control", [("egc.guidance", "2")], "classifier guidance (egc.guidance=2) needs a classifier"),
        ("egc-control", [("model.label_conditioning", "false")], "keep model.label_conditioning=true"),
    ],
)
def test_parameterisation_mismatches_are_one_line_errors(preset, overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)) as info:
        build_config(preset, overrides)
    assert "\n" not in str(info.value)


# --- the network -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape, patch", [((1, 28, 28), 2), ((3, 32, 32), 1)])
def test_epsilon_head_emits_an_image_shaped_noise_estimate_and_has_no_classifier(shape, patch):
    options = {**TINY_NET, "patch": patch, "pool": "attention"}
    torch.manual_seed(0)
    energy_net = build_model("egc_unet", shape, 10, options=options)
    control = build_model("egc_unet", shape, 10, options={**options, "output": "epsilon"})
    for p in control.parameters():  # the output convolution starts at zero: give it something to emit
        torch.nn.init.normal_(p, std=0.05)
    x, t, y = torch.randn(3, *shape), torch.tensor([0, 500, 999]), torch.tensor([1, 2, 10])
    eps = control.predict_eps(x, t, y)
    assert eps.shape == x.shape and eps.abs().sum() > 0
    sigma = torch.rand(3, 1, 1, 1)  # not used: ε̂ is read off the head
    assert torch.equal(control.eps(x, t, sigma, y), eps) and not control.eps(x, t, sigma, y).requires_grad
    assert control.eps(x, t, sigma, y, create_graph=True).requires_grad
    # The same trunk; only the last convolution differs (image channels instead of class logits), and no pooling.
    trunk = {k: v.shape for k, v in energy_net.state_dict().items() if not k.startswith(("out.2.", "pool."))}
    assert {k: v.shape for k, v in control.state_dict().items() if not k.startswith("out.2.")} == trunk
    assert control.state_dict()["out.2.weight"].shape[0] == shape[0] * patch * patch
    assert energy_net.has_classifier and not control.has_classifier
    for read in (control.logits, control.energy, lambda v: control.logits_and_energy(v)):
        with pytest.raises(NoClassifierError, match="no energy or classifier"):
            read(x)
    with pytest.raises(ConfigError, match="predict_eps reads the ε head"):
        energy_net.predict_eps(x, t)


# --- the default (energy) path is what it was ----------------------------------------------------------------------


def test_energy_parameterisation_absent_or_explicit_trains_the_same_loss():
    base = build_config("egc", [("model.options", TINY_NET), *TINY])
    data = json.loads(base.to_json())
    del data["egc"]["parameterisation"]  # a config written before the option existed
    old = config_from_dict(data)
    explicit = build_config("egc", [("model.options", TINY_NET), *TINY, ("egc.parameterisation", "energy")])
    assert old == base == explicit
    torch.manual_seed(0)
    model = build_model("egc_unet", (1, 28, 28), 10, options=TINY_NET)
    x0, y = torch.rand(8, 1, 28, 28) * 2 - 1, torch.arange(8)
    losses = []
    for config in (old, explicit, None):
        training = EGCTraining(config or base, model)
        fn = egc_loss if config is None else training.loss_fn
        assert fn is egc_loss
        loss, stats = fn(model, training.schedule, x0, y, training.weights, torch.Generator().manual_seed(1))
        losses.append((loss.item(), stats["ce"].item(), stats["mse"].item()))
    assert losses[0] == losses[1] == losses[2]


# --- training -----------------------------------------------------------------------------------------------------


def test_control_loss_is_the_denoising_mse_and_decreases_on_a_fixed_batch():
    torch.manual_seed(0)
    model = build_model("egc_unet", (1, 28, 28), 10, options={**TINY_NET, "output": "epsilon"})
    training = EGCTraining(control_config([]), model)
    assert training.loss_fn is epsilon_loss
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    x0, y = torch.rand(16, 1, 28, 28) * 2 - 1, torch.arange(16) % 10
    losses = []
    for _ in range(15):
        loss, stats = epsilon_loss(model, training.schedule, x0, y, training.weights, torch.Generator().manual_seed(0))
        assert set(stats) == {"loss", "mse"} and stats["mse"].item() == loss.item()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert abs(losses[0] - 1.0) < 0.1  # ε̂ = 0 at initialisation (zero output layer): the MSE of ε alone
    assert losses[-1] < 0.9 * losses[0]


def test_control_trainer_steps_resume_exactly_and_load_without_a_classifier(
    tmp_path, tiny_config_overrides, resume_repeats_steps
):
    trainer = Trainer(control_config(tiny_config_overrides), tmp_path / "run")
    for _ in range(3):
        stats = trainer.train_step(*trainer.batcher.next_batch(), epoch=0)
    assert set(stats) == {"lr", "loss", "mse", "grad_norm", "train_accuracy"}
    assert math.isfinite(stats["loss"]) and math.isnan(stats["train_accuracy"])  # no classifier: nan
    assert trainer.evaluate("val") == {}
    expected_ema = resume_repeats_steps(
        trainer, lambda: Trainer(control_config(tiny_config_overrides), tmp_path / "run2")
    )

    trainer.save()
    run = load_run(tmp_path / "run", device="cpu")
    assert run.config.egc.parameterisation == "epsilon" and not run.model.has_classifier
    for key, value in run.model.state_dict().items():
        assert torch.equal(value, expected_ema[key]), key


# --- sampling -------------------------------------------------------------------------------------------------------


def test_control_samples_through_the_shared_loop_and_refuses_classifier_guidance(tmp_path, tiny_config_overrides):
    trainer = Trainer(control_config(tiny_config_overrides), None)
    for _ in range(2):
        trainer.train_step(*trainer.batcher.next_batch(), epoch=0)
    x, protocol = generate(trainer, 5, generator=torch.Generator().manual_seed(0))
    again, _ = generate(trainer, 5, generator=torch.Generator().manual_seed(0), batch_size=2)
    assert x.shape == (5, 1, 28, 28) and x.min() >= -1 and x.max() <= 1
    assert torch.allclose(x, again, rtol=0, atol=1e-5)  # up to the rounding of other batch sizes
    assert (protocol["parameterisation"], protocol["sampler"], protocol["steps"]) == ("epsilon", "ddim", 3)
    trainer.config.egc.sampler = "ddpm"
    labels = torch.tensor([0, 3, 9])
    x, protocol = generate(trainer, 3, labels=labels, generator=torch.Generator().manual_seed(0))
    assert x.shape == (3, 1, 28, 28) and protocol["conditional"] and protocol["guidance"] == 0.0
    trainer.config.egc.guidance = 2.0  # as if asked for: an error, not a silent unguided sample
    with pytest.raises(JemlabError, match=re.escape("classifier guidance (scale 2) needs the model's own")):
        generate(trainer, 3, labels=labels, generator=torch.Generator().manual_seed(0))
    generate(trainer, 2, generator=torch.Generator().manual_seed(0))  # unconditional samples take no guidance


# --- the command line: train, sample, eval -------------------------------------------------------------------------


def _train_args(data_dir, run_dir):
    return [
        "train", "--preset", "egc-control", "--data-dir", str(data_dir), "--run-dir", str(run_dir),
        "--epochs", "1", "--batch-size", "32", "--no-progress",
        "--set", "data.val_size=100", "--set", "data.download=false", "--set", "train.tensorboard=false",
        "--set", "train.log_every=5", "--set", "egc.sample_steps=3", "--set", "egc.ema=0.9",
        "--set", 'model.options={"width": 8, "channel_mult": [1, 2], "num_res_blocks": 1, "patch": 2, '
        '"output": "epsilon"}',
    ]  # fmt: skip


def _one_line_error(capsys, *fragments):
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err
    for fragment in fragments:
        assert fragment in err, err


def test_cli_control_train_sample_and_eval_samples_only(tmp_path, tiny_idx_dir, monkeypatch, capsys):
    run = tmp_path / "run"
    assert main(_train_args(tiny_idx_dir, run)) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert "test_accuracy" not in summary and summary["step"] > 0
    assert (run / "samples" / "final_per_class.png").exists()
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("mse" in line and "ce" not in line for line in lines)
    log = (run / "train.log").read_text()
    assert "epoch 1: done (no classifier to validate)" in log and "min: no classifier" in log

    out = tmp_path / "s.npz"
    assert main(["sample", "--checkpoint", str(run), "--num", "2", "--per-class", "--out", str(out)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["parameterisation"] == "epsilon" and report["self_agreement"] is None
    with np.load(out) as data:
        assert data["images"].shape == (20, 1, 28, 28) and list(data["labels"][:3]) == [0, 0, 1]
    guided = ["sample", "--checkpoint", str(run), "--num", "2", "--per-class", "--guidance", "2", "--out", str(out)]
    assert main(guided) == 2
    _one_line_error(capsys, "classifier guidance", "use --guidance 0")

    assert main(["eval", "--checkpoint", str(run), "--data-dir", str(tiny_idx_dir)]) == 2
    _one_line_error(capsys, "has no classifier", "--parts samples --report DIR")
    report_dir = tmp_path / "report"
    args = ["eval", "--checkpoint", str(run), "--data-dir", str(tiny_idx_dir), "--report", str(report_dir)]
    assert main([*args, "--parts", "classification,samples"]) == 2
    _one_line_error(capsys, "--parts classification:", "evaluate its samples with --parts samples")

    monkeypatch.setenv("JEMLAB_DATA", str(tmp_path / "cache"))
    sizes = ["--n-test", "60", "--n-val", "30", "--n-samples", "10", "--sample-steps", "2", "--seed", "1"]
    sizes += ["--kid-subsets", "2", "--kid-subset-size", "10", "--feature-net-minutes", "0.05"]
    assert main([*args, "--parts", "samples", *sizes]) == 0
    metrics = json.loads((report_dir / "metrics.json").read_text())
    samples = metrics["samples"]
    assert math.isfinite(samples["feature_space"]["frechet_unconditional"])
    assert "kid_unconditional" in samples["feature_space"] and "unconditional" not in samples
    assert samples["protocol"]["parameterisation"] == "epsilon" and "test_accuracy" not in metrics
    assert "no classifier" in (report_dir / "report.md").read_text()

    capsys.readouterr()
    assert main([*args, "--all", *sizes, "--no-train-feature-net"]) == 0
    assert "only the samples part runs" in capsys.readouterr().err
    metrics = json.loads((report_dir / "metrics.json").read_text())
    assert {"classification", "calibration", "ood", "robustness"}.isdisjoint(metrics) and "samples" in metrics
    assert "Robustness skipped: the model has no classifier" in (report_dir / "report.md").read_text()
