"""A healthy state to roll back to, kept in memory: a deep copy of the trainer's state dict at one iteration."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch


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
