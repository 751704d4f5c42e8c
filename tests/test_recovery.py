"""Divergence detection and recovery, SIGTERM/SIGINT handling, kill-and-resume, and refusal of crafted checkpoints."""

from __future__ import annotations

import json
import math
import os
import pickle
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from jemlab.config import build_config, config_from_dict
from jemlab.errors import CheckpointError, ConfigError, DivergenceError
from jemlab.samplers import ReplayBuffer, build_initializer
from jemlab.training import loop
from jemlab.training.checkpoint import load_checkpoint
from jemlab.training.divergence import REASONS, DivergenceDetector, DivergenceSignal
from jemlab.training.gap_drift import GapDriftMonitor
from jemlab.training.loop import Trainer
from jemlab.training.metrics_file import trim_metrics
from jemlab.training.recovery import Recovery, apply_policy, restart_chains

# A recovery policy that changes nothing: a rolled-back run must then repeat the clean run exactly.
NEUTRAL = [
    ("recovery.lr_factor", 1),
    ("recovery.sgld_steps_factor", 1),
    ("recovery.energy_l2_factor", 1),
    ("recovery.min_energy_l2", 0),
    ("recovery.reseed_chains", False),
    ("recovery.buffer_reset_fraction", 0),
    ("recovery.snapshot_every", 5),
]


def healthy(detector: DivergenceDetector, n: int, gap: float = 1.0, sgld: float = 0.5) -> None:
    for i in range(n):
        stats = {"loss": 1.0, "energy_data": -2.0, "energy_model": -2.0 + gap, "sgld_grad_norm": sgld}
        assert detector.check_step(i + 1, stats) is None


def inject_nan(monkeypatch: pytest.MonkeyPatch, bad_call) -> dict[str, int]:
    """Make the objective return a NaN loss on the calls for which `bad_call(n)` is true (n counts from 1)."""
    real = loop.jem_loss
    calls = {"n": 0}

    def jem_loss(*args, **kwargs):
        loss, stats = real(*args, **kwargs)
        calls["n"] += 1
        if bad_call(calls["n"]):
            loss = loss * float("nan")
            stats = {**stats, "loss": loss.detach()}
        return loss, stats

    monkeypatch.setattr(loop, "jem_loss", jem_loss)
    return calls


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# --- detectors -------------------------------------------------------------------------------------------------


def test_healthy_statistics_never_fire():
    detector = DivergenceDetector(warmup=3)
    healthy(detector, 200, gap=3.0, sgld=2.0)
    assert detector.check_gradients(201, 12.5) is None


@pytest.mark.parametrize(
    ("stats", "reason"),
    [
        ({"loss": math.nan, "energy_data": -1.0}, "nonfinite_loss"),
        ({"loss": 1.0, "energy_data": -1.0, "energy_model": math.inf}, "nonfinite_loss"),
        ({"loss": 1.0, "energy_data": 2e5, "energy_model": 0.0}, "energy_bound"),
        ({"loss": 1.0, "energy_data": -300.0, "energy_model": 300.0, "sgld_grad_norm": 0.5}, "energy_gap_explosion"),
        ({"loss": 1.0, "energy_data": -2.0, "energy_model": -1.0, "sgld_grad_norm": 5e3}, "sgld_gradient_explosion"),
        (
            {"loss": 1.0, "energy_data": -2.0, "energy_model": -1.0, "sgld_grad_norm": math.inf},
            "sgld_gradient_explosion",
        ),
    ],
)
def test_each_failure_has_its_named_reason(stats, reason):
    detector = DivergenceDetector(warmup=5)
    healthy(detector, 10)
    signal_ = detector.check_step(11, stats)
    assert signal_ is not None and signal_.reason == reason and signal_.step == 11
    assert reason in REASONS


