"""Loading a trained run back: model, config, replay buffer and dataset facts from one checkpoint."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from jemlab.config import Config, config_from_dict
from jemlab.device import resolve_device
from jemlab.errors import CheckpointError
from jemlab.models import EnergyModel, build_model
from jemlab.samplers import ReplayBuffer
from jemlab.samplers.init import Initializer, initializer_from_config
from jemlab.training.checkpoint import load_checkpoint, resolve_checkpoint


@dataclass
class LoadedRun:
    """A trained model ready for sampling and evaluation (satisfies generate.SamplingSource)."""

    model: EnergyModel
    config: Config
    buffer: ReplayBuffer | None
    device: torch.device
    init: Initializer
    image_shape: tuple[int, int, int]
    num_classes: int
    class_names: list[str]
    path: Path | None  # the checkpoint file; None for a model trained in memory (`jemlab.train` without run_dir)
    meta: dict[str, Any] = field(default_factory=dict)


def load_run(path: str | Path, device: str = "auto") -> LoadedRun:
    """Load a checkpoint file or run directory for inference.

    Args:
        path: a ``step-*.safetensors`` file, a run directory or its ``checkpoints`` folder.
        device: "auto", "cpu" or "cuda[:N]".

    Returns:
        The model in eval mode with its config and buffer.
    """
    file = resolve_checkpoint(path)
    state, meta = load_checkpoint(file)
    try:
        config = config_from_dict(meta["config"])
        dataset = meta["dataset"]
        image_shape = tuple(int(v) for v in dataset["image_shape"])
        num_classes = int(dataset["num_classes"])
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{file}: checkpoint metadata lacks {err}; it was not written by jemlab train") from None
    dev = resolve_device(device)
    model = build_model(config.model.name, image_shape, num_classes, config.model.energy_head, config.model.options)
    try:
        # EGC runs are evaluated and sampled with their EMA weights (kept next to the live ones).
        weights = state["egc"]["ema"]["weights"] if isinstance(state.get("egc"), dict) else state["model"]
        model.load_state_dict(weights)
    except (RuntimeError, KeyError) as err:
        raise CheckpointError(f"{file}: weights do not match the model in its config ({err})") from None
    model = model.to(dev).eval()
    if config.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    init = initializer_from_config(config.sampler, image_shape, num_classes=num_classes, state=state.get("init"))
    buffer = None
    if state.get("buffer") is not None:
        s = config.sampler
        buffer = ReplayBuffer(
            s.buffer_size,
            image_shape,
            init,
            reinit_prob=s.reinit_prob,
            mode=s.buffer_mode,
            num_classes=num_classes,
            class_conditional=s.class_conditional,
            initial_size=1,
        )
        buffer.load_state_dict(state["buffer"])
    return LoadedRun(
        model=model,
        config=config,
        buffer=buffer,
        device=dev,
        init=init,
        image_shape=image_shape,  # type: ignore[arg-type]
        num_classes=num_classes,
        class_names=list(dataset.get("class_names", [str(i) for i in range(num_classes)])),
        path=file,
        meta=meta,
    )
