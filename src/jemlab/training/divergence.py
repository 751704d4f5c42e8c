"""Divergence detection: what can go wrong in a JEM training iteration, and the checks that name it.

JEM training diverges often: the energies of data and samples drift apart, the loss explodes and turns into NaN
within a few iterations (Grathwohl et al., 2020, list the instability among JEM's limitations; their code divides
by zero on purpose). `DivergenceDetector` watches the diagnostics every iteration already computes and names what
went wrong (`REASONS`). Every check runs *before* the optimizer step, so a bad update never reaches the weights;
`raise_if_diverged` turns a finding into the `DivergenceDetected` error that the training loop recovers from
(training/recovery.py).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from jemlab.config import Config
from jemlab.errors import DivergenceError

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
    # Slow drifts (training/gap_drift.py, training/quality.py): found between iterations, rolled back further.
    "energy_gap_drift": "the data-sample energy gap opened slowly past recovery.gap_warning",
    "sample_quality_drop": "the tracked Fréchet distance of the samples rose past recovery.quality_drop x its best",
}

#: The reasons that name a slow drift rather than a sudden divergence: the rollback goes to the last state whose
#: samples were measured healthy (`Recovery.anchor`), not to the last snapshot, which the drift may already hold.
DRIFT_REASONS = ("energy_gap_drift", "sample_quality_drop")


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


def raise_if_diverged(signal: DivergenceSignal | None) -> None:
    """Raise `DivergenceDetected` for a detector's finding (None: healthy, nothing happens)."""
    if signal is not None:
        raise DivergenceDetected(signal)


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


def _average(average: float | None, value: float, decay: float) -> float:
    return value if average is None else decay * average + (1 - decay) * value
