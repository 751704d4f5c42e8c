"""EGC through the shared machinery: config validation, Trainer steps with EMA, exact resume, load_run with EMA
weights, and the CLI round trip train → sample → eval (fast path and the suite)."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from jemlab.cli import main
from jemlab.config import build_config
from jemlab.errors import ConfigError
from jemlab.run import load_run
from jemlab.training.loop import Trainer

# A tiny EGC network (with the preset's classifier head) and a short sampler, so that a run on the fake dataset
# takes seconds.
TINY_NET = {"width": 8, "channel_mult": [1, 2], "num_res_blocks": 1, "patch": 2, "attention": [], "classifier": "head"}
TINY_EGC = [
    ("model.options", TINY_NET),
    ("egc.sample_steps", 3),
    ("egc.ema", 0.9),
]


def tiny_config(tiny_config_overrides):
    return build_config("egc", [*tiny_config_overrides, *TINY_EGC])


def test_egc_config_is_validated():
    config = build_config("egc")
    assert (config.objective.name, config.model.name, config.objective.px) == ("egc", "egc_unet", 0.0)
    paper = build_config("egc-cifar10")
    assert (paper.egc.gamma, paper.egc.label_smoothing, paper.egc.label_dropout, paper.egc.ema) == (
        0.005,
        0.2,
        0.1,
        0.9999,
    )
    assert (paper.optim.grad_clip, paper.egc.sample_steps, paper.egc.timesteps) == (1.0, 100, 1000)
    with pytest.raises(ConfigError, match=re.escape("egc.schedule must be linear or cosine")):
        build_config("egc", [("egc.schedule", "quadratic")])
    with pytest.raises(ConfigError, match=re.escape("needs model.name=egc_unet")):
        build_config("default", [("objective.name", "egc"), ("objective.px", 0)])
    with pytest.raises(ConfigError, match="draws no SGLD negatives"):
        build_config("egc", [("objective.px", 1.0)])
    with pytest.raises(ConfigError, match=re.escape("egc.min_snr must be >= 0")):
        build_config("egc", [("egc.min_snr", -1)])
    with pytest.raises(ConfigError, match=re.escape("egc.sample_steps must be in")):
        build_config("egc", [("egc.sample_steps", 2000)])
    with pytest.raises(ConfigError, match="has no option"):
        build_config("egc", [("model.depth", 3)])


def test_trainer_steps_update_ema_and_resume_exactly(tmp_path, tiny_config_overrides, resume_repeats_steps):
    trainer = Trainer(tiny_config(tiny_config_overrides), tmp_path / "run")
    assert trainer.buffer is None and trainer.egc is not None
    for _ in range(3):
        stats = trainer.train_step(*trainer.batcher.next_batch(), epoch=0)
    assert {"loss", "mse", "ce", "ce_noisy", "train_accuracy", "grad_norm"} <= set(stats)
    assert trainer.egc.ema.updates == 3
    live, ema = trainer.model.state_dict(), trainer.eval_model.state_dict()
    assert any(not torch.equal(live[k], ema[k]) for k in live)  # the EMA lags the live weights
    expected_ema = resume_repeats_steps(trainer, lambda: Trainer(tiny_config(tiny_config_overrides), tmp_path / "run2"))

    # A loaded run evaluates and samples with the EMA weights of the checkpoint.
    trainer.save()
    run = load_run(tmp_path / "run", device="cpu")
    for key, value in run.model.state_dict().items():
        assert torch.equal(value, expected_ema[key]), key


def _train_args(data_dir, run_dir):
    return [
        "train", "--preset", "egc", "--data-dir", str(data_dir), "--run-dir", str(run_dir),
        "--epochs", "1", "--batch-size", "32", "--no-progress",
        "--set", "data.val_size=100", "--set", "data.download=false", "--set", "train.tensorboard=false",
        "--set", "train.log_every=5", "--set", "egc.sample_steps=3", "--set", "egc.ema=0.9",
        "--set", 'model.options={"width": 8, "channel_mult": [1, 2], "num_res_blocks": 1, "patch": 2, '
        '"classifier": "head"}',
    ]  # fmt: skip


def test_cli_train_sample_eval_round_trip(tmp_path, tiny_idx_dir, monkeypatch, capsys):
    run = tmp_path / "run"
    assert main(_train_args(tiny_idx_dir, run)) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert 0 <= summary["test_accuracy"] <= 1
    assert (run / "samples" / "final_per_class.png").exists()
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("mse" in line for line in lines)

    out = tmp_path / "s.npz"
    args = ["sample", "--checkpoint", str(run), "--num", "2", "--per-class", "--out", str(out), "--steps", "4"]
    assert main([*args, "--guidance", "2", "--sampler", "ddpm", "--label-guidance", "3"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["sampler"] == "ddpm" and report["steps"] == 4 and report["guidance"] == 2.0
    assert report["label_guidance"] == 3.0
    assert 0 <= report["self_agreement"] <= 1
    assert main([*args, "--eta", "0.25"]) == 0
    assert json.loads(capsys.readouterr().out)["eta"] == 0.25  # DDIM with the given noise (ddpm is always 1)
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--eta", "1.5"])
    assert exit_info.value.code == 2
    assert "--eta: expected a number in [0, 1], got 1.5" in capsys.readouterr().err
    with np.load(out) as data:
        assert data["images"].shape == (20, 1, 28, 28) and data["images"].min() >= 0 and data["images"].max() <= 1
    gif = tmp_path / "chain.gif"
    animate = ["sample", "--checkpoint", str(run), "--num", "1", "--per-class", "--animate", str(gif), "--steps", "4"]
    assert (
        main(animate)
        == 0
    )
    capsys.readouterr()
    from PIL import Image

    with Image.open(gif) as animation:  # x_T and one frame per DDIM step: 4 × 120 ms, then the last held 1.5 s
        durations = []
        for index in range(animation.n_frames):  # the GIF writer merges identical neighbours, adding their times
            animation.seek(index)
            durations.append(animation.info["duration"])
    assert sum(durations) == 4 * 120 + 1500 and durations[-1] >= 1500
    assert main(["sample", "--checkpoint", str(run), "--num", "4", "--init", "buffer", "--out", str(out)]) == 2
    assert "no replay buffer" in capsys.readouterr().err

    assert main(["eval", "--checkpoint", str(run), "--data-dir", str(tiny_idx_dir)]) == 0
    assert json.loads(capsys.readouterr().out)["test_accuracy"] == summary["test_accuracy"]
    assert main(["eval", "--checkpoint", str(run), "--guidance", "2"]) == 2
    assert "--guidance only applies to the full evaluation" in capsys.readouterr().err

    monkeypatch.setenv("JEMLAB_DATA", str(tmp_path / "cache"))
    report_dir = tmp_path / "report"
    args = ["eval", "--checkpoint", str(run), "--data-dir", str(tiny_idx_dir), "--report", str(report_dir)]
    sizes = ["--n-test", "60", "--n-val", "30", "--n-ood", "20", "--n-samples", "10", "--sample-steps", "2"]
    sizes += ["--pgd-n", "4", "--pgd-steps", "1", "--eps-linf", "0,8/255", "--eps-l2", "0,0.5"]
    parts = ["--parts", "classification,calibration,ood,robustness,samples", "--no-train-feature-net"]
    guidance = ["--guidance", "3", "--label-guidance", "2", "--eta", "0.25"]
    assert main([*args, *parts, *sizes, "--ood-datasets", "none", *guidance]) == 0
    metrics = json.loads((report_dir / "metrics.json").read_text())
    assert metrics["test_accuracy"] == summary["test_accuracy"]
    # EGC runs get smaller attack defaults (EGC_EVAL_DEFAULTS); a flag the user gave still wins
    assert (metrics["setup"]["options"]["pgd_n"], metrics["setup"]["options"]["defence_n"]) == (4, 25)
    protocol = metrics["samples"]["protocol"]
    assert (protocol["sgld_steps"], protocol["chains_from"], protocol["sampler"]) == (2, "noise", "ddim")
    assert (protocol["guidance_conditional"], protocol["label_guidance_conditional"]) == (3.0, 2.0)
    assert protocol["eta"] == 0.25
    assert "energy" in metrics["ood"] and "uniform" in metrics["ood"]["energy"]


def test_egc_sampling_flags_are_refused_for_jem_runs_and_validated_for_egc_runs():
    import argparse

    from jemlab.cli.arguments import apply_egc_flags

    with pytest.raises(ConfigError, match=re.escape("--label-guidance applies to EGC runs only")):
        apply_egc_flags(argparse.Namespace(label_guidance=2.0), build_config("default"))
    config = build_config("egc")
    apply_egc_flags(argparse.Namespace(label_guidance=2.5, guidance=None, sampler=None, eta=None), config)
    assert (config.egc.label_guidance, config.egc.guidance) == (2.5, 6.0)  # the flag, and the preset's guidance
    assert config.egc.eta == 0.5  # the preset's
    apply_egc_flags(argparse.Namespace(eta=0.0), config)
    assert config.egc.eta == 0.0
    with pytest.raises(ConfigError, match=re.escape("--eta applies to EGC runs only")):
        apply_egc_flags(argparse.Namespace(eta=0.5), build_config("default"))
    with pytest.raises(ConfigError, match=re.escape("egc.label_guidance must be >= 0")):
        build_config("egc", [("egc.label_guidance", -1)])
    # a run that could not draw its own sample grids is refused before it trains
    with pytest.raises(ConfigError, match=re.escape("needs a label-conditioned network")):
        build_config("egc", [("model.label_conditioning", False), ("egc.label_guidance", 2)])
    build_config("egc", [("model.label_conditioning", False), ("egc.label_guidance", 1), ("egc.guidance", 4)])
    with pytest.raises(ConfigError, match=re.escape("keep egc.label_guidance=1 and guide with egc.guidance")):
        build_config("egc", [("model.label_conditioning", False)])  # the preset's w = 2 needs the labels
