"""Sample quality tracked while training, the best-samples checkpoint, and recovery from slow drifts."""

from __future__ import annotations

import json
import math

import pytest
import torch

import jemlab
from jemlab.config import build_config
from jemlab.errors import ConfigError
from jemlab.quality.diversity import NEAR_COPY_RMS, near_copies, within_class_diversity
from jemlab.training import loop
from jemlab.training.checkpoint import BEST_SAMPLES, load_checkpoint
from jemlab.training.loop import Trainer
from jemlab.training.quality import QualityTracker
from jemlab.training.quality_plot import plot_quality


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture()
def tracked(tiny_config_overrides):
    """The tiny run, measured every 10 iterations (2 epochs of 15 iterations)."""
    return [*tiny_config_overrides, ("quality.every", 10), ("quality.per_class", 5)]


# --- the near-copy count ----------------------------------------------------------------------------------------


def test_near_copies_are_found_within_a_class_only():
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(6, 1, 8, 8, generator=gen) * 2 - 1
    x[1] = x[0] + 0.02  # RMS 0.01 on the [0, 1] scale: a near-copy
    x[3] = x[2] + 0.02
    labels = torch.tensor([0, 0, 1, 2, 2, 2])  # 2 and 3 are alike but in different classes
    assert near_copies(x, labels).tolist() == [True, True, False, False, False, False]
    assert near_copies(x).tolist() == [True, True, True, True, False, False]
    d = within_class_diversity(x, labels)
    assert d.near_copies == 2 and d.near_copy_fraction == pytest.approx(2 / 5)  # the lone class-1 image has no pair
    # the threshold is an RMS difference on the [0, 1] scale: a shift of 2·0.049 in [−1, 1] is just below it
    y = torch.zeros(2, 1, 4, 4)
    y[1] += 2 * (NEAR_COPY_RMS - 0.001)
    assert near_copies(y).all()
    y[1] += 0.004
    assert not near_copies(y).any()


