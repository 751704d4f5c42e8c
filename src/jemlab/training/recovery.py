"""Automatic recovery from a divergence: the JEM you can leave running.

JEM users restart a diverged run by hand from the last checkpoint with a new seed or a lower learning rate. This
module decides the same, by itself (the detectors that name a divergence are in training/divergence.py):

- `Recovery` keeps the last healthy state in memory (`Snapshot`: model, optimizer, replay buffer, batcher, every
  random generator, the detector's running statistics) — one every `recovery.snapshot_every` iterations and one at
  every checkpoint, which is its copy on disk. A slow drift (the energy gap opening, the tracked sample quality
  falling: `DRIFT_REASONS`) may already be in that snapshot, so it rolls back further, to the `anchor`: the state
  at the last sample-quality measurement that found the samples healthy (without tracking, the last snapshot).
- On divergence, `Recovery.recover` returns a `RecoveryPlan`: the snapshot to roll back to and, unless recovery is
  off or out of retries, what changes from then on — a new config made by the policy (`apply_policy`: lower
  learning rate, more SGLD steps, stronger energy L2), a new seed for the chains, and how many buffer chains to
  restart. The trainer applies it and training goes on; after `recovery.max_retries` recoveries the plan gives up
  with one clear error, the healthy state saved.

Every recovery is a line of the run's ``metrics.jsonl`` (``event: "recovery"``, the reason, the changes applied)
and is counted in ``metrics.json`` (``recoveries``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from jemlab.config import Config, RecoveryConfig
from jemlab.errors import DivergenceError
from jemlab.training.divergence import DRIFT_REASONS, DivergenceDetector, DivergenceSignal
from jemlab.training.snapshot import Snapshot, clone_state

if TYPE_CHECKING:
    from jemlab.samplers import ReplayBuffer


# --- the recovery policy ---------------------------------------------------------------------------------------


def apply_policy(config: Config, policy: RecoveryConfig, uses_sampler: bool) -> tuple[Config, dict[str, list[Any]]]:
    """The config after a recovery, as the policy says, and ``{key: [old, new]}`` of what changed.

    `config` itself is left as it is (the sections that change are copied with `dataclasses.replace`). The changes
    are those JEM users make by hand after a divergence: a lower learning rate, longer SGLD chains (capped at
    `max_sgld_steps`), optionally a smaller SGLD step, and a stronger energy L2 (the course code's regulariser, which
    keeps energies near 0). Sampler settings are only touched when the run draws samples.
    """
    updates: dict[str, dict[str, Any]] = {}
    changes: dict[str, list[Any]] = {}

    def change(section: str, name: str, value: Any) -> None:
        old = getattr(getattr(config, section), name)
        if value != old:
            updates.setdefault(section, {})[name] = value
            changes[f"{section}.{name}"] = [old, value]

    change("optim", "lr", config.optim.lr * policy.lr_factor)
    if uses_sampler:
        steps = config.sampler.steps
        change("sampler", "steps", max(steps, min(math.ceil(steps * policy.sgld_steps_factor), policy.max_sgld_steps)))
        change("sampler", "step_size", config.sampler.step_size * policy.sgld_step_size_factor)
        l2 = config.objective.energy_l2
        change("objective", "energy_l2", max(l2 * policy.energy_l2_factor, policy.min_energy_l2, l2))
    sections = {name: dataclasses.replace(getattr(config, name), **values) for name, values in updates.items()}
    return dataclasses.replace(config, **sections), changes


def restart_chains(buffer: ReplayBuffer, n: int, generator: torch.Generator) -> None:
    """Restart `n` random chains of the buffer from the initialiser.

    Chains that drifted into a region where the energy is broken would otherwise feed it back every iteration.
    """
    if n <= 0:
        return
    slots = torch.randperm(len(buffer), generator=generator)[:n]
    labels = buffer.slot_labels()
    buffer.images[slots] = buffer.init(n, None if labels is None else labels[slots], generator).to(buffer.images)


@dataclass(frozen=True)
class RecoveryPlan:
    """What the trainer does after a divergence.

    Attributes:
        event: the record to log (``event`` is ``"recovery"``, or ``"diverged"`` with the one-line ``error``).
        step: the iteration of the healthy snapshot to roll back to.
        state: a fresh copy of the snapshot's trainer state (the trainer may adopt its tensors).
        config: the run's config from now on; None when recovery gives up (the run stops from the snapshot).
        chain_seed: new seed of the chains' random generators (None: keep them as restored).
        restart_chains: replay-buffer chains to restart from the initialiser, drawn with the chain generator.
    """

    event: dict[str, Any]
    step: int
    state: dict[str, Any]
    config: Config | None = None
    chain_seed: int | None = None
    restart_chains: int = 0


class Recovery:
    """Healthy snapshots, the divergence detector and the recovery history of one training run.

    Args:
        config: the run's config (its detectors and ``recovery`` policy are read here; the config is not kept).
        num_classes: C, for the classifier-collapse check.
    """

    def __init__(self, config: Config, num_classes: int | None = None) -> None:
        self.policy = config.recovery
        self.detector = DivergenceDetector.from_config(config, num_classes)
        self.snapshot: Snapshot | None = None
        # The last state whose samples were measured healthy (energy gap well below its drift level, tracked sample
        # quality near its best): where a slow drift rolls back to. It is older than `snapshot` by design.
        self.anchor: Snapshot | None = None
        self.snapshot_due = False  # a snapshot was skipped while the detector was suspicious: try each iteration
        self.history: list[dict[str, Any]] = []  # one event per recovery, as logged

    @property
    def recoveries(self) -> int:
        return len(self.history)

    def take_snapshot(self, step: int, state: Callable[[], dict[str, Any]], force: bool = False) -> bool:
        """Copy the trainer's state (a healthy one: call it only between iterations that passed every check).

        Skipped (returns False) while the detector suspects a classifier collapse, unless `force`.

        Args:
            step: the trainer's iteration.
            state: returns the trainer's state dict (called only when a snapshot is taken).
            force: take it even while the detector is suspicious.
        """
        if self.detector.suspect and not force:
            self.snapshot_due = True
            return False
        self.snapshot_due = False
        self.snapshot = Snapshot(step, clone_state(state()), self.detector.state_dict())
        return True

    def take_anchor(self, step: int, state: Callable[[], dict[str, Any]]) -> None:
        """Keep the trainer's state as the one a slow drift rolls back to (call it when the samples measure healthy)."""
        self.anchor = Snapshot(step, clone_state(state()), self.detector.state_dict())

    def can_recover(self) -> bool:
        """Recovery is on and has retries left."""
        return self.policy.enabled and self.recoveries < self.policy.max_retries

    def restore_snapshot(self, drift: bool = False) -> tuple[int, dict[str, Any]]:
        """Put the detector back into its snapshot state; return the snapshot's iteration and trainer state.

        With `drift`, the anchor (when there is one) is restored instead, and it becomes the snapshot too, so that a
        sudden divergence soon after does not roll forward into the drifted state.
        """
        if drift and self.anchor is not None:
            self.snapshot = self.anchor
        if self.snapshot is None:
            raise DivergenceError("no healthy state to roll back to; resume from the last checkpoint with --resume")
        self.detector.load_state_dict(self.snapshot.detector)
        # Clone again: the optimizer and the batcher adopt the tensors they are given, and the snapshot must stay
        # intact for a second rollback.
        return self.snapshot.step, clone_state(self.snapshot.state)

    def recover(
        self, signal: DivergenceSignal, config: Config, *, uses_sampler: bool, buffer_chains: int | None
    ) -> RecoveryPlan:
        """Plan the rollback and the policy's changes, or give up.

        Args:
            signal: what the detector found.
            config: the run's config now (the policy starts from it; it is not changed).
            uses_sampler: the run draws SGLD samples (p(x) or p(x|y) terms): sampler settings and chains change.
            buffer_chains: chains in this process's replay buffer (None: no buffer).

        Returns:
            The plan; its ``event`` is ``"recovery"`` (training goes on from ``rollback_to``) or ``"diverged"``
            (recovery is off or out of retries; ``error`` is the one-line message to stop with).
        """
        rollback_to, state = self.restore_snapshot(drift=signal.reason in DRIFT_REASONS)
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
            event["error"] = self._give_up_message(signal, config)
            return RecoveryPlan(event, rollback_to, state)

        new_config, changes = apply_policy(config, self.policy, uses_sampler)
        chain_seed = None
        if uses_sampler and self.policy.reseed_chains:
            # A new, recorded seed for the chains: the buffer draws and the Langevin noise take another path.
            chain_seed = config.train.seed + 1_000_003 * (self.recoveries + 1)
            changes["chain_seed"] = [None, chain_seed]
        restart = 0
        if buffer_chains is not None and self.policy.buffer_reset_fraction > 0:
            restart = round(self.policy.buffer_reset_fraction * buffer_chains)
            changes["buffer_chains_restarted"] = [0, restart]
        event["changes"] = changes
        self.history.append(event)
        return RecoveryPlan(event, rollback_to, state, new_config, chain_seed, restart)

    def _give_up_message(self, signal: DivergenceSignal, config: Config) -> str:
        if not self.policy.enabled:
            return (
                f"training diverged: {signal.describe()}; automatic recovery is off (recovery.enabled=false): "
                f"resume from the last checkpoint with --resume and a lower optim.lr or sampler.step_size, or a "
                f"higher objective.energy_l2, or turn recovery on"
            )
        o, s = config.optim, config.sampler
        return (
            f"training diverged: {signal.describe()}, and {self.recoveries} automatic recoveries did not help "
            f"(now optim.lr={o.lr:.3g}, sampler.steps={s.steps}, sampler.step_size={s.step_size:.3g}, "
            f"objective.energy_l2={config.objective.energy_l2:.3g}); the last healthy state is saved: resume "
            f"with --resume and a much lower --set optim.lr=... or sampler.step_size=..., or raise "
            f"recovery.max_retries"
        )

    def state_dict(self) -> dict[str, Any]:
        """JSON for the checkpoint metadata: the detector's averages and the recoveries so far."""
        return {"detector": self.detector.state_dict(), "history": self.history}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.detector.load_state_dict(state["detector"])
        self.history = list(state["history"])
