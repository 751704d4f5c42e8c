"""Divergence detection and automatic recovery: the JEM you can leave running.

JEM training diverges often: the energies of data and samples drift apart, the loss explodes and turns into NaN
within a few iterations (Grathwohl et al., 2020, list the instability among JEM's limitations; their code divides
by zero on purpose, and users restart by hand from the last checkpoint with a new seed or a lower learning rate).
This module does what those users do, by itself:

1. `DivergenceDetector` watches the diagnostics every iteration already computes and names what went wrong
   (`REASONS`). Every check runs *before* the optimizer step, so a bad update never reaches the weights.
2. `Recovery` keeps the last healthy state in memory (`Snapshot`: model, optimizer, replay buffer, batcher, every
   random generator, the detector's running statistics) — one every `recovery.snapshot_every` iterations and one at
   every checkpoint, which is its copy on disk. On divergence it rolls back to it, applies the config's recovery
   policy (`apply_policy`: lower learning rate, more SGLD steps, stronger energy L2, new seed for the chains, part of
   the buffer restarted) and lets training go on; after `recovery.max_retries` recoveries it gives up with one
   clear error, the healthy state saved.
3. `StopRequest` turns SIGTERM and a first Ctrl-C into "stop after this iteration", so the state that is saved is
   always a consistent one.

Every recovery is a line of the run's ``metrics.jsonl`` (``event: "recovery"``, the reason, the changes applied)
and is counted in ``metrics.json`` (``recoveries``).
"""

from __future__ import annotations

import json
import math
import signal
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

import torch

from jemlab.config import Config, RecoveryConfig
from jemlab.errors import DivergenceError

if TYPE_CHECKING:
    from jemlab.samplers import ReplayBuffer
    from jemlab.training.loop import Trainer

# Each reason a run can be stopped for, as written in the log and in metrics.jsonl.
REASONS: dict[str, str] = {
    "nonfinite_loss": "the loss (or one of its terms) is NaN or infinite",
    "nonfinite_samples": "the SGLD samples contain NaN or infinity",
    "nonfinite_gradients": "a parameter gradient is NaN or infinite",
    "energy_bound": "|energy| of the data or of the samples is beyond train.max_abs_energy",
    "energy_gap_explosion": "|E(x_data) - E(x_model)| grew far beyond its running scale",
    "energy_gap_collapse": "data and samples got the same energy on a flat energy surface (SGLD gradient ~ 0)",
    "sgld_gradient_explosion": "the SGLD gradient norm |grad_x E| grew far beyond its running scale",
    "classifier_collapse": "the classifier fell back to chance level (cross-entropy ~ log C) after it had learned",
}


@dataclass(frozen=True)
class DivergenceSignal:
    """What a detector found: a reason from `REASONS`, the iteration (1-based) and the numbers behind it."""

    reason: str
    step: int
    detail: str

    def describe(self) -> str:
        return f"{self.reason} at step {self.step} ({self.detail})"


class DivergenceDetected(DivergenceError):
    """Raised inside a training iteration when a detector fires; carries the `DivergenceSignal`."""

    def __init__(self, signal: DivergenceSignal) -> None:
        super().__init__(
            f"training diverged: {signal.describe()}; resume from the last checkpoint with --resume and a lower "
            f"optim.lr or sampler.step_size, or a higher objective.energy_l2 (or leave recovery.enabled=true)"
        )
        self.signal = signal


# --- detection -------------------------------------------------------------------------------------------------


