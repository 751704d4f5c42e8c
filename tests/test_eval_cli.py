"""`jemlab eval --all` and `jemlab fid-ref` end to end on tiny checkpoints, plus the glue's known answers."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from jemlab.cli import main
from jemlab.config import Config
from jemlab.data.testing import write_idx_dataset
from jemlab.evaluation.command import make_defend_fn, partner_ood_sets

# Sizes that make every part run in about a second on the tiny fake dataset.
TINY = [
    "--n-test", "100", "--n-val", "50", "--n-ood", "40", "--batch-size", "50",
    "--pgd-n", "8", "--pgd-steps", "2", "--eps-linf", "0,8/255", "--eps-l2", "0,0.5",
    "--defence-steps", "2", "--defence-n", "4",
    "--n-samples", "20", "--sample-steps", "2", "--kid-subsets", "2", "--kid-subset-size", "10",
    "--feature-net-minutes", "0.05",
]  # fmt: skip


def _train(data_dir, run_dir, preset):
    args = [
        "train", "--preset", preset, "--data-dir", str(data_dir), "--run-dir", str(run_dir),
        "--epochs", "1", "--batch-size", "32", "--no-progress",
        "--set", "data.val_size=100", "--set", "data.download=false", "--set", "train.tensorboard=false",
        "--set", "sampler.steps=3", "--set", "sampler.buffer_size=200", "--set", "train.log_every=5",
        "--set", "quality.every=0",  # sample-quality tracking has its own tests
    ]  # fmt: skip
    assert main(args) == 0


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A fake Fashion-MNIST (with a fake MNIST in data/mnist/ as the OOD partner) and two tiny trained runs."""
    root = tmp_path_factory.mktemp("eval_cli")
    data = root / "data"
    write_idx_dataset(data, n_train=600, n_test=100, seed=0)
    write_idx_dataset(data / "mnist", n_train=20, n_test=60, seed=1)
    _train(data, root / "jem", "default")
    _train(data, root / "course", "course")  # separate energy head, clipped SGLD
    return SimpleNamespace(data=data, jem=root / "jem", course=root / "course")