def test_relative_detectors_wait_for_warmup_and_samples_name_a_nan():
    detector = DivergenceDetector(warmup=5)
    # An early energy gap of 500 is normal for chains that start from noise: not armed yet.
    assert detector.check_step(1, {"loss": 1.0, "energy_data": -250.0, "energy_model": 250.0}) is None
    x_model = torch.zeros(4, 1, 2, 2)
    x_model[2, 0, 1, 1] = math.nan
    found = detector.check_step(2, {"loss": math.nan}, x_model)
    assert found.reason == "nonfinite_samples"
    assert detector.check_gradients(3, math.nan).reason == "nonfinite_gradients"


def test_collapse_needs_patience():
    detector = DivergenceDetector(warmup=0, collapse_patience=4)
    flat = {"loss": 2.3, "energy_data": -2.302, "energy_model": -2.302, "sgld_grad_norm": 0.0}
    assert [detector.check_step(i, flat) for i in range(1, 4)] == [None, None, None]
    assert detector.check_step(4, flat).reason == "energy_gap_collapse"


def test_classifier_collapse_fires_only_after_learning_and_blocks_snapshots():
    log_c = math.log(10)
    detector = DivergenceDetector(warmup=0, num_classes=10, classifier_patience=5)
    at_chance = {"loss": log_c, "ce": log_c, "train_accuracy": 0.1}
    # A classifier that starts at chance level and has not learned yet is not a collapse, however long it stays.
    assert all(detector.check_step(i, at_chance) is None for i in range(1, 60))
    assert not detector.suspect
    learning = {"loss": 0.6, "ce": 0.6, "train_accuracy": 0.8}
    assert all(detector.check_step(i, learning) is None for i in range(60, 100))
    assert not detector.suspect
    # Back at chance: suspect as soon as the fast averages get there, a divergence after `classifier_patience` steps.
    assert detector.check_step(100, at_chance) is None and detector.check_step(101, at_chance) is None
    assert detector.suspect  # after two iterations that undo half of what was learned
    found = [None, None] + [detector.check_step(i, at_chance) for i in range(102, 160)]
    fired = [i for i, signal_ in zip(range(100, 160), found, strict=True) if signal_ is not None]
    assert fired and found[fired[0] - 100].reason == "classifier_collapse"
    assert detector.suspect
    state = json.loads(json.dumps(detector.state_dict()))
    copy = DivergenceDetector(num_classes=10)
    copy.load_state_dict(state)
    assert copy.suspect


def test_classifier_check_can_be_turned_off_and_old_detector_state_loads():
    detector = DivergenceDetector(warmup=0, num_classes=10, classifier_patience=0)
    for i in range(1, 50):
        detector.check_step(i, {"loss": 0.5, "ce": 0.5, "train_accuracy": 0.9})
    assert all(detector.check_step(i, {"loss": 3.0, "ce": 3.0, "train_accuracy": 0.0}) is None for i in range(50, 200))
    old = {"healthy": 3, "gap_average": None, "sgld_grad_average": None, "flat": 0}
    fresh = DivergenceDetector(num_classes=10)
    fresh.load_state_dict(old)
    assert fresh.ce_best is None and not fresh.suspect


def test_detector_state_survives_json():
    detector = DivergenceDetector(warmup=2)
    healthy(detector, 7, gap=0.3, sgld=0.7)
    copy = DivergenceDetector(warmup=2)
    copy.load_state_dict(json.loads(json.dumps(detector.state_dict())))
    assert copy.state_dict() == detector.state_dict()


# --- policy ----------------------------------------------------------------------------------------------------


def test_policy_lowers_lr_lengthens_chains_up_to_the_cap_and_strengthens_l2():
    config = build_config("default", [("recovery.max_sgld_steps", 40)])
    before = config.to_dict()
    changed, changes = apply_policy(config, config.recovery, uses_sampler=True)
    assert changes == {"optim.lr": [1e-3, 5e-4], "sampler.steps": [20, 30], "objective.energy_l2": [0.01, 0.02]}
    assert config.to_dict() == before  # a new config; the one given is left as it was
    changed, _ = apply_policy(changed, changed.recovery, uses_sampler=True)
    assert changed.sampler.steps == 40 and changed.optim.lr == 2.5e-4 and changed.objective.energy_l2 == 0.04
    softmax = build_config("softmax")
    assert set(apply_policy(softmax, softmax.recovery, uses_sampler=False)[1]) == {"optim.lr"}