def test_real_images_have_no_near_copies_and_repeats_do():
    from jemlab.data.testing import write_idx_dataset  # noqa: F401  (the tiny dataset's images are random-ish)

    gen = torch.Generator().manual_seed(1)
    distinct = torch.rand(40, 1, 28, 28, generator=gen) * 2 - 1
    labels = torch.arange(4).repeat_interleave(10)
    assert within_class_diversity(distinct, labels).near_copies == 0
    repeated = distinct[torch.arange(40) // 5 * 5]  # every image five times
    assert within_class_diversity(repeated, labels).near_copy_fraction == 1.0


# --- tracking ----------------------------------------------------------------------------------------------------


def test_tracking_logs_quality_keeps_the_best_state_and_draws_the_curve(tmp_path, tracked):
    run = tmp_path / "run"
    final = Trainer(build_config("default", [*tracked, ("recovery.drift_action", "warn")]), run).fit()
    records = [r for r in read_jsonl(run / "metrics.jsonl") if "quality_fd" in r and "test_accuracy" not in r]
    assert [r["step"] for r in records] == [10, 20, 30]
    for r in records:
        for key in ("quality_fd", "quality_kid", "quality_fresh_fd", "quality_class_fd", "quality_class_agreement",
                    "quality_model_agreement", "quality_near_copies", "quality_nn_rms", "quality_seconds"):  # fmt: skip
            assert math.isfinite(r[key]), key
        assert 0 <= r["quality_near_copies"] <= 1 and r["quality_fd"] >= 0
    best = min(records, key=lambda r: r["quality_fd"])
    assert final["quality_best_fd"] == pytest.approx(best["quality_fd"]) and final["quality_best_step"] == best["step"]
    assert final["quality_fd"] == pytest.approx(records[-1]["quality_fd"])  # the last measurement, not a new one
    _, meta = load_checkpoint(run / "checkpoints" / BEST_SAMPLES)
    assert meta["progress"]["step"] == best["step"]
    assert meta["best_samples"]["quality_fd"] == pytest.approx(best["quality_fd"])
    model = jemlab.load(run / "checkpoints" / BEST_SAMPLES)  # a complete checkpoint: it loads and samples
    assert model.sample(4, seed=0).shape == (4, 1, 28, 28)
    assert (run / "quality.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_tracking_does_not_change_the_training(tmp_path, tiny_config_overrides, tracked):
    """A measurement draws with its own generators and leaves the buffer alone: the same iterations either way."""
    warn = [("recovery.drift_action", "warn")]
    plain = Trainer(build_config("default", [*tiny_config_overrides, *warn]), tmp_path / "a")
    plain.fit()
    with_tracking = Trainer(build_config("default", [*tracked, *warn]), tmp_path / "b")
    with_tracking.fit()
    for (name, p), q in zip(plain.model.state_dict().items(), with_tracking.model.state_dict().values(), strict=True):
        assert torch.equal(p, q), name
    assert torch.equal(plain.buffer.images, with_tracking.buffer.images)


def test_feature_net_is_not_trained_on_a_subset(tmp_path, tracked, monkeypatch):
    """--limit: no feature net is trained (it would be cached for the whole dataset); tracking is skipped, said once."""
    monkeypatch.setenv("JEMLAB_DATA", str(tmp_path / "empty-cache"))
    config = build_config("default", [*tracked, ("data.limit", 300)])
    trainer = Trainer(config, tmp_path / "run")
    assert not trainer.quality.may_train
    final = trainer.fit()
    assert "quality_fd" not in final and not trainer.quality.enabled
    assert "no cached feature net" in (tmp_path / "run" / "train.log").read_text()


def test_best_fd_survives_a_resume(tmp_path, tracked):
    run = tmp_path / "run"
    config = build_config("default", [*tracked, ("train.epochs", 1), ("recovery.drift_action", "warn")])
    first = Trainer(config, run).fit()
    config = build_config("default", [*tracked, ("train.epochs", 2), ("recovery.drift_action", "warn")])
    resumed = Trainer(config, run)
    resumed.resume(run)
    assert (resumed.best_fd, resumed.best_fd_step) == (first["quality_best_fd"], first["quality_best_step"])
    assert first["quality_best_step"] in (10, 15)  # measured at step 10 and at the end (15)


def test_quality_config_is_validated():
    for key, value, message in [
        ("quality.every", -1, r"quality\.every must be >= 0"),
        ("quality.samples", 1, r"quality\.samples must be >= 2"),
        ("quality.per_class", -1, r"quality\.per_class must be >= 0"),
        ("recovery.quality_drop", 0.5, r"recovery\.quality_drop must be > 1"),
        ("recovery.drift_action", "ignore", r"recovery\.drift_action must be recover or warn, got 'ignore'"),
    ]:
        with pytest.raises(ConfigError, match=message):
            build_config("default", [(key, value)])


# --- drifts replayed --------------------------------------------------------------------------------------------

# The energy gap logged every 2,500 iterations by the 60-minute default run whose replay buffer collapsed (healthy
# until minute 22, then open), replayed one value per log line of the tiny run (every 5 iterations).
COLLAPSING_GAPS = [0.08, 0.11, 0.10, 0.09, 0.13, -11.81, -19.77, -21.92, -24.24, -25.26, -25.2, -25.12]


def replay_gaps(monkeypatch, gaps):
    """Every logged window reports the next gap of `gaps` (then the last one), whatever the run computed."""
    original = loop._LogWindow.means
    replayed = iter(gaps)
    last = [gaps[-1]]

    def means(self):
        out = original(self)
        if "cd" in out:
            last[0] = next(replayed, last[0])
            out["cd"] = last[0]
        return out

    monkeypatch.setattr(loop._LogWindow, "means", means)


def test_a_replayed_gap_drift_is_rolled_back_to_the_last_healthy_measurement(tmp_path, tracked, monkeypatch):
    replay_gaps(monkeypatch, COLLAPSING_GAPS[:6] + [0.1] * 20)  # opens once at the 6th log line (step 30)...
    config = build_config("default", [*tracked, ("train.epochs", 3), ("recovery.quality_drop", 0)])
    trainer = Trainer(config, tmp_path / "run")
    trainer.fit()
    events = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if r.get("event") == "recovery"]
    assert len(events) == 1
    event = events[0]
    assert event["reason"] == "energy_gap_drift" and event["step"] == 30
    # ...and rolls back to the measurement at step 20 (healthy gap, quality at its best), not to the last snapshot
    assert event["rollback_to"] == 20
    assert event["changes"]["optim.lr"] == [1e-3, 5e-4] and event["changes"]["objective.energy_l2"] == [0.01, 0.02]
    assert trainer.config.optim.lr == 5e-4 and trainer.step == 45  # the policy applies and training goes on


def test_a_gap_drift_only_warns_when_told_to_or_when_recovery_is_off(tmp_path, tracked, monkeypatch):
    for extra in ([("recovery.drift_action", "warn")], [("recovery.enabled", False)]):
        replay_gaps(monkeypatch, COLLAPSING_GAPS)
        run = tmp_path / str(len(extra[0][0]))
        final = Trainer(build_config("default", [*tracked, *extra]), run).fit()
        records = read_jsonl(run / "metrics.jsonl")
        assert not [r for r in records if r.get("event") == "recovery"]
        warnings = [r for r in records if r.get("event") == "warning"]
        assert warnings and warnings[0]["reason"] == "energy_gap_drift" and warnings[0]["step"] == 30
        assert final["stop_reason"] == "epochs"


def test_a_replayed_quality_drop_is_rolled_back(tmp_path, tracked, monkeypatch):
    fds = iter([10.0, 8.0, 30.0, 9.0, 9.0, 9.0])  # best 8 at step 20, then 30 > 3 × 8 at step 30
    original = QualityTracker.measure

    def measure(self, source, step):
        out = original(self, source, step)
        out["quality_fd"] = next(fds)
        return out

    monkeypatch.setattr(QualityTracker, "measure", measure)
    trainer = Trainer(build_config("default", [*tracked, ("recovery.gap_warning", 0)]), tmp_path / "run")
    trainer.fit()
    events = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if r.get("event") == "recovery"]
    assert [(e["reason"], e["step"], e["rollback_to"]) for e in events] == [("sample_quality_drop", 30, 20)]
    assert trainer.best_fd == 8.0 and trainer.best_fd_step == 20
    _, meta = load_checkpoint(tmp_path / "run" / "checkpoints" / BEST_SAMPLES)
    assert meta["progress"]["step"] == 20


def test_the_curve_leaves_out_what_a_recovery_rolled_back(tmp_path):
    lines = [
        {"step": 10, "quality_fd": 5.0},
        {"step": 20, "quality_fd": 4.0},
        {"step": 30, "quality_fd": 40.0},
        {"step": 30, "event": "recovery", "rollback_to": 20},
        {"step": 30, "quality_fd": 3.0},
    ]
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("\n".join(json.dumps(r) for r in lines) + "\n{\"step\": 4")  # a line cut by a kill
    from jemlab.training.quality_plot import _records, _series

    assert _series(_records(metrics), "quality_fd") == ([10, 20, 30], [5.0, 4.0, 3.0])
    assert plot_quality(metrics, tmp_path / "q.png").is_file()
    assert plot_quality(tmp_path / "none.jsonl", tmp_path / "none.png") is None