def test_eval_all_writes_report_json_and_cache(runs, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("JEMLAB_DATA", str(tmp_path / "cache"))
    report, out_json = tmp_path / "report", tmp_path / "all.json"
    args = ["eval", "--checkpoint", str(runs.jem), "--data-dir", str(runs.data), "--all", "--report", str(report)]
    assert main([*args, "--json", str(out_json), "--temperature-scaling", *TINY]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    metrics = json.loads((report / "metrics.json").read_text())
    assert json.loads(out_json.read_text()) == metrics
    assert {"classification", "calibration", "ood", "robustness", "samples", "timing_s"} <= set(metrics)
    html = (report / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 6 and "<img" in html
    markdown = (report / "report.md").read_text()
    assert "![Reliability diagram" in markdown and "## Protocol" in markdown

    # The headline numbers are the fast path's, on the whole test split.
    fast = tmp_path / "fast.json"
    assert main(["eval", "--checkpoint", str(runs.jem), "--data-dir", str(runs.data), "--json", str(fast)]) == 0
    fast_metrics = json.loads(fast.read_text())
    assert metrics["test_accuracy"] == fast_metrics["test_accuracy"] == summary["test_accuracy"]
    assert metrics["test_nll"] == pytest.approx(fast_metrics["test_nll"])
    assert metrics["classification"]["accuracy"] == pytest.approx(metrics["test_accuracy"])  # n_test covers it

    assert metrics["calibration"]["temperature"] > 0 and "temperature_scaled" in metrics["calibration"]
    # OOD: the fake MNIST from data/mnist/ plus the synthetic sets, four scores each.
    ood = metrics["ood"]
    assert ood["protocol"]["dataset_sets"] == ["mnist"]
    assert set(ood["log_px"]) >= {"mnist", "uniform", "gaussian", "interp", "vflip", "hflip", "invert"}
    assert all(0 <= ood[s]["mnist"]["auroc"] <= 1 for s in ("log_px", "max_softmax", "energy", "grad_norm"))
    assert ood["energy_equals_log_px"] is True  # LogSumExp energy: the two scores are one function
    # Robustness: plain and defended curves, the defence attacked through its refinement.
    rob = metrics["robustness"]
    assert set(rob["linf"]) == {"undefended", "undefended, same 4 images", "SGLD defence K=2"}
    assert rob["linf"]["undefended"]["eps"][1] == 8 / 255
    assert "EOT" in rob["protocol"]["defence"]["attack"] and rob["protocol"]["defence"]["step_size"] == 1.0
    # Samples: protocol next to the numbers; FD/KID in the feature space of a feature net trained now and cached.
    samples = metrics["samples"]
    assert samples["protocol"]["chains_from"] == "buffer" and samples["protocol"]["sgld_steps"] == 2
    assert samples["protocol"]["n_unconditional"] == 20 and samples["n"] == 20
    assert math.isfinite(samples["feature_space"]["frechet_unconditional"])
    assert samples["feature_space"]["frechet_unconditional"] >= 0
    assert 0 <= samples["conditional"]["feature_net_accuracy"]["accuracy"] <= 1
    conditional = samples["conditional"]
    assert 0 <= conditional["near_copies"] <= 20
    assert conditional["near_copy_fraction"] == conditional["near_copies"] / 20
    assert conditional["nearest_in_class_rms"] > 0
    assert samples["feature_net_cache"]["trained_now"] is True
    assert Path(samples["feature_net_cache"]["path"]).is_file()
    assert Path(samples["feature_net_cache"]["path"]).is_relative_to(tmp_path / "cache" / "feature_nets")


def test_pgd_loss_flag_reaches_the_attack_and_the_protocol(runs, tmp_path, capsys):
    report = tmp_path / "margin"
    args = ["eval", "--checkpoint", str(runs.jem), "--data-dir", str(runs.data), "--parts", "robustness"]
    assert main([*args, "--report", str(report), *TINY, "--defence-steps", "0", "--pgd-loss", "margin"]) == 0
    metrics = json.loads((report / "metrics.json").read_text())
    protocol = metrics["robustness"]["protocol"]
    assert protocol["loss"] == "margin" and "logit margin" in protocol["attack"]
    assert "PGD on the logit margin" in (report / "report.md").read_text()
    assert 0 <= metrics["robustness"]["linf"]["undefended"]["robust_accuracy"][1] <= 1


def test_fid_ref_trains_once_then_reuses(runs, tmp_path, capsys):
    cache = tmp_path / "cache"
    args = ["fid-ref", "--dataset", "fashion-mnist", "--data-dir", str(runs.data), "--cache-dir", str(cache)]
    assert main([*args, "--epochs", "1"]) == 0
    first = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert first["cached"] is False and first["trained_now"] is True and 0 <= first["accuracy"] <= 1
    weights = Path(first["path"])
    assert weights.is_file() and weights.is_relative_to(cache / "feature_nets" / "fashion-mnist")
    stamp = weights.stat().st_mtime_ns
    assert main([*args, "--epochs", "1"]) == 0
    second = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert second["cached"] is True and second["trained_now"] is False and weights.stat().st_mtime_ns == stamp

    # eval uses the cached net without retraining it.
    report = tmp_path / "r"
    eval_args = ["eval", "--checkpoint", str(runs.jem), "--data-dir", str(runs.data), "--parts", "samples"]
    assert main([*eval_args, "--report", str(report), "--cache-dir", str(cache), "--no-train-feature-net", *TINY]) == 0
    samples = json.loads((report / "metrics.json").read_text())["samples"]
    assert samples["feature_net_cache"]["trained_now"] is False and "feature_space" in samples
    assert weights.stat().st_mtime_ns == stamp

    # With an empty cache and --no-train-feature-net, FD/KID are skipped with a note and the rest still runs.
    report2 = tmp_path / "r2"
    empty = ["--cache-dir", str(tmp_path / "empty"), "--no-train-feature-net"]
    assert main([*eval_args, "--report", str(report2), *empty, *TINY]) == 0
    metrics = json.loads((report2 / "metrics.json").read_text())
    assert "feature_space" not in metrics["samples"] and set(metrics) >= {"samples", "test_accuracy"}
    assert "fid-ref --dataset fashion-mnist" in (report2 / "report.md").read_text()
    assert not (tmp_path / "empty").exists()


def test_separate_energy_head_scores_differ_and_defence_runs(runs, tmp_path, capsys):
    report = tmp_path / "course"
    args = [
        "eval",
        "--checkpoint",
        str(runs.course),
        "--data-dir",
        str(runs.data),
        "--parts",
        "calibration,ood,robustness",
    ]
    assert main([*args, "--report", str(report), "--ood-datasets", "none", "--pgd-norms", "linf", *TINY]) == 0
    metrics = json.loads((report / "metrics.json").read_text())
    assert metrics["ood"]["energy_equals_log_px"] is False  # the scalar head is not logsumexp of the logits
    assert metrics["ood"]["protocol"]["dataset_sets"] == [] and "mnist" not in metrics["ood"]["log_px"]
    defence = metrics["robustness"]["protocol"]["defence"]
    assert defence["grad_clamp"] == 0.03 and defence["step_size"] == 10.0  # the run's own sampler settings
    assert set(metrics["robustness"]) == {"linf", "protocol"}
    assert "temperature_scaled" not in metrics["calibration"] and 0 <= metrics["calibration"]["raw"]["ece"] <= 1
    assert "classification" not in metrics and "samples" not in metrics


def test_defence_is_the_runs_clipped_sgld_and_differentiable():
    # E(x) = 2·||x||², ∇E = 4x; one step with α = 0.1 and the gradient clipped to ±0.3, no noise.
    config = Config()
    config.sampler.step_size, config.sampler.noise, config.sampler.grad_clamp = 0.1, 0.0, 0.3
    run = SimpleNamespace(config=config, model=SimpleNamespace(energy=lambda x: 2 * x.pow(2).flatten(1).sum(1)))
    defend = make_defend_fn(run, steps=1, init_noise=0.0)
    x = torch.tensor([[0.05, -0.05, 0.5, -0.5]], requires_grad=True)
    refined = defend(x)
    expected = torch.tensor([[0.05 - 0.02, -0.05 + 0.02, 0.5 - 0.03, -0.5 + 0.03]])
    assert torch.allclose(refined, expected, atol=1e-6)
    (grad,) = torch.autograd.grad(refined.sum(), [x])  # d/dx (x − 0.4x) = 0.6 unclipped, 1 where clipped
    assert torch.allclose(grad, torch.tensor([[0.6, 0.6, 1.0, 1.0]]), atol=1e-6)


def test_partner_ood_sets_match_shapes_or_skip_with_a_note(runs):
    sets, notes = partner_ood_sets("fashion-mnist", (3, 28, 28), 10, data_dir=runs.data)
    assert sets["mnist"].shape == (10, 3, 28, 28) and "converted from 1 to 3 channels" in notes[0]
    assert torch.equal(sets["mnist"][:, 0], sets["mnist"][:, 2])
    sets, notes = partner_ood_sets("fashion-mnist", (1, 32, 32), 10, names=["mnist"], data_dir=runs.data)
    assert sets == {} and "28x28" in notes[0] and "32x32" in notes[0]
    sets, notes = partner_ood_sets("fashion-mnist", (1, 28, 28), 10, names=[], data_dir=runs.data)
    assert sets == {} and "only synthetic" in notes[0]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--all", "--pgd-n", "-1"], "--pgd-n"),
        (["--parts", "ood,bogus"], "unknown part(s) bogus"),
        (["--all", "--eps-linf", "0,2"], "[0, 1] pixel units"),
        (["--all", "--ood-datasets", "imagenet"], "unknown dataset(s) imagenet"),
        (["--all", "--parts", "ood"], "not allowed with argument"),
        (["--all", "--pgd-loss", "hinge"], "invalid choice: 'hinge'"),
    ],
)
def test_bad_flags_are_one_line_usage_errors(tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "--checkpoint", str(tmp_path / "nope"), *extra])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err and message in err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--all"], "--all/--parts write a report: pass --report DIR"),
        (["--pgd-n", "5"], "--pgd-n only applies to the full evaluation"),
        (["--all", "--report", "r", "--split", "val"], "--split applies to the fast path only"),
    ],
)
def test_inconsistent_flags_are_one_line_errors(tmp_path, capsys, extra, message):
    assert main(["eval", "--checkpoint", str(tmp_path / "nope"), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and message in err


def test_eval_draws_all_samples_in_one_sampler_call():
    """JEM starts are distinct within one `generate` call only; chunked calls re-drew buffer images (near-copies)."""
    from jemlab.cli import build_parser
    from jemlab.cli.eval import _suite_options

    args = build_parser().parse_args(["eval", "--checkpoint", "x", "--parts", "samples", "--n-samples", "1000"])
    trained = SimpleNamespace(config=Config())
    options = _suite_options(args, trained, seed=0)
    assert options.n_samples == 1000 and options.sample_batch == 1000