class DivergenceDetector:
    """Checks one iteration's diagnostics for the failure modes of JEM training.

    Absolute checks (non-finite values, |energy| beyond a bound) fire at once. Relative checks compare a value with
    its exponential moving average over the healthy iterations so far, so they need no per-dataset tuning: the
    energy gap |E(x_data) − E(x_model)| and the SGLD gradient norm fire when they exceed `factor` × max(average,
    floor); they are armed after `warmup` healthy iterations. A collapse is `patience` iterations in a row in which
    data and samples have the same energy (within 1e-4) and the SGLD gradient is below 1e-7: the network no longer
    depends on its input.

    A classifier collapse is the failure that the energy checks miss: a learning rate too large for the network kills
    it (dead units, saturated logits) and p(y|x) falls back to uniform while every energy stays finite and the loss
    looks calm. The detector follows fast averages of the batch cross-entropy and accuracy; once the classifier has
    learned (its fast-averaged cross-entropy went below `learned_fraction` × log C), `classifier_patience` iterations in
    a row at chance level (cross-entropy ≥ `chance_fraction` × log C and accuracy at most 1.5/C) fire it. A faster
    average (about two iterations) makes the detector `suspect` as soon as the classifier has lost half of what it
    had learned; while it is, the trainer takes no healthy snapshot (it tries again at the next iteration), so a
    rollback does not land on a network that is collapsing.

    Args:
        max_abs_energy: bound on the mean energy of the data and of the samples.
        gap_factor, gap_floor: the energy-gap explosion threshold.
        sgld_grad_factor, sgld_grad_floor: the SGLD-gradient explosion threshold.
        warmup: healthy iterations before the relative checks are armed.
        collapse_patience: iterations in a row of a flat energy surface that count as a collapse.
        num_classes: C, for the classifier-collapse check (None: no check).
        classifier_patience: iterations in a row at chance level that count as a classifier collapse (0: no check).
        decay: decay of the moving averages.
    """

    learned_fraction = 0.85
    chance_fraction = 0.97
    average_decay = 0.9  # the averages that fire follow about the last 10 iterations ...
    suspect_decay = 0.5  # ... the one that blocks snapshots about the last 2

    collapse_gap = 1e-4
    collapse_grad_norm = 1e-7

    def __init__(
        self,
        max_abs_energy: float = 1e5,
        gap_factor: float = 100.0,
        gap_floor: float = 1.0,
        sgld_grad_factor: float = 1000.0,
        sgld_grad_floor: float = 1.0,
        warmup: int = 20,
        collapse_patience: int = 20,
        num_classes: int | None = None,
        classifier_patience: int = 20,
        decay: float = 0.98,
    ) -> None:
        self.max_abs_energy = max_abs_energy
        self.gap_factor, self.gap_floor = gap_factor, gap_floor
        self.sgld_grad_factor, self.sgld_grad_floor = sgld_grad_factor, sgld_grad_floor
        self.warmup = warmup
        self.collapse_patience = collapse_patience
        self.decay = decay
        self.healthy = 0  # healthy iterations seen
        self.gap_average: float | None = None
        self.sgld_grad_average: float | None = None
        self.flat = 0  # iterations in a row with a flat energy surface
        self.log_classes = math.log(num_classes) if num_classes is not None and num_classes >= 2 else None
        self.max_chance_accuracy = 1.5 / num_classes if num_classes else 0.0
        self.classifier_patience = classifier_patience
        self.ce_average: float | None = None  # averages of the batch cross-entropy and accuracy
        self.ce_fast: float | None = None  # a faster average of the cross-entropy
        self.accuracy_average: float | None = None
        self.ce_best: float | None = None  # lowest fast-averaged cross-entropy so far
        self.at_chance = 0  # iterations in a row at chance level after having learned

    @classmethod
    def from_config(cls, config: Config, num_classes: int | None = None) -> DivergenceDetector:
        r = config.recovery
        return cls(
            max_abs_energy=config.train.max_abs_energy,
            gap_factor=r.energy_gap_factor,
            gap_floor=r.energy_gap_floor,
            sgld_grad_factor=r.sgld_grad_factor,
            sgld_grad_floor=r.sgld_grad_floor,
            warmup=r.warmup_steps,
            collapse_patience=r.collapse_patience,
            num_classes=num_classes,
            classifier_patience=r.classifier_patience,
        )

    def check_step(
        self, step: int, stats: Mapping[str, float], x_model: torch.Tensor | None = None
    ) -> DivergenceSignal | None:
        """Check an iteration's loss statistics before its backward pass; update the averages when healthy.

        Args:
            step: the iteration, 1-based (the number the log will show for it).
            stats: floats from the objective and the sampler (`loss`, `energy_data`, `energy_model`,
                `sgld_grad_norm`, ...).
            x_model: the iteration's SGLD samples, only looked at to name a non-finite loss's cause.

        Returns:
            A `DivergenceSignal`, or None when the iteration is healthy.
        """
        bad = sorted(k for k, v in stats.items() if not math.isfinite(v))
        if bad:
            detail = ", ".join(f"{k}={stats[k]}" for k in bad)
            if x_model is not None and not bool(torch.isfinite(x_model).all()):
                return DivergenceSignal("nonfinite_samples", step, detail)
            if bad == ["sgld_grad_norm"]:
                return DivergenceSignal("sgld_gradient_explosion", step, detail)
            return DivergenceSignal("nonfinite_loss", step, detail)

        energy_data, energy_model = stats.get("energy_data"), stats.get("energy_model")
        for name, energy in (("energy_data", energy_data), ("energy_model", energy_model)):
            if energy is not None and abs(energy) > self.max_abs_energy:
                return DivergenceSignal("energy_bound", step, f"{name}={energy:.4g}, bound {self.max_abs_energy:g}")

        armed = self.healthy >= self.warmup
        gap = None if energy_data is None or energy_model is None else abs(energy_data - energy_model)
        if gap is not None and armed and self.gap_average is not None:
            threshold = self.gap_factor * max(self.gap_average, self.gap_floor)
            if gap > threshold:
                return DivergenceSignal(
                    "energy_gap_explosion",
                    step,
                    f"|E_data - E_model|={gap:.4g} > {threshold:.4g} (running average {self.gap_average:.4g})",
                )
        sgld_grad = stats.get("sgld_grad_norm")
        if sgld_grad is not None and armed and self.sgld_grad_average is not None:
            threshold = self.sgld_grad_factor * max(self.sgld_grad_average, self.sgld_grad_floor)
            if sgld_grad > threshold:
                return DivergenceSignal(
                    "sgld_gradient_explosion",
                    step,
                    f"sgld_grad_norm={sgld_grad:.4g} > {threshold:.4g} (running average {self.sgld_grad_average:.4g})",
                )
        flat = gap is not None and sgld_grad is not None and gap <= self.collapse_gap
        flat = flat and sgld_grad <= self.collapse_grad_norm
        self.flat = self.flat + 1 if flat else 0
        if self.flat >= self.collapse_patience:
            return DivergenceSignal(
                "energy_gap_collapse",
                step,
                f"|E_data - E_model|={gap:.2g} and sgld_grad_norm={sgld_grad:.2g} for {self.flat} steps",
            )

        collapse = self._check_classifier(step, stats)
        if collapse is not None:
            return collapse

        self.healthy += 1
        if gap is not None:
            self.gap_average = gap if self.gap_average is None else self._mix(self.gap_average, gap)
        if sgld_grad is not None:
            self.sgld_grad_average = (
                sgld_grad if self.sgld_grad_average is None else self._mix(self.sgld_grad_average, sgld_grad)
            )
        return None

    def _check_classifier(self, step: int, stats: Mapping[str, float]) -> DivergenceSignal | None:
        ce, accuracy = stats.get("ce"), stats.get("train_accuracy")
        if self.log_classes is None or self.classifier_patience <= 0 or ce is None or accuracy is None:
            return None
        self.ce_average = _average(self.ce_average, ce, self.average_decay)
        self.accuracy_average = _average(self.accuracy_average, accuracy, self.average_decay)
        self.ce_fast = _average(self.ce_fast, ce, self.suspect_decay)
        # The best is taken over the fast average: a classifier that learned for a few iterations only and then died
        # (seen with lr × 20) never brings the slower average down far enough.
        self.ce_best = self.ce_fast if self.ce_best is None else min(self.ce_best, self.ce_fast)
        at_chance = self._learned() and self.ce_average >= self.chance_fraction * self.log_classes
        at_chance = at_chance and self.accuracy_average <= self.max_chance_accuracy
        self.at_chance = self.at_chance + 1 if at_chance else 0
        if self.at_chance >= self.classifier_patience:
            return DivergenceSignal(
                "classifier_collapse",
                step,
                f"cross-entropy {self.ce_average:.3f} ~ log C = {self.log_classes:.3f} and accuracy "
                f"{self.accuracy_average:.3f} for {self.at_chance} steps (best cross-entropy {self.ce_best:.3f})",
            )
        return None

    def _learned(self) -> bool:
        return (
            self.log_classes is not None
            and self.ce_best is not None
            and (self.ce_best <= self.learned_fraction * self.log_classes)
        )

    @property
    def suspect(self) -> bool:
        """True while the classifier, having learned, has lost half of it or sits at chance level: no healthy
        snapshot is taken then."""
        if not self._learned() or self.ce_fast is None:
            return False
        assert self.log_classes is not None and self.ce_best is not None
        halfway = self.ce_best + 0.5 * (self.log_classes - self.ce_best)
        return self.at_chance > 0 or self.ce_fast >= halfway

    def check_gradients(self, step: int, grad_norm: float) -> DivergenceSignal | None:
        """Check the global parameter-gradient norm after the backward pass, before the optimizer step."""
        if not math.isfinite(grad_norm):
            return DivergenceSignal("nonfinite_gradients", step, f"grad_norm={grad_norm}")
        return None

    def _mix(self, average: float, value: float) -> float:
        return self.decay * average + (1 - self.decay) * value

    def state_dict(self) -> dict[str, Any]:
        """Plain JSON numbers (Python floats round-trip exactly through JSON), for checkpoint metadata."""
        return {
            "healthy": self.healthy,
            "gap_average": self.gap_average,
            "sgld_grad_average": self.sgld_grad_average,
            "flat": self.flat,
            "ce_average": self.ce_average,
            "ce_fast": self.ce_fast,
            "accuracy_average": self.accuracy_average,
            "ce_best": self.ce_best,
            "at_chance": self.at_chance,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.healthy = int(state["healthy"])
        self.gap_average = None if state["gap_average"] is None else float(state["gap_average"])
        self.sgld_grad_average = None if state["sgld_grad_average"] is None else float(state["sgld_grad_average"])
        self.flat = int(state["flat"])
        # Checkpoints written before the classifier check lack its averages: it starts afresh then.
        for name in ("ce_average", "ce_fast", "accuracy_average", "ce_best"):
            value = state.get(name)
            setattr(self, name, None if value is None else float(value))
        self.at_chance = int(state.get("at_chance", 0))


class GapDriftMonitor:
    """The slow-drift warning on the logged data-sample energy gap ``cd`` = mean E(x_data) − E(x_model).

    The explosion check of `DivergenceDetector` fires on sudden jumps (100× the running gap); a gap that opens over
    thousands of iterations while the classifier stays healthy slips past it, and that is what a collapsing replay
    buffer looks like (the samples stop reaching the data's energy). `check` returns a message when |cd| exceeds the
    level, after which the level doubles, so a run gets a few warnings, not one per log line. The monitor is armed
    only once the gap has been at or below the level: a gap that starts large and closes (short-run chains from
    noise early in training) is not a drift. A level of 0 turns it off.
    """

    def __init__(self, level: float) -> None:
        self.level = float(level)
        self.armed = False

    def check(self, cd: float) -> str | None:
        if self.level <= 0 or not math.isfinite(cd):
            return None
        if abs(cd) <= self.level:
            self.armed = True
            return None
        if not self.armed:
            return None
        message = (
            f"the data-sample energy gap is {cd:+.3g} (|gap| > {self.level:g}; healthy default and jempp runs stay "
            f"below 0.3): the replay-buffer samples may be collapsing while the classifier looks fine; keep a "
            f"checkpoint from before the gap opened (recovery.gap_warning sets this level, 0 turns the warning off)"
        )
        self.level = 2 * abs(cd)
        return message


def _average(average: float | None, value: float, decay: float) -> float:
    return value if average is None else decay * average + (1 - decay) * value


def gradient_norm(parameters: list[torch.nn.Parameter], clip: float | None = None) -> float:
    """Global L2 norm of the parameter gradients (before clipping); clips them to `clip` when given."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return 0.0
    if clip is not None:
        return float(torch.nn.utils.clip_grad_norm_(parameters, clip))
    total_norm = getattr(torch.nn.utils, "get_total_norm", None)  # torch >= 2.6: one fused reduction
    if total_norm is not None:
        return float(total_norm(grads))
    return float(torch.linalg.vector_norm(torch.stack([g.detach().float().norm() for g in grads])))


# --- the recovery policy ---------------------------------------------------------------------------------------


def apply_policy(config: Config, policy: RecoveryConfig, uses_sampler: bool) -> dict[str, list[Any]]:
    """Change `config` in place the way the recovery policy says; return ``{key: [old, new]}`` of what changed.

    The changes are those JEM users make by hand after a divergence: a lower learning rate, longer SGLD chains
    (capped at `max_sgld_steps`), optionally a smaller SGLD step, and a stronger energy L2 (the course code's
    regulariser, which keeps energies near 0). Sampler settings are only touched when the run draws samples.
    """
    changes: dict[str, list[Any]] = {}

    def change(section: str, name: str, value: Any) -> None:
        target = getattr(config, section)
        old = getattr(target, name)
        if value != old:
            setattr(target, name, value)
            changes[f"{section}.{name}"] = [old, value]

    change("optim", "lr", config.optim.lr * policy.lr_factor)
    if uses_sampler:
        steps = config.sampler.steps
        change("sampler", "steps", max(steps, min(math.ceil(steps * policy.sgld_steps_factor), policy.max_sgld_steps)))
        change("sampler", "step_size", config.sampler.step_size * policy.sgld_step_size_factor)
        l2 = config.objective.energy_l2
        change("objective", "energy_l2", max(l2 * policy.energy_l2_factor, policy.min_energy_l2, l2))
    return changes


def reset_buffer_fraction(buffer: ReplayBuffer, fraction: float, generator: torch.Generator) -> int:
    """Restart a random `fraction` of the buffer's chains from the initialiser; return how many.

    Chains that drifted into a region where the energy is broken would otherwise feed it back every iteration.
    """
    n = round(fraction * len(buffer))
    if n <= 0:
        return 0
    slots = torch.randperm(len(buffer), generator=generator)[:n]
    labels = buffer.slot_labels()
    buffer.images[slots] = buffer.init(n, None if labels is None else labels[slots], generator).to(buffer.images)
    return n


def clone_state(state: Any) -> Any:
    """Deep copy of a nested state dict in which every tensor is cloned (state_dicts share the live tensors)."""
    if isinstance(state, torch.Tensor):
        return state.detach().clone()
    if isinstance(state, Mapping):
        return {k: clone_state(v) for k, v in state.items()}
    if isinstance(state, list):
        return [clone_state(v) for v in state]
    if isinstance(state, tuple):
        return tuple(clone_state(v) for v in state)
    return state


@dataclass
class Snapshot:
    """A healthy state to roll back to: the trainer's full state dict at iteration `step`."""

    step: int
    state: dict[str, Any]
    detector: dict[str, Any]


class Recovery:
    """Healthy snapshots and the recovery policy of one training run.

    Args:
        config: the run's config; the policy changes it in place, so checkpoints save the changed values and a
            resumed run continues with them.
    """

    def __init__(self, config: Config, num_classes: int | None = None) -> None:
        self.config = config
        self.policy = config.recovery
        self.detector = DivergenceDetector.from_config(config, num_classes)
        self.snapshot: Snapshot | None = None
        self.snapshot_due = False  # a snapshot was skipped while the detector was suspicious: try each iteration
        self.history: list[dict[str, Any]] = []  # one event per recovery, as logged

    @property
    def recoveries(self) -> int:
        return len(self.history)

    def take_snapshot(self, trainer: Trainer, force: bool = False) -> bool:
        """Copy the trainer's state (a healthy one: call it only between iterations that passed every check).

        Skipped (returns False) while the detector suspects a classifier collapse, unless `force`.
        """
        if self.detector.suspect and not force:
            self.snapshot_due = True
            return False
        self.snapshot_due = False
        self.snapshot = Snapshot(trainer.step, clone_state(trainer.state_dict()), self.detector.state_dict())
        return True

    def restore_snapshot(self, trainer: Trainer) -> int:
        """Put the trainer back into the snapshot's state exactly; return the snapshot's iteration."""
        if self.snapshot is None:
            raise DivergenceError("no healthy state to roll back to; resume from the last checkpoint with --resume")
        # Clone again: the optimizer and the batcher adopt the tensors they are given, and the snapshot must stay
        # intact for a second rollback.
        trainer.load_state_dict(clone_state(self.snapshot.state))
        trainer.step = self.snapshot.step
        self.detector.load_state_dict(self.snapshot.detector)
        return self.snapshot.step

    def recover(self, trainer: Trainer, signal: DivergenceSignal) -> dict[str, Any]:
        """Roll back and apply the policy, or give up.

        Returns:
            The event to log: ``event`` is ``"recovery"`` (training goes on from ``rollback_to``) or ``"diverged"``
            (recovery is off or out of retries; the trainer holds the last healthy state and ``error`` is the
            one-line message to stop with).
        """
        rollback_to = self.restore_snapshot(trainer)
        event: dict[str, Any] = {
            "event": "recovery",
            "step": signal.step,
            "reason": signal.reason,
            "detail": signal.detail,
            "rollback_to": rollback_to,
            "attempt": self.recoveries + 1,
        }
        if not self.policy.enabled or self.recoveries >= self.policy.max_retries:
            event["event"] = "diverged"
            event.pop("attempt")
            event["recoveries"] = self.recoveries
            event["error"] = self._give_up_message(signal)
            return event

        uses_sampler = trainer.weights.px > 0 or trainer.weights.pxy > 0
        changes = apply_policy(self.config, self.policy, uses_sampler)
        trainer.weights.energy_l2 = self.config.objective.energy_l2
        if uses_sampler and self.policy.reseed_chains:
            # A new, recorded seed for the chains: the buffer draws and the Langevin noise take another path.
            # Per rank with several processes (base * world + rank), so the ranks' chains stay independent.
            seed = self.config.train.seed + 1_000_003 * (self.recoveries + 1)
            trainer.cpu_generator.manual_seed(trainer.dist.seed(seed))
            trainer.noise_generator.manual_seed(trainer.dist.seed(seed + 1))
            changes["chain_seed"] = [None, seed]
        if trainer.buffer is not None and self.policy.buffer_reset_fraction > 0:
            n = reset_buffer_fraction(trainer.buffer, self.policy.buffer_reset_fraction, trainer.cpu_generator)
            changes["buffer_chains_restarted"] = [0, n]
        event["changes"] = changes
        self.history.append(event)
        return event

    def _give_up_message(self, signal: DivergenceSignal) -> str:
        if not self.policy.enabled:
            return (
                f"training diverged: {signal.describe()}; automatic recovery is off (recovery.enabled=false): "
                f"resume from the last checkpoint with --resume and a lower optim.lr or sampler.step_size, or a "
                f"higher objective.energy_l2, or turn recovery on"
            )
        o, s = self.config.optim, self.config.sampler
        return (
            f"training diverged: {signal.describe()}, and {self.recoveries} automatic recoveries did not help "
            f"(now optim.lr={o.lr:.3g}, sampler.steps={s.steps}, sampler.step_size={s.step_size:.3g}, "
            f"objective.energy_l2={self.config.objective.energy_l2:.3g}); the last healthy state is saved: resume "
            f"with --resume and a much lower --set optim.lr=... or sampler.step_size=..., or raise "
            f"recovery.max_retries"
        )

    def state_dict(self) -> dict[str, Any]:
        """JSON for the checkpoint metadata: the detector's averages and the recoveries so far."""
        return {"detector": self.detector.state_dict(), "history": self.history}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.detector.load_state_dict(state["detector"])
        self.history = list(state["history"])


# --- signals ---------------------------------------------------------------------------------------------------


class StopRequest:
    """Within its ``with`` block, SIGTERM and a first Ctrl-C (SIGINT) only set `reason`; the training loop checks
    it between iterations, saves a consistent state and returns. A second Ctrl-C raises KeyboardInterrupt at once.
    The previous handlers come back on exit. Outside the main thread (where Python allows no handlers) it does
    nothing."""

    def __init__(self) -> None:
        self.reason: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.reason = "terminated" if signum == signal.SIGTERM else "interrupted"
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)

    def __exit__(self, *exc: object) -> None:
        for signum, previous in self._previous.items():
            # None: the previous handler was not installed from Python; the default is the closest equivalent.
            signal.signal(signum, signal.SIG_DFL if previous is None else previous)
        self._previous.clear()


# --- metrics.jsonl on resume -----------------------------------------------------------------------------------


def trim_metrics(path: Path, keep_lines: int | None, last_step: int) -> int:
    """Cut ``metrics.jsonl`` back to what it held when the checkpoint being resumed was written.

    A run killed after its last checkpoint logged iterations that the resumed run will log again; without the cut
    they would appear twice. `keep_lines` (recorded in the checkpoint) is exact; older checkpoints fall back to
    keeping the records up to `last_step`. A line cut off by the kill is dropped either way.

    Returns:
        The number of lines removed.
    """
    if not path.is_file():
        return 0
    lines = path.read_text(errors="replace").splitlines()
    kept = []
    for index, line in enumerate(lines):
        if keep_lines is not None and index >= keep_lines:
            break
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if keep_lines is None and isinstance(record, dict) and _step_of(record) > last_step:
            continue
        kept.append(line)
    if len(kept) == len(lines):
        return 0
    from jemlab.training.checkpoint import atomic_write_bytes

    atomic_write_bytes(path, "".join(line + "\n" for line in kept).encode())
    return len(lines) - len(kept)


def _step_of(record: dict[str, Any]) -> float:
    try:
        return float(record.get("step", 0))
    except (TypeError, ValueError):
        return 0.0
