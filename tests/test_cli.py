"""End-to-end CLI: train → sample → eval on a tiny dataset, and the errors a user sees."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from jemlab.cli import main


def _train_args(tiny_idx_dir, run_dir, preset="default", extra=()):
    return [
        "train", "--preset", preset, "--data-dir", str(tiny_idx_dir), "--run-dir", str(run_dir),
        "--epochs", "2", "--batch-size", "32", "--no-progress",
        "--set", "data.val_size=100", "--set", "data.download=false", "--set", "train.tensorboard=false",
        "--set", "sampler.steps=3", "--set", "sampler.buffer_size=200", "--set", "train.log_every=5",
        "--set", "quality.every=0",  # sample-quality tracking has its own tests
        *extra,
    ]  # fmt: skip


def test_train_sample_eval_round_trip(tmp_path, tiny_idx_dir, capsys):
    run = tmp_path / "run"
    assert main(_train_args(tiny_idx_dir, run)) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert 0.0 <= summary["test_accuracy"] <= 1.0

    # The run directory holds what the contract says.
    config = json.loads((run / "config.json").read_text())
    assert config["preset"] == "default"
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all({"step", "epoch", "elapsed_s"} <= set(line) for line in lines)
    assert any("loss" in line for line in lines) and any("val_accuracy" in line for line in lines)
    assert (run / "train.log").exists() and (run / "checkpoints" / "latest").exists()
    grid = Image.open(run / "samples" / "final_per_class.png")
    assert grid.size[0] > 100
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["test_accuracy"] == summary["test_accuracy"]

    # sample → npz in the SPEC exchange format.
    out = tmp_path / "s.npz"
    assert main(["sample", "--checkpoint", str(run), "--num", "3", "--per-class", "--out", str(out)]) == 0
    report = json.loads(capsys.readouterr().out)
    with np.load(out) as data:
        assert data["images"].dtype == np.float32 and data["images"].shape == (30, 1, 28, 28)
        assert data["images"].min() >= 0 and data["images"].max() <= 1
        assert data["labels"].dtype == np.int64 and list(data["labels"][:4]) == [0, 0, 0, 1]
    assert 0 <= report["self_agreement"] <= 1
    assert main(["sample", "--checkpoint", str(run), "--num", "16", "--out", str(tmp_path / "g.png")]) == 0
    assert Image.open(tmp_path / "g.png").mode == "L"

    # eval → JSON with a fraction and an NLL.
    out_json = tmp_path / "eval.json"
    assert main(["eval", "--checkpoint", str(run), "--data-dir", str(tiny_idx_dir), "--json", str(out_json)]) == 0
    result = json.loads(out_json.read_text())
    assert result["test_accuracy"] == metrics["test_accuracy"] and result["test_nll"] > 0


@pytest.mark.parametrize("preset", ["course", "mlp", "softmax"])
def test_other_presets_train_and_sample(tmp_path, tiny_idx_dir, preset, capsys):
    run = tmp_path / preset
    assert main(_train_args(tiny_idx_dir, run, preset)) == 0
    assert (run / "checkpoints" / "latest").exists()
    if preset != "softmax":
        assert main(["sample", "--checkpoint", str(run), "--num", "4", "--out", str(tmp_path / "x.png")]) == 0


def test_resume_continues_and_existing_run_is_protected(tmp_path, tiny_idx_dir, capsys):
    run = tmp_path / "run"
    assert main(_train_args(tiny_idx_dir, run, extra=["--epochs", "1"])) == 0
    # Training again into the same folder without --resume would overwrite: refused.
    assert main(_train_args(tiny_idx_dir, run)) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert main(["train", "--run-dir", str(run), "--resume", "--epochs", "2", "--no-progress"]) == 0
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert max(line["step"] for line in lines) == 2 * (500 // 32)


def test_user_errors_are_one_line(tmp_path, capsys):
    assert main(["train", "--set", "sampler.steps=-2", "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: sampler.steps must be >= 0") and "\n" not in err
    assert main(["sample", "--checkpoint", str(tmp_path / "nope"), "--out", str(tmp_path / "x.png")]) == 2
    assert "no such checkpoint" in capsys.readouterr().err
    for argv in (["train", "--minutes", "-3"], ["sample", "--checkpoint", "x", "--frames", "0"]):
        with pytest.raises(SystemExit):
            main(argv)
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"error: jemlab {argv[0]}: argument") and "\n" not in err, err
    assert main(["train", "--dry-run", "--preset", "course"]) == 0
    assert json.loads(capsys.readouterr().out)["sampler"]["steps"] == 60


def test_resume_auto_starts_a_new_run_then_continues_it(tmp_path, tiny_idx_dir, capsys):
    """A restart script can always pass `--resume auto`: the first start trains, later starts continue."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 7, "loss": 1.0}\n')  # a start killed before its first checkpoint
    assert main([*_train_args(tiny_idx_dir, run, extra=["--epochs", "1"]), "--resume", "auto"]) == 0
    assert (run / "checkpoints" / "latest").exists()
    unfinished = list(run.glob("metrics.unfinished-*.jsonl"))
    assert len(unfinished) == 1 and '"step": 7' in unfinished[0].read_text()  # kept, not appended to
    first = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert first[0]["step"] != 7
    assert main(["train", "--run-dir", str(run), "--resume", "auto", "--epochs", "2", "--no-progress"]) == 0
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert max(line["step"] for line in lines) == 2 * (500 // 32)
    assert main(["train", "--resume", "auto", "--epochs", "1"]) == 2
    assert "--resume auto needs --run-dir" in capsys.readouterr().err
