"""`train`: a config (or a preset and overrides) → a trained `Model`, with a callback for progress.

The same Trainer as ``jemlab train``: same config resolution and validation, same run directory, checkpoints and
metrics; the callback receives the records that go to ``metrics.jsonl``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from jemlab.api.model import Model, load
from jemlab.config import Config, build_config, set_value, validate_config
from jemlab.errors import ConfigError
from jemlab.run import LoadedRun

Overrides = Mapping[str, Any] | Iterable[tuple[str, Any]]


def train(
    config_or_preset: Config | str = "default",
    run_dir: str | Path | None = None,
    overrides: Overrides | None = None,
    callback: Callable[[dict[str, Any]], None] | None = None,
) -> Model:
    """Train a model and return it, ready to use.

    Args:
        config_or_preset: a preset name (``jemlab presets`` lists them: "default", "jempp", "egc", ...) or a
            config object (from build_config in jemlab.config, or `Model.config` of an earlier run).
        run_dir: where to write the run (config.json, metrics.jsonl, train.log, checkpoints, sample grids), as
            ``jemlab train --run-dir``; a folder that already holds a run is refused. None: nothing is written
            and the model stays in memory.
        overrides: dotted config keys and values applied on top, as ``jemlab train --set``, e.g.
            ``{"train.minutes": 2, "data.dataset": "mnist"}`` (unknown keys and bad values are one-line errors).
        callback: called with every metrics record as it is logged, a dict such as ``{"step": 50, "epoch": 0.1,
            "loss": 0.92, "ce": 0.81, "train_accuracy": 0.74, "it_per_s": 9.8, ...}``; once per epoch with
            ``val_accuracy`` and ``val_nll``; at the end with ``test_accuracy`` and ``test_nll``; and records with an
            ``"event"`` key for warnings and divergence recoveries. Every ``train.log_every`` steps.

    Returns:
        The trained model (EGC runs: their EMA weights), loaded from the run's final checkpoint when there is a
        run_dir.

    Example:
        >>> import jemlab
        >>> model = jemlab.train("default", "runs/quick", {"train.minutes": 2},
        ...                      callback=lambda r: print(r["step"], r.get("loss")))
        >>> model.predict(images)
    """
    config = _resolve(config_or_preset, overrides)
    if run_dir is not None and (Path(run_dir) / "checkpoints" / "latest").exists():
        raise ConfigError(f"{run_dir} already holds a run; choose another run_dir or continue it with --resume")

    from jemlab import distributed
    from jemlab.training.loop import Trainer  # only here: loading a model for inference never imports the trainer

    try:
        trainer = Trainer(config, run_dir)
        trainer.fit(callback=callback)
    finally:
        distributed.shutdown()
    if run_dir is not None:
        return load(run_dir, device=str(trainer.device))
    model = trainer.eval_model.eval()
    splits = trainer.splits
    return Model(
        LoadedRun(
            model=model,
            config=trainer.config,
            buffer=trainer.buffer,
            device=trainer.device,
            init=trainer.init,
            image_shape=tuple(splits.image_shape),  # type: ignore[arg-type]
            num_classes=splits.num_classes,
            class_names=list(splits.class_names),
            path=None,
        )
    )


def _resolve(config_or_preset: Config | str, overrides: Overrides | None) -> Config:
    """The preset (or a copy of the config) with the overrides applied, validated."""
    pairs = list(overrides.items()) if isinstance(overrides, Mapping) else list(overrides or [])
    for pair in pairs:
        if not (isinstance(pair, tuple) and len(pair) == 2 and isinstance(pair[0], str)):
            raise ConfigError(f"overrides must be a dict or (key, value) pairs like ('train.epochs', 3), got {pair!r}")
    if isinstance(config_or_preset, str):
        return build_config(config_or_preset, pairs)
    if not isinstance(config_or_preset, Config):
        kind = type(config_or_preset).__name__
        raise ConfigError(f"config_or_preset must be a preset name or a Config, got {kind}")
    config = copy.deepcopy(config_or_preset)  # the caller's config stays as it was
    for key, value in pairs:
        set_value(config, key, value)
    validate_config(config)
    return config