def test_recovery_plans_the_rollback_and_the_changes_without_editing_the_config():
    config = build_config("default")
    before = config.to_dict()
    recovery = Recovery(config, num_classes=10)
    with pytest.raises(DivergenceError, match="no healthy state"):
        recovery.restore_snapshot()
    recovery.take_snapshot(7, lambda: {"weights": torch.ones(2)})
    plan = recovery.recover(
        DivergenceSignal("nonfinite_loss", 9, "loss=nan"), config, uses_sampler=True, buffer_chains=40
    )
    assert config.to_dict() == before and plan.config is not None and plan.config.optim.lr == config.optim.lr / 2
    assert plan.step == 7 and torch.equal(plan.state["weights"], torch.ones(2))
    assert plan.restart_chains == 10 and plan.chain_seed == config.train.seed + 1_000_003
    assert plan.event["changes"]["buffer_chains_restarted"] == [0, 10] and recovery.history == [plan.event]


def test_buffer_reset_restarts_the_requested_chains():
    init = build_initializer("uniform", (1, 4, 4))
    buffer = ReplayBuffer(40, (1, 4, 4), init, generator=torch.Generator().manual_seed(0))
    buffer.images.fill_(5.0)  # a value no initialiser produces
    restart_chains(buffer, 10, torch.Generator().manual_seed(1))
    restarted = (buffer.images != 5.0).flatten(1).all(1)
    assert int(restarted.sum()) == 10
    assert buffer.images[restarted].abs().max() <= 1


def test_recovery_config_is_validated_and_old_configs_load():
    assert build_config("default").recovery.enabled  # the default preset recovers by default
    for key, value in [("recovery.lr_factor", 0), ("recovery.max_retries", -1), ("recovery.buffer_reset_fraction", 2)]:
        with pytest.raises(ConfigError, match=key):
            build_config("default", [(key, value)])
    for key in ("optim.lr", "train.max_abs_energy", "recovery.lr_factor", "sampler.step_size"):
        with pytest.raises(ConfigError, match=key):
            build_config("default", [(key, "nan")])
    with pytest.raises(ConfigError, match=r"sampler.steps must be an integer"):
        build_config("default", [("sampler.steps", "1e999")])
    old = build_config("default").to_dict()
    del old["recovery"]  # a config.json written before the recovery section existed
    assert config_from_dict(old).recovery.max_retries == 5


# --- the trainer ----------------------------------------------------------------------------------------------


def test_rollback_restores_the_healthy_state_exactly(tiny_config_overrides, monkeypatch):
    """A NaN at iteration 8 with a policy that changes nothing: back to the snapshot of step 5, and the run then
    ends bit-for-bit where the clean run ends (model, optimizer, buffer, RNGs and batcher were all restored)."""
    overrides = [*tiny_config_overrides, *NEUTRAL, ("train.epochs", 1)]
    clean = Trainer(build_config("default", overrides), None)
    clean.fit()
    inject_nan(monkeypatch, lambda n: n == 8)
    recovered = Trainer(build_config("default", overrides), None)
    final = recovered.fit()
    assert final["recoveries"] == 1 and final["stop_reason"] == "epochs"
    event = recovered.recovery.history[0]
    assert (event["reason"], event["step"], event["rollback_to"]) == ("nonfinite_loss", 8, 5)
    for key, value in clean.model.state_dict().items():
        assert torch.equal(recovered.model.state_dict()[key], value), key
    assert torch.equal(recovered.buffer.images, clean.buffer.images)
    assert torch.equal(recovered.noise_generator.get_state(), clean.noise_generator.get_state())


