"""Exponential moving average of model weights (Polyak averaging), as diffusion models are evaluated."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn


class EMA:
    """A frozen copy of a model whose weights track the live ones: w_ema ← d·w_ema + (1 − d)·w.

    Args:
        model: the model being trained (copied once here).
        decay: d, e.g. 0.9999 (EGC) or 0.999 for runs of a few thousand steps.
        warmup: use d_n = min(decay, (1 + n)/(10 + n)) after n updates, so that the average forgets the random
            initialisation quickly in short runs.
    """

    def __init__(self, model: nn.Module, decay: float, warmup: bool = True) -> None:
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.decay = decay
        self.warmup = warmup
        self.updates = 0

    def current_decay(self) -> float:
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the average towards `model`'s current weights (buffers are copied)."""
        self.updates += 1
        decay = self.current_decay()
        for averaged, live in zip(self.model.parameters(), model.parameters(), strict=True):
            averaged.lerp_(live.detach(), 1 - decay)
        for averaged, live in zip(self.model.buffers(), model.buffers(), strict=True):
            averaged.copy_(live)

    def state_dict(self) -> dict[str, Any]:
        return {"weights": self.model.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["weights"])
        self.updates = int(state["updates"])