def test_recovery_is_logged_applied_and_saved(tmp_path, tiny_config_overrides, monkeypatch):
    inject_nan(monkeypatch, lambda n: n == 20)
    config = build_config("default", [*tiny_config_overrides, ("train.sample_every", 100)])
    final = Trainer(config, tmp_path / "run").fit()
    assert final["recoveries"] == 1 and final["recovery_reasons"] == ["nonfinite_loss"]
    events = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if r.get("event") == "recovery"]
    assert len(events) == 1 and events[0]["reason"] == "nonfinite_loss" and events[0]["rollback_to"] == 15
    changes = events[0]["changes"]
    assert changes["optim.lr"] == [1e-3, 5e-4] and changes["sampler.steps"] == [3, 5]
    assert changes["buffer_chains_restarted"] == [0, 50] and "chain_seed" in changes
    _, meta = load_checkpoint(tmp_path / "run")  # the changed settings travel with the checkpoint
    assert meta["config"]["optim"]["lr"] == 5e-4 and meta["recovery"]["history"][0]["reason"] == "nonfinite_loss"
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["recoveries"] == 1


def test_without_recovery_divergence_stops_with_a_named_reason(tmp_path, tiny_config_overrides, monkeypatch):
    inject_nan(monkeypatch, lambda n: n == 20)
    config = build_config("default", [*tiny_config_overrides, ("recovery.enabled", False)])
    with pytest.raises(DivergenceError, match="nonfinite_loss at step 20") as err:
        Trainer(config, tmp_path / "run").fit()
    assert "\n" not in str(err.value) and "recovery.enabled=false" in str(err.value)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["stop_reason"] == "diverged" and metrics["step"] == 15  # the last healthy state, saved
    _, meta = load_checkpoint(tmp_path / "run")
    assert meta["progress"]["step"] == 15


def test_recovery_gives_up_after_max_retries(tmp_path, tiny_config_overrides, monkeypatch):
    inject_nan(monkeypatch, lambda n: n >= 10)
    config = build_config("default", [*tiny_config_overrides, ("recovery.max_retries", 2)])
    with pytest.raises(DivergenceError, match="2 automatic recoveries did not help"):
        Trainer(config, tmp_path / "run").fit()
    events = [r["event"] for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "event" in r]
    assert events == ["recovery", "recovery", "diverged"]
    load_checkpoint(tmp_path / "run")  # what was written so far is intact


def test_unstable_settings_are_detected(tiny_config_overrides):
    overrides = [("sampler.step_size", 1000), ("optim.lr", 0.5), ("optim.warmup_steps", 0), ("recovery.enabled", False)]
    with pytest.raises(DivergenceError) as err:
        Trainer(build_config("default", tiny_config_overrides + overrides), None).fit()
    assert any(f"{reason} at step" in str(err.value) for reason in REASONS)


@pytest.mark.parametrize(("signum", "reason"), [(signal.SIGTERM, "terminated"), (signal.SIGINT, "interrupted")])
def test_signal_saves_and_exits_cleanly(tmp_path, tiny_config_overrides, monkeypatch, signum, reason):
    real_step = Trainer.train_step

    def step_then_signal(self, x, y, epoch):
        stats = real_step(self, x, y, epoch)
        if self.step == 4:
            os.kill(os.getpid(), signum)
        return stats

    monkeypatch.setattr(Trainer, "train_step", step_then_signal)

    def sentinel(signum, frame):  # pragma: no cover - must not be called during fit
        raise AssertionError("the previous handler ran during fit")

    previous = signal.signal(signum, sentinel)
    try:
        final = Trainer(build_config("default", tiny_config_overrides), tmp_path / "run").fit()
        assert signal.getsignal(signum) is sentinel  # handed back after fit
    finally:
        signal.signal(signum, previous)
    assert final["stop_reason"] == reason and final["step"] == 4
    _, meta = load_checkpoint(tmp_path / "run")
    assert meta["progress"]["step"] == 4


def test_resume_continues_the_metrics_of_a_killed_run(tmp_path, tiny_config_overrides):
    """Pretend the run was killed after logging past its step-15 checkpoint (a cut-off line included): the resumed
    run's metrics.jsonl is the uninterrupted run's, line for line (on the CPU, to the last bit)."""
    config = build_config("default", [*tiny_config_overrides, ("train.sample_every", 100)])
    run = tmp_path / "run"
    Trainer(config, run).fit()
    original = read_jsonl(run / "metrics.jsonl")
    (run / "checkpoints" / "latest").write_text("step-0000015.safetensors\n")
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 31, "loss": 0.')  # a line the kill cut off
    Trainer(build_config("default", [*tiny_config_overrides, ("train.sample_every", 100)]), run).fit(resume_from=run)
    resumed = read_jsonl(run / "metrics.jsonl")

    def timeless(record):
        return {k: v for k, v in record.items() if k != "elapsed_s" and not k.endswith("_per_s")}

    assert [timeless(r) for r in resumed] == [timeless(r) for r in original]


def test_trim_metrics_falls_back_to_steps(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 5}\n{"step": 10}\n{"step": 15}\n{"step": 1')
    assert trim_metrics(path, None, 10) == 2
    assert read_jsonl(path) == [{"step": 5}, {"step": 10}]


@pytest.mark.slow
def test_sigkill_then_resume_from_the_command_line(tmp_path, tiny_idx_dir):
    run = tmp_path / "run"
    common = [sys.executable, "-m", "jemlab", "train", "--run-dir", str(run), "--no-progress"]
    sets = ["data.val_size=100", "data.download=false", "sampler.steps=3", "sampler.buffer_size=200"]
    sets += ["train.tensorboard=false", "train.sample_every=100", "train.log_every=5"]
    fresh = [*common, "--data-dir", str(tiny_idx_dir), "--epochs", "3", "--batch-size", "32", "--threads", "1"]
    fresh += [arg for item in sets for arg in ("--set", item)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(fresh, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    latest = run / "checkpoints" / "latest"
    deadline = time.monotonic() + 60
    while not latest.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert latest.exists(), "the run never wrote a checkpoint"
    for path in (run / "checkpoints").glob("step-*.safetensors"):
        load_checkpoint(path)
    done = subprocess.run([*common, "--resume"], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    steps = [r["step"] for r in read_jsonl(run / "metrics.jsonl") if "loss" in r and "event" not in r]
    assert steps == list(range(5, 46, 5))  # every iteration logged once, in order
    assert not list((run / "checkpoints").glob(".*.tmp"))


# --- checkpoints that cannot be abused ------------------------------------------------------------------------


class _Payload:
    """Unpickling this runs `touch <marker>`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_crafted_pickle_checkpoints_are_refused(tmp_path, protocol, tiny_config_overrides):
    marker = tmp_path / "pwned"
    evil = tmp_path / "step-0000001.safetensors"
    evil.write_bytes(pickle.dumps({"model": _Payload(marker)}, protocol=protocol))
    with pytest.raises(CheckpointError, match="pickle"):
        load_checkpoint(evil)
    torch.save({"model": _Payload(marker)}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="pickle"):
        load_checkpoint(tmp_path / "evil.pt")
    # A real safetensors file with jemlab's header whose state smuggles a pickle in as text: refused as data.
    from safetensors.torch import save_file

    encoded = pickle.dumps(_Payload(marker), protocol=protocol).hex()
    smuggled = tmp_path / "smuggled.safetensors"
    header = {"format": "jemlab-checkpoint", "format_version": "1", "meta": "{}"}
    save_file({"s.w": torch.ones(1)}, smuggled, metadata={**header, "state": json.dumps({"__pickle__": encoded})})
    with pytest.raises(CheckpointError, match="malformed"):
        load_checkpoint(smuggled)
    trainer = Trainer(build_config("default", tiny_config_overrides), None)
    with pytest.raises(CheckpointError):
        trainer.resume(evil)
    assert not marker.exists()


def test_newer_format_versions_are_refused(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "future.safetensors"
    header = {"format": "jemlab-checkpoint", "format_version": "2", "state": "{}", "meta": "{}"}
    save_file({"x": torch.ones(1)}, path, metadata=header)
    with pytest.raises(CheckpointError, match="format version 2 is not supported"):
        load_checkpoint(path)


def test_source_never_unpickles_untrusted_files():
    """torch.load only with weights_only=True, and no pickle.load outside the restricted CIFAR unpickler."""
    src = Path(__file__).resolve().parents[1] / "src" / "jemlab"
    unpickling = re.compile(r"\bpickle\.(loads?\(|Unpickler\b)|allow_pickle\s*=\s*True")
    for path in src.rglob("*.py"):
        text = path.read_text()
        for line in text.splitlines():
            if "torch.load(" in line:
                assert "weights_only=True" in line, f"{path}: {line.strip()}"
        if path.name != "safe_pickle.py":
            assert not unpickling.search(text), f"{path}: {unpickling.search(text).group(0)}"


def test_gap_drift_warning_fires_once_per_doubling_and_not_on_healthy_gaps():
    # logged gaps of real runs: a healthy default-preset run, the 60-minute default run whose replay buffer
    # collapsed between minutes 22 and 27 (every 2,500 steps), and the MLP preset's first minute (short-run chains
    # from noise: a large gap at the start that closes)
    healthy = [0.08, 0.11, 0.10, 0.09, 0.13, 0.11, 0.14, 0.27]
    collapsing = [0.08, 0.11, 0.10, 0.09, 0.13, -11.81, -19.77, -21.92, -24.24, -25.26, -25.2, -25.12]
    mlp_start = [-5.517, -5.517, -2.138, -1.095, -0.484, -0.138]

    def warnings(gaps, level=5.0):
        monitor = GapDriftMonitor(level)
        return [i for i, cd in enumerate(gaps) if monitor.check(cd) is not None]

    assert warnings(healthy) == [] and warnings(mlp_start) == []
    assert warnings(collapsing) == [5, 8]  # |gap| 11.8 > 5, then 24.2 > 2 × 11.8; never again below 48.5
    assert warnings([*mlp_start, -6.0]) == [6]  # armed once the gap closed: opening again is a drift
    assert warnings(collapsing, level=0) == []  # 0: off
    assert warnings([0.1, float("nan"), 0.1]) == []
    monitor = GapDriftMonitor(5.0)
    monitor.check(0.1)
    message = monitor.check(-11.81)
    assert "energy gap is -11.8" in message and "recovery.gap_warning" in message


def test_gap_drift_warning_reaches_the_log_and_metrics(tmp_path, tiny_config_overrides, monkeypatch):
    class Armed(GapDriftMonitor):  # as if the gap had been below the level before: any logged gap above it warns
        def __init__(self, level: float) -> None:
            super().__init__(level)
            self.armed = True

    monkeypatch.setattr(loop, "GapDriftMonitor", Armed)
    config = build_config("default", [*tiny_config_overrides, ("recovery.gap_warning", 1e-9)])
    Trainer(config, tmp_path / "run").fit()
    warnings = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if r.get("event") == "warning"]
    assert warnings and warnings[0]["reason"] == "energy_gap_drift" and "step" in warnings[0]
    assert "energy gap" in (tmp_path / "run" / "train.log").read_text()
    with pytest.raises(ConfigError, match=r"recovery\.gap_warning must be >= 0"):
        build_config("default", [("recovery.gap_warning", -1)])
