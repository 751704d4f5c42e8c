"""The training loop: the only place that knows the data, the model, the sampler and the objective at once.

`Trainer.fit` reads top to bottom in stages: set-up, resume, then per iteration (batch → negatives → loss → step →
log), per epoch (validate → samples → checkpoint), and the end (final checkpoint, test metrics, sample grids).
The other modules of this package each hold one part and never see the Trainer: they take what they work on as
arguments and return what changes (the recovery plan, this rank's checkpoint state, an EGC step's statistics).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from jemlab import distributed
from jemlab.accel import AUTOCAST_DTYPES, Choice
from jemlab.allocator import allocator_status
from jemlab.config import Config, validate_config
from jemlab.data import ArrayDataset, DatasetSplits, load_dataset
from jemlab.data.augment import augment
from jemlab.data.labelled import LabelledBatcher, labelled_subset, px_pool
from jemlab.errors import CheckpointError, DivergenceError
from jemlab.generate import generate
from jemlab.images import save_grid
from jemlab.models import EnergyModel, build_model
from jemlab.objectives import JEMWeights, jem_loss
from jemlab.provenance import git_sha
from jemlab.samplers import ReplayBuffer
from jemlab.samplers.buffer_shards import shard_capacity
from jemlab.samplers.init import initializer_from_config, initializer_state
from jemlab.sampling import run_chains
from jemlab.training.checkpoint import (
    BEST_SAMPLES,
    atomic_write_bytes,
    load_checkpoint,
    remove_stale_temporaries,
    resolve_checkpoint,
    save_checkpoint,
    save_run_checkpoint,
)
from jemlab.training.choices import hardware_record, header_lines, run_choices
from jemlab.training.distributed_state import checkpoint_state, local_state
from jemlab.training.divergence import DivergenceDetected, DivergenceSignal, raise_if_diverged
from jemlab.training.egc import EGCTraining
from jemlab.training.evaluate import evaluate_split
from jemlab.training.gap_drift import GapDriftMonitor
from jemlab.training.logging import MetricsWriter, progress_bar, setup_logger
from jemlab.training.metrics_file import count_lines, lines_at_checkpoint, trim_metrics
from jemlab.training.optim import build_optimizer, gradient_norm, learning_rate, set_learning_rate
from jemlab.training.quality import QualityTracker
from jemlab.training.quality_plot import plot_quality
from jemlab.training.recovery import Recovery, RecoveryPlan, restart_chains
from jemlab.training.stop_request import StopRequest


class Trainer:
    """Trains one energy model from a config; holds everything a checkpoint must capture.

    Args:
        config: the resolved, validated config.
        run_dir: folder for config.json, metrics, logs, checkpoints and sample grids (None: keep nothing on disk).
        splits: the dataset (loaded from `config.data` when None).
    """

    def __init__(self, config: Config, run_dir: str | Path | None, splits: DatasetSplits | None = None):
        validate_config(config)
        self.config = config  # replaced (never edited) when a recovery changes settings; checkpoints save it
        self.run_dir = Path(run_dir) if run_dir is not None else None
        t = config.train
        if t.threads is not None:
            torch.set_num_threads(t.threads)
        # One process or one of N under torchrun (distributed.py): rank, world size, this rank's device.
        self.dist = distributed.init_distributed(t.device)
        self.device = self.dist.device
        torch.manual_seed(t.seed)  # model initialisation (the same on every rank)

        # Data: held in memory, batched by index with the batcher's own generator.
        self.splits = splits or _load_splits(config)
        # Few labels (data.labels_per_class; docs/semi_supervised.md): log p(y|x) on a seeded class-balanced
        # labelled subset, log p(x) on every training image (plus unlabelled ones). None: one batch serves both.
        self.labelled_index, self.labelled, px_data = self._split_labels()
        # One shuffle shared by all ranks; each takes its block of batch_size images from every global batch. It
        # drives the epochs; in semi-supervised runs it gives the log p(x) batch, `self.labelled` the CE batch.
        self.batcher = distributed.RankBatcher(px_data, t.batch_size, seed=t.seed, env=self.dist)

        # Network and optimizer.
        self.model: EnergyModel = _build_network(config, self.splits, self.device)
        self.optimizer = build_optimizer(self.model, config)
        # The training loss runs through DDP with several processes (one gradient all-reduce per step); sampling,
        # evaluation and samples use self.model directly.
        self.loss_model = distributed.wrap_for_loss(self.model, self.dist)
        # Precision and SGLD gradient path as this device allows (jemlab.accel): resolved once, logged with reasons.
        self.choices = run_choices(config, self.model, self.device)
        self.precision = self.choices.get("train.precision", Choice("fp32", "EGC runs use egc.precision")).value
        self.scaler = torch.amp.GradScaler(self.device.type) if self.precision == "fp16" else None
        if self.dist.active:
            torch.manual_seed(self.dist.seed(t.seed))  # per-rank global random stream after the shared init
        o = config.objective
        self.weights = JEMWeights(ce=o.ce, px=o.px, pxy=o.pxy, energy_l2=o.energy_l2)

        # Sampler state: the replay buffer (CPU) and two random sources, one for buffer draws and one for the
        # Langevin and input noise on the training device. Each is seeded from the run seed.
        self.cpu_generator = torch.Generator().manual_seed(self.dist.seed(t.seed + 1))
        self.noise_generator = torch.Generator(device=self.device).manual_seed(self.dist.seed(t.seed + 2))
        # The chain initialiser; a data-fitted one (JEM++ class Gaussians) is fitted here and saved in checkpoints.
        # Its class Gaussians need labels: with few labels they are fitted on the labelled images only.
        labelled_data = self.splits.train if self.labelled is None else self.splits.train.subset(self.labelled_index)
        self.init = initializer_from_config(
            config.sampler, self.splits.image_shape, data=labelled_data, num_classes=self.splits.num_classes
        )
        self.buffer: ReplayBuffer | None = self._build_buffer()

        # EGC (SPEC S5, objective.name=egc): its loss step and EMA weights live in training/egc.py.
        self.egc = EGCTraining(config, self.model) if o.name == "egc" else None

        self.step = 0
        self.elapsed = 0.0  # training seconds, carried over on resume

        # Divergence watch (recovery.py): detectors on the live diagnostics, the last healthy state in memory, and
        # the recovery policy, whose plan (a new config among it) `_recover` applies.
        self.recovery = Recovery(config, self.splits.num_classes)
        # Sample quality tracked every quality.every iterations (training/quality.py); the best Fréchet distance so
        # far (checkpoints/best-samples.safetensors holds that state) and the last logged energy gap.
        self.quality = QualityTracker(config, self.splits, self.device, logging.getLogger("jemlab"))
        self.best_fd = math.inf
        self.best_fd_step: int | None = None
        self._last_cd: float | None = None
        self._last_quality: dict[int, dict[str, float]] = {}  # {step: the last measurement}
        self._quality_prepared = False
        self.metrics_lines = 0  # lines of run_dir/metrics.jsonl written so far (recorded in checkpoints)
        self._writer: MetricsWriter | None = None  # metrics.jsonl while `fit` runs (rank 0 with a run_dir)
        self._callback: Callable[[dict[str, Any]], None] | None = None  # `fit`'s callback, while it runs
        self._log = logging.getLogger("jemlab")  # set up by `fit`

    def _split_labels(self) -> tuple[torch.Tensor, LabelledBatcher | None, ArrayDataset]:
        """The labelled images (indices into the training split), their batcher, and the log p(x) pool.

        With every label and no unlabelled images: all training images, no separate batcher, the training split.
        Otherwise the CE batch comes from a `LabelledBatcher` over the labelled images (the same stream on every
        rank, seeded with train.seed + 4) and the p(x) batch from the training split plus the unlabelled images.
        """
        t, n = self.config.train, self.config.data.labels_per_class
        train, pool = self.splits.train, px_pool(self.splits)
        if n is None and pool is train:  # every label, no unlabelled images: one batch serves both terms
            return torch.arange(len(train)), None, train
        index = (
            torch.arange(len(train))
            if n is None
            else labelled_subset(train.labels, n, self.splits.num_classes, t.seed, self.splits.class_names)
        )
        labelled = LabelledBatcher(
            train, index, t.batch_size, seed=t.seed + 4, rank=self.dist.rank, world_size=self.dist.world_size
        )
        return index, labelled, pool

    def _build_buffer(self) -> ReplayBuffer | None:
        """This rank's replay buffer when the run keeps persistent chains for p(x) or p(x|y), else None."""
        s, t = self.config.sampler, self.config.train
        if not (s.persistent and self.uses_sampler):
            return None
        return ReplayBuffer(
            shard_capacity(s.buffer_size, self.dist),  # this rank's shard (all of it with one process)
            self.splits.image_shape,
            self.init,
            reinit_prob=s.reinit_prob,
            mode=s.buffer_mode,
            num_classes=self.splits.num_classes,
            class_conditional=s.class_conditional,
            initial_size=s.batch_size or t.batch_size,
            generator=self.cpu_generator,
        )

    # --- state ---------------------------------------------------------------------------------------------------

    @property
    def eval_model(self) -> torch.nn.Module:
        """The weights to evaluate and sample with: the EMA for EGC, else the live model."""
        return self.model if self.egc is None else self.egc.ema.model

    @property
    def uses_sampler(self) -> bool:
        """The objective has a p(x) or p(x|y) term: the run draws SGLD samples."""
        return self.weights.px > 0 or self.weights.pxy > 0

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue the run exactly (this rank's part; `save` gathers all ranks')."""
        state = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "buffer": None if self.buffer is None else self.buffer.state_dict(),
            "init": initializer_state(self.init),
            "batcher": self.batcher.state_dict(),
            "rng": {
                "torch": torch.get_rng_state(),
                "cpu_generator": self.cpu_generator.get_state(),
                "noise_generator": self.noise_generator.get_state(),
            },
        }
        if self.labelled is not None:  # the CE batches' stream (the same on every rank, like the batcher)
            state["labelled_batcher"] = self.labelled.state_dict()
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        if self.egc is not None:
            state["egc"] = self.egc.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.buffer is not None and state.get("buffer") is not None:
            self.buffer.load_state_dict(state["buffer"])
        self.batcher.load_state_dict(state["batcher"])
        if self.labelled is not None:
            self.labelled.load_state_dict(state["labelled_batcher"])
        rng = state["rng"]
        torch.set_rng_state(rng["torch"])
        self.cpu_generator.set_state(rng["cpu_generator"])
        self.noise_generator.set_state(rng["noise_generator"])
        if self.scaler is not None and state.get("scaler") is not None:
            self.scaler.load_state_dict(state["scaler"])
        if self.egc is not None:
            self.egc.load_state_dict(state["egc"])

    def progress(self) -> dict[str, Any]:
        return {"step": self.step, "epoch": self.batcher.epoch, "elapsed_s": self.elapsed}

    def save(self) -> Path | None:
        """Write a checkpoint into the run directory (atomic; keeps the newest few)."""
        if self.run_dir is None:
            return None
        # With several processes: gathers every rank's buffer shard and generators (a collective).
        state = checkpoint_state(self.state_dict(), self.dist, self.buffer, self.config.sampler.buffer_size, self.step)
        if not self.dist.is_main:
            return None
        return save_run_checkpoint(
            self.run_dir,
            self.step,
            state,
            self._checkpoint_meta(),
            keep=self.config.train.keep_checkpoints,
        )

    def _checkpoint_meta(self) -> dict[str, Any]:
        meta = {"config": self.config.to_dict(), "progress": self.progress(), "git_sha": git_sha()}
        meta["world_size"] = self.dist.world_size
        meta["recovery"] = self.recovery.state_dict()
        meta["metrics_lines"] = self.metrics_lines
        best_fd = None if math.isinf(self.best_fd) else self.best_fd
        meta["quality"] = {"best_fd": best_fd, "best_step": self.best_fd_step}
        meta["dataset"] = {
            "name": self.splits.name,
            "image_shape": list(self.splits.image_shape),
            "num_classes": self.splits.num_classes,
            "class_names": list(self.splits.class_names),
        }
        return meta

    def save_best_samples(self, quality: dict[str, float]) -> Path | None:
        """Write checkpoints/best-samples.safetensors: this state, whose tracked sample quality is the best so far.

        A complete checkpoint (``jemlab sample/eval --checkpoint`` take it; ``--resume`` continues from `latest`).
        """
        if self.run_dir is None:
            return None
        state = checkpoint_state(self.state_dict(), self.dist, self.buffer, self.config.sampler.buffer_size, self.step)
        if not self.dist.is_main:
            return None
        meta = {**self._checkpoint_meta(), "best_samples": dict(quality)}
        return save_checkpoint(self.run_dir / "checkpoints" / BEST_SAMPLES, state, meta)

    def resume(self, path: str | Path) -> dict[str, Any]:
        """Load a checkpoint of this run (same config) and continue from its next iteration."""
        state, meta = load_checkpoint(path)
        try:
            # This rank's part, for any number of processes.
            state, step = local_state(
                state,
                meta,
                env=self.dist,
                buffer=self.buffer,
                batcher=self.batcher,
                seed=self.config.train.seed,
                device=self.device,
            )
            self.load_state_dict(state)
            progress = meta["progress"]
            self.step = step
            self.elapsed = float(progress["elapsed_s"])
            if "recovery" in meta:  # the detector's averages and past recoveries continue too
                self.recovery.load_state_dict(meta["recovery"])
            best = meta.get("quality") or {}
            if best.get("best_fd") is not None:
                self.best_fd, self.best_fd_step = float(best["best_fd"]), best.get("best_step")
        except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as err:
            # A checkpoint of another model or config, or a hand-made one: refuse it as a whole, in one line.
            first_line = str(err).strip().split("\n")[0][:200]
            raise CheckpointError(
                f"{path}: checkpoint does not fit this run ({type(err).__name__}: {first_line}); "
                f"resume with the run's own config (jemlab train --run-dir DIR --resume)"
            ) from None
        return meta

    # --- one iteration -------------------------------------------------------------------------------------------

    def negatives(self, n: int, labels: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        """Draw n SGLD samples of p(x), or of p(x|y) for the classes `labels`.

        Chains come from the replay buffer (persistent) when there is one that can serve them (any buffer for
        p(x), a class-partitioned one for p(x|y)) and are written back; otherwise they start from the initialiser
        (short-run) and are not kept.
        """
        cpu_labels = None if labels is None else labels.cpu()
        if self.buffer is not None and (labels is None or self.buffer.class_conditional):
            draw = self.buffer.sample(n, labels=cpu_labels, generator=self.cpu_generator)
            x_init = draw.x
        else:
            draw, x_init = None, self.init(n, cpu_labels, self.cpu_generator)
        x, stats = run_chains(
            self.model,
            x_init.to(self.device),
            self.config.sampler,
            labels=labels,
            generator=self.noise_generator,
            channels_last=self.config.train.channels_last,
        )
        if draw is not None:
            self.buffer.update(draw, x)
        steps = self.config.sampler.steps
        return x, {"sgld_grad_norm": stats.grad_norm, "sgld_steps": steps, "sgld_chain_steps": steps * n}

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The next iteration's data, as `train_step` takes it.

        Returns:
            ``(x, y, x_px)``: the batch for log p(y|x), and in semi-supervised runs the batch for log p(x) from
            every training image (None otherwise: `x` serves both).
        """
        x, y = self.batcher.next_batch()
        if self.labelled is None:
            return x, y, None
        x_labelled, y_labelled = self.labelled.next_batch()
        return x_labelled, y_labelled, x

    def train_step(
        self, x: torch.Tensor, y: torch.Tensor, epoch: int, x_px: torch.Tensor | None = None
    ) -> dict[str, float]:
        """One optimisation step on a batch: negatives, loss, backward, update.

        Args:
            x, y: images and labels for log p(y|x) (and for the log p(x) terms when `x_px` is None).
            epoch: the current epoch (learning-rate schedule).
            x_px: semi-supervised runs (`next_batch`): images for the log p(x) terms, drawn from all training
                images; ignored when the objective has no p(x) term (the softmax baseline).
        """
        if self.egc is not None:
            return self._egc_step(x, y, epoch)
        cfg = self.config
        x, y = x.to(self.device), y.to(self.device)
        if cfg.train.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if x_px is not None and self.weights.px > 0:
            x_px = x_px.to(self.device)
            if cfg.train.channels_last:
                x_px = x_px.contiguous(memory_format=torch.channels_last)
        else:
            x_px = None
        lr = learning_rate(cfg, self.step, epoch)
        set_learning_rate(self.optimizer, lr)
        n_neg = cfg.sampler.batch_size or len(x)
        stats: dict[str, float] = {"lr": lr}
        x_model = None
        if self.weights.px > 0:
            x_model, sampler_stats = self.negatives(n_neg)
            stats.update(sampler_stats)
        x_cond = y_cond = None
        if self.weights.pxy > 0:
            y_cond = y[:n_neg]
            x_cond, cond_stats = self.negatives(len(y_cond), labels=y_cond)
            for key in ("sgld_steps", "sgld_chain_steps"):
                stats[key] = stats.get(key, 0) + cond_stats[key]
        x, x_px = self._augment_and_noise(x, x_px)

        self.model.train()
        with self.autocast():
            loss, loss_stats = jem_loss(self.loss_model, x, y, x_model, self.weights, x_cond, y_cond, x_data_px=x_px)
        # Averaged over ranks before any check reads them: every rank takes the same divergence decision.
        stats.update(self.dist.mean({**loss_stats, **{k: v for k, v in stats.items() if k != "lr"}}))
        self.check_divergence(stats, x_model if not self.dist.active else None)
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is None:
            loss.backward()  # with DDP: the gradient all-reduce (mean over ranks) happens here
        else:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
        params = [p for p in self.model.parameters() if p.requires_grad]
        stats["grad_norm"] = gradient_norm(params, cfg.optim.grad_clip)  # before clipping
        if self.scaler is not None and not math.isfinite(stats["grad_norm"]):
            # fp16 overflow: GradScaler skips this update and lowers its scale; a divergence shows in the loss.
            self.scaler.step(self.optimizer)
            self.scaler.update()
            stats["grad_norm"], stats["amp_skipped"] = 0.0, 1.0
            self.step += 1
            return stats
        self.check_gradients(stats["grad_norm"])
        if self.scaler is None:
            self.optimizer.step()
        else:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        self.step += 1
        return stats

    def _augment_and_noise(
        self, x: torch.Tensor, x_px: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The training inputs: augmentation (data.augment) and Gaussian input noise (objective.input_noise) for the
        CE batch `x` and the log p(x) batch `x_px` (None: `x` serves both, unless data.augment_px=none)."""
        cfg = self.config
        # Augmentation (data.augment) for log p(y|x); the p(x) terms take the unaugmented images with
        # data.augment_px=none (SADA-JEM), else the same ones (their own batch, augmented alike, with few labels).
        if cfg.data.augment != "none":
            x_plain = x
            x = augment(x, cfg.data.augment, self.noise_generator)
            if x_px is not None:
                if cfg.data.augment_px != "none":
                    x_px = augment(x_px, cfg.data.augment, self.noise_generator)
            elif cfg.data.augment_px == "none" and self.uses_sampler:
                x_px = x_plain
        if cfg.objective.input_noise > 0:
            noise = torch.randn(x.shape, generator=self.noise_generator, device=x.device)
            x = x + cfg.objective.input_noise * noise
            if x_px is not None:
                x_px = x_px + cfg.objective.input_noise * torch.randn(
                    x_px.shape, generator=self.noise_generator, device=x.device
                )
        return x, x_px

    def _egc_step(self, x: torch.Tensor, y: torch.Tensor, epoch: int) -> dict[str, float]:
        """EGC (objective.name=egc): one step of the EGC loss (training/egc.py) on this trainer's parts."""
        assert self.egc is not None
        stats = self.egc.train_step(
            x,
            y,
            model=self.model,
            optimizer=self.optimizer,
            generator=self.noise_generator,
            env=self.dist,
            detector=self.recovery.detector,
            config=self.config,
            step=self.step,
            epoch=epoch,
        )
        self.step += 1
        return stats

    def autocast(self) -> contextlib.AbstractContextManager:
        """Mixed precision for the training loss (train.precision): autocast to bf16 or fp16, or nothing."""
        dtype = AUTOCAST_DTYPES[self.precision]
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=dtype)

    def check_divergence(self, stats: dict[str, float], x_model: torch.Tensor | None = None) -> None:
        """Raise `DivergenceDetected` (a DivergenceError) with a named reason before a non-finite or exploding loss
        reaches the weights: non-finite values, |energy| beyond train.max_abs_energy, an exploding or collapsing
        energy gap, an exploding SGLD gradient (see divergence.REASONS)."""
        raise_if_diverged(self.recovery.detector.check_step(self.step + 1, stats, x_model))

    def check_gradients(self, grad_norm: float) -> None:
        """Raise `DivergenceDetected` when a parameter gradient is not finite (before the optimizer step)."""
        raise_if_diverged(self.recovery.detector.check_gradients(self.step + 1, grad_norm))

    # --- healthy snapshots and recovery --------------------------------------------------------------------------

    def _take_snapshot(self, force: bool = False) -> None:
        self.recovery.take_snapshot(self.step, self.state_dict, force=force)

    def _roll_back(self) -> None:
        """Back to the last healthy snapshot, exactly (model, optimizer, buffer, batcher, generators, detector)."""
        self.step, state = self.recovery.restore_snapshot()
        self.load_state_dict(state)

    def _recover(self, signal: DivergenceSignal) -> str | None:
        """Roll back and apply the recovery plan; log it. Returns the error to stop with when recovery gives up."""
        plan = self.recovery.recover(
            signal,
            self.config,
            uses_sampler=self.uses_sampler,
            buffer_chains=None if self.buffer is None else len(self.buffer),
        )
        self.load_state_dict(plan.state)
        self.step = plan.step
        if plan.config is not None:
            self._apply(plan)
        event = plan.event
        self._emit({**event, "elapsed_s": self.elapsed})
        if event["event"] == "diverged":
            self._log.error(event["error"])
            return event["error"]
        self._log.warning(
            f"divergence: {signal.describe()}; rolled back to step {self.step}, recovery "
            f"{event['attempt']}/{self.config.recovery.max_retries}: "
            + ", ".join(f"{k} {old}->{new}" for k, (old, new) in event["changes"].items())
        )
        return None

    def _apply(self, plan: RecoveryPlan) -> None:
        """The recovery policy's changes: the new config (so checkpoints carry it), chain seed, restarted chains."""
        assert plan.config is not None
        self.config = plan.config
        self.weights = dataclasses.replace(self.weights, energy_l2=plan.config.objective.energy_l2)
        if plan.chain_seed is not None:
            # Per rank with several processes (base * world + rank), so the ranks' chains stay independent.
            self.cpu_generator.manual_seed(self.dist.seed(plan.chain_seed))
            self.noise_generator.manual_seed(self.dist.seed(plan.chain_seed + 1))
        if self.buffer is not None:
            restart_chains(self.buffer, plan.restart_chains, self.cpu_generator)

    # --- evaluation and samples ----------------------------------------------------------------------------------

    def evaluate(self, split: str) -> dict[str, float]:
        """Cross-entropy and accuracy of the classifier on the val or test split.

        With several processes each rank scores every world-th image and the sums are all-reduced (a collective).
        """
        data = getattr(self.splits, split)
        shard = data.subset(slice(self.dist.rank, None, self.dist.world_size)) if self.dist.active else data
        local = evaluate_split(self.eval_model, shard, self.device, prefix=split)
        return self.dist.weighted_mean(local, len(shard), [f"{split}_nll", f"{split}_accuracy"])

    def sample_grids(self, tag: str) -> list[Path]:
        """Save the current negatives (unconditional) and one row of conditional samples per class."""
        if self.run_dir is None or (not self.uses_sampler and self.egc is None):
            return []
        out = self.run_dir / "samples"
        paths = []
        gen = torch.Generator(device=self.device).manual_seed(self.config.train.seed + 3)
        x, _ = generate(self, n=64, generator=gen)
        paths.append(save_grid(x, out / f"{tag}_unconditional.png", nrow=8))
        c = self.splits.num_classes
        labels = torch.arange(c).repeat_interleave(8)
        x, _ = generate(self, n=len(labels), labels=labels, generator=gen)
        paths.append(save_grid(x, out / f"{tag}_per_class.png", nrow=8))
        return paths

    # --- the loop ------------------------------------------------------------------------------------------------

    def fit(
        self,
        resume_from: str | Path | None = None,
        log_file: str | Path | None = None,
        callback: Callable[[dict[str, Any]], None] | None = None,
    ) -> dict[str, Any]:
        """Train until `train.epochs` or the `train.minutes` budget, then evaluate and save.

        Divergence is rolled back and recovered from as `config.recovery` says; SIGTERM and Ctrl-C stop the run
        after the current iteration, with a checkpoint (a second Ctrl-C stops at once, from the last healthy state).

        Args:
            resume_from: checkpoint file or run directory to continue from.
            log_file: an extra file that receives the log (besides run_dir/train.log).
            callback: called on rank 0 with a copy of every metrics record as it is logged (the lines of
                metrics.jsonl, also without a run directory): iterations, validation, warnings, recoveries, final.

        Returns:
            The final metrics (also written to run_dir/metrics.json).

        Raises:
            DivergenceError: training diverged and recovery was off or out of retries (after saving the last
                healthy state and writing metrics.json with ``stop_reason: "diverged"``).
        """
        self._callback = callback
        try:
            with StopRequest() as stop:
                return self._fit(stop, resume_from, log_file)
        finally:
            self._callback = None

    def _fit(self, stop: StopRequest, resume_from: str | Path | None, log_file: str | Path | None) -> dict[str, Any]:
        # Logs: rank 0 writes every file (logs, metrics, checkpoints, samples); the other ranks only print warnings.
        main = self.dist.is_main
        self._log = setup_logger(self.run_dir if main else None, extra_file=log_file if main else None)
        if not main:
            self._log.setLevel(logging.WARNING)
        # Resume: model, optimizer, buffer, batcher position and RNG states continue exactly.
        if resume_from is not None:
            self._resume_run(resume_from)
        # Run folder: config.json and metrics.jsonl; then the header (settings and hardware choices).
        self._open_run_dir(fresh=resume_from is None)
        self._log_header()
        # Iterations until the end of training, a stop or a divergence that is not recovered from.
        stop_reason, failure = self._train(stop)
        # End: final checkpoint, metrics on val and test, sample grids.
        return self._finish(stop_reason, failure)

    def _resume_run(self, resume_from: str | Path) -> None:
        """Resume, and cut metrics.jsonl back to what it held at the checkpoint, so that iterations logged after it
        (by a killed run) and logged again now do not appear twice."""
        meta = self.resume(resume_from)
        own_checkpoint = (
            self.dist.is_main
            and self.run_dir is not None
            and (resolve_checkpoint(resume_from).resolve().parent == (self.run_dir / "checkpoints").resolve())
        )
        if own_checkpoint:
            metrics = self.run_dir / "metrics.jsonl"
            trim_metrics(metrics, lines_at_checkpoint(metrics, meta.get("metrics_lines")), self.step)
            remove_stale_temporaries(self.run_dir / "checkpoints")
        self._log.info(f"resumed from {resume_from} at step {self.step}, epoch {self.batcher.epoch}")

    def _open_run_dir(self, fresh: bool) -> None:
        """Rank 0 with a run directory: write config.json and open metrics.jsonl for appending.

        A fresh start in a folder where an earlier start died before its first checkpoint must not append to that
        start's metrics: they are kept beside the new ones (nothing of a run is deleted)."""
        if self.run_dir is None or not self.dist.is_main:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        metrics = self.run_dir / "metrics.jsonl"
        if fresh and metrics.exists():
            metrics.rename(self.run_dir / f"metrics.unfinished-{time.strftime('%Y%m%d-%H%M%S')}.jsonl")
        atomic_write_bytes(self.run_dir / "config.json", (self.config.to_json() + "\n").encode())
        self.metrics_lines = count_lines(self.run_dir / "metrics.jsonl")
        self._writer = MetricsWriter(self.run_dir, tensorboard=self.config.train.tensorboard)

    def _emit(self, record: dict[str, Any]) -> None:
        """One line of metrics.jsonl (nothing without a run directory or on ranks other than 0); `fit`'s callback."""
        if self._writer is not None:
            self._writer.write(record)
            self.metrics_lines += 1
        if self._callback is not None and self.dist.is_main:
            self._callback(dict(record))

    def _log_header(self) -> None:
        cfg, t = self.config, self.config.train
        budget = None if t.minutes is None else t.minutes * 60.0
        n_params = sum(p.numel() for p in self.model.parameters())
        self._log.info(
            f"jemlab: preset={cfg.preset} dataset={self.splits.name} model={cfg.model.name} "
            f"({n_params / 1e6:.2f}M params) device={self.device} threads={torch.get_num_threads()} "
            f"processes={self.dist.world_size} malloc={'tuned' if allocator_status()['tuned'] else 'default'} "
            f"train={len(self.splits.train)} {self.label_budget()}val={len(self.splits.val)} "
            f"steps/epoch={len(self.batcher)} "
            f"budget={'none' if budget is None else f'{t.minutes:g} min'} run_dir={self.run_dir}"
        )
        for line in header_lines(self.choices, self.device):
            self._log.info(line)

    def label_budget(self) -> str:
        """The header's label budget, e.g. ``labels=10/class (100 labelled of 55,000) `` (empty with all labels)."""
        if self.labelled is None:
            return ""
        n = self.config.data.labels_per_class
        pool = len(self.batcher.dataset)
        unlabelled = pool - len(self.splits.train)
        extra = f" + {unlabelled:,} unlabelled" if unlabelled else ""
        return (
            f"labels={'all' if n is None else f'{n}/class'} "
            f"({len(self.labelled_index):,} labelled of {len(self.splits.train):,}{extra}) "
        )

    def _train(self, stop: StopRequest) -> tuple[str, str | None]:
        """The iterations. Returns the stop reason and, when recovery gave up, the error to raise."""
        t = self.config.train
        steps_per_epoch = len(self.batcher)
        total_steps = steps_per_epoch * t.epochs
        budget = None if t.minutes is None else t.minutes * 60.0
        started = time.monotonic() - self.elapsed
        last_checkpoint = time.monotonic()
        window = _LogWindow()
        stop_reason, failure = "epochs", None
        self._take_snapshot(force=True)  # the healthy state to roll back to until the next snapshot
        bar = progress_bar(total_steps, t.progress, initial=self.step)
        gap_monitor = GapDriftMonitor(self.config.recovery.gap_warning)  # slow drift of the energy gap: a warning
        try:
            while self.step < total_steps:
                # Batch (the batcher rolls over to a new epoch by itself).
                epoch = self.step // steps_per_epoch
                x, y, x_px = self.next_batch()
                try:
                    # With all labels the three-argument step, as before (wrappers of train_step rely on it).
                    stats = self.train_step(x, y, epoch) if x_px is None else self.train_step(x, y, epoch, x_px=x_px)
                except DivergenceDetected as err:
                    signal = err.signal  # a divergence: rolled back to the last healthy snapshot
                else:
                    self.elapsed = time.monotonic() - started
                    bar.update(1)
                    window.add(stats)
                    # Log line, sample quality when due, and the slow drifts they show (rolled back further).
                    signal, untimed = self._watch(window, bar, gap_monitor)
                    started += untimed  # the one-time feature net of the quality tracking is not training time
                if signal is not None:
                    # Back to a healthy state with the recovery policy's changes applied; or, with recovery off or
                    # out of retries, stop from that healthy state with a clear error.
                    failure = self._recover(signal)
                    if failure is not None:
                        stop_reason = "diverged"
                        break
                    gap_monitor.reset()
                    bar.n = self.step
                    bar.refresh()
                    window.reset(time.monotonic())
                    continue

                # End of epoch: validate, samples, checkpoint (every checkpoint is also a healthy snapshot).
                # Stop and checkpoint decisions are or-ed over ranks: saving and evaluating are collectives.
                out_of_time, stop_now, checkpoint_due = self.dist.any(
                    budget is not None and self.elapsed >= budget,
                    stop.reason is not None,
                    time.monotonic() - last_checkpoint > t.checkpoint_minutes * 60,
                )
                if self._checkpoint_if_due(steps_per_epoch, checkpoint_due, can_save=not out_of_time):
                    last_checkpoint = time.monotonic()
                if out_of_time:
                    stop_reason = "time budget"
                    break
                if stop_now:
                    stop_reason = stop.reason or "terminated"  # the signal may have reached another rank only
                    self._log.info(f"{stop_reason} at step {self.step}; saving a checkpoint")
                    break
        except KeyboardInterrupt:
            # A second Ctrl-C, possibly half-way through an iteration: save the last healthy snapshot instead.
            # With several processes the ranks may be inside different collectives: exit without saving (the
            # last checkpoint stays the run's state).
            if self.dist.active:
                raise
            self._roll_back()
            stop_reason = "interrupted"
            self._log.info(f"interrupted; saving the state of step {self.step}")
        finally:
            bar.close()
        return stop_reason, failure

    def _watch(
        self, window: _LogWindow, bar: Any, gap_monitor: GapDriftMonitor
    ) -> tuple[DivergenceSignal | None, float]:
        """After an iteration: the log line when due and sample quality when due. Returns a slow drift to recover from
        (the energy gap opening, the tracked Fréchet distance rising; the same decision on every rank: the gap is
        averaged, the quality flags all-reduced) and the seconds not to charge to the time budget."""
        drift = self._log_iteration(window, bar, gap_monitor) if self.step % self.config.train.log_every == 0 else None
        untimed = 0.0
        if self.quality.due(self.step):
            untimed = self._prepare_quality()  # the feature net, loaded or trained once
            if self.quality.enabled:
                drift = self._track_quality(gap_monitor) or drift
        return drift, untimed

    def _prepare_quality(self) -> float:
        """Before the first measurement: rank 0 loads (or trains and caches) the feature net, and every rank learns
        whether tracking is possible, so that all take the same path. Returns the seconds it took (0 later on)."""
        if self._quality_prepared:
            return 0.0
        start = time.monotonic()
        ready = self.quality.prepare() if self.dist.is_main else False
        if self.dist.active:
            (ready,) = self.dist.any(ready)  # rank 0's answer
            if not ready and self.quality.enabled:
                self.quality.disabled_reason = "no feature net on rank 0"
        self._quality_prepared = True
        return time.monotonic() - start

    def _checkpoint_if_due(self, steps_per_epoch: int, checkpoint_due: bool, can_save: bool) -> bool:
        """End of an epoch (validation, grids, checkpoint) or a time-based checkpoint; a healthy snapshot when one is
        due. Returns whether a checkpoint was written."""
        saved = False
        if self.step % steps_per_epoch == 0:
            saved = self._end_of_epoch(self.step // steps_per_epoch, can_save=can_save)
        elif checkpoint_due:
            self.save()
            saved = True
        if saved or self.step % self.config.recovery.snapshot_every == 0 or self.recovery.snapshot_due:
            self._take_snapshot()
        return saved

    def _log_iteration(self, window: _LogWindow, bar: Any, gap_monitor: GapDriftMonitor) -> DivergenceSignal | None:
        """A log line and metrics.jsonl record with the window's mean statistics; the gap-drift check (returns the
        drift to recover from, or None)."""
        now = time.monotonic()
        world = self.dist.world_size
        record = {
            "step": self.step,
            "epoch": self.step / len(self.batcher),
            "elapsed_s": self.elapsed,
        }
        record.update(window.means())
        record["it_per_s"] = window.count / max(now - window.start, 1e-9)
        record.update(_throughput(record, self.config.train.batch_size * world, world))
        if self.buffer is not None:
            record["buffer_mean"] = float(self.buffer.images.mean())
            record["buffer_std"] = float(self.buffer.images.std())
        self._emit(record)
        bar.set_postfix(loss=f"{record['loss']:.3f}", acc=f"{record['train_accuracy']:.3f}")
        self._log.info(_format_record(record))
        window.reset(now)
        if "cd" not in record:
            return None
        self._last_cd = record["cd"]
        warning = gap_monitor.check(record["cd"])  # a slowly opening energy gap (recovery.gap_warning)
        if warning is None:
            return None
        if self._acts_on_drift():
            return DivergenceSignal("energy_gap_drift", self.step, f"energy gap {record['cd']:+.3g}")
        self._log.warning(f"step {self.step}: {warning}")
        self._emit({"step": self.step, "event": "warning", "reason": "energy_gap_drift",
                    "cd": record["cd"], "message": warning, "elapsed_s": self.elapsed})  # fmt: skip
        return None

    def _acts_on_drift(self) -> bool:
        """A drift is rolled back (recovery.drift_action=recover, recovery on, retries left) rather than warned of."""
        return self.config.recovery.drift_action == "recover" and self.recovery.can_recover()

    def _measure_quality(self) -> tuple[dict[str, float] | None, bool]:
        """Measure sample quality (on rank 0), log it, keep the best state (checkpoints/best-samples.safetensors) and
        redraw quality.png. Returns the measurement (None on other ranks or when tracking is off) and whether the
        Fréchet distance rose past recovery.quality_drop × its best (the same answer on every rank)."""
        quality = self.quality.measure(self, self.step) if self.dist.is_main else None
        self._last_quality = {self.step: quality} if quality is not None else {}
        fd = float("nan") if quality is None else quality.get("quality_fd", float("nan"))
        factor = self.config.recovery.quality_drop
        improved = math.isfinite(fd) and fd < self.best_fd
        dropped = factor > 0 and math.isfinite(self.best_fd) and fd > factor * self.best_fd
        if quality is not None:
            self._emit({"step": self.step, "epoch": self.step / len(self.batcher), "elapsed_s": self.elapsed,
                        **quality, "quality_best_fd": min(self.best_fd, fd)})  # fmt: skip
            self._log.info(f"sample quality at step {self.step}: " + _format_record(quality))
        if self.dist.active:  # saving is a collective: every rank must agree
            improved, dropped = self.dist.any(improved, dropped)
        if improved:
            self.best_fd, self.best_fd_step = fd, self.step
            if self.config.quality.keep_best:
                self.save_best_samples(quality or {})
        if self.run_dir is not None and quality is not None:
            plot_quality(self.run_dir / "metrics.jsonl", self.run_dir / "quality.png")
        return quality, dropped

    def _track_quality(self, gap_monitor: GapDriftMonitor) -> DivergenceSignal | None:
        """A measurement during training: healthy samples become the rollback anchor of a slow drift; a drop of
        quality is returned to recover from (or warned of)."""
        _, dropped = self._measure_quality()
        if not dropped and gap_monitor.healthy(self._last_cd):
            self.recovery.take_anchor(self.step, self.state_dict)
        if not dropped:
            return None
        detail = f"Fréchet distance > {self.config.recovery.quality_drop:g} x its best {self.best_fd:.3g}"
        if self._acts_on_drift():
            return DivergenceSignal("sample_quality_drop", self.step, detail)
        self._log.warning(f"step {self.step}: sample quality dropped: {detail}")
        self._emit({"step": self.step, "event": "warning", "reason": "sample_quality_drop", "message": detail,
                    "elapsed_s": self.elapsed})  # fmt: skip
        return None

    def _end_of_epoch(self, done_epochs: int, can_save: bool) -> bool:
        """Validate, save sample grids and a checkpoint when due. Returns whether a checkpoint was written."""
        t = self.config.train
        val = self.evaluate("val")
        self._emit({"step": self.step, "epoch": done_epochs, "elapsed_s": self.elapsed, **val})
        self._log.info(f"epoch {done_epochs}: " + (_format_record(val) if val else "done (no classifier to validate)"))
        if done_epochs % t.sample_every == 0 and self.dist.is_main:
            self.sample_grids(f"epoch{done_epochs:03d}")
        if done_epochs % t.checkpoint_every == 0 and can_save:
            self.save()
            return True
        return False

    def _finish(self, stop_reason: str, failure: str | None) -> dict[str, Any]:
        """Final checkpoint, metrics on val and test, metrics.json and sample grids; raise when training diverged."""
        done = stop_reason in ("epochs", "time budget")  # ended by itself: after a signal the process must exit now
        # Sample quality at the end: measured at this very step already, or now (before the save, which records the
        # best Fréchet distance); the decision depends only on the step, the same on every rank.
        if done and self.quality.enabled and not self.quality.due(self.step):
            self._prepare_quality()
            if self.quality.enabled:
                self._measure_quality()
        quality = self._last_quality.get(self.step)
        ckpt = self.save()
        final = {
            "stop_reason": stop_reason,
            **self.progress(),
            "epoch": self.step / len(self.batcher),
            **self.evaluate("val"),
            **self.evaluate("test"),
            "labels_per_class": self.config.data.labels_per_class,  # None: every training label
            "labelled_images": len(self.labelled_index),
            **(quality or {}),
            "quality_best_fd": None if math.isinf(self.best_fd) else self.best_fd,
            "quality_best_step": self.best_fd_step,
            "recoveries": self.recovery.recoveries,
            "recovery_reasons": [event["reason"] for event in self.recovery.history],
            "checkpoint": None if ckpt is None else str(ckpt),
            "git_sha": git_sha(),
            "torch_version": torch.__version__,
            "malloc": "tuned" if allocator_status()["tuned"] else "default",
            "hardware": hardware_record(self.choices, self.device),
        }
        if failure is not None:
            final["error"] = failure
        scores = {k: final[k] for k in final if k.endswith(("accuracy", "nll"))}
        self._log.info(
            f"finished ({stop_reason}) after {self.step} steps, {self.elapsed / 60:.1f} min: "
            + (_format_record(scores) if scores else "no classifier (its samples: `jemlab eval --parts samples`)")
        )
        floats = {k: v for k, v in final.items() if isinstance(v, float)}
        self._emit({"step": self.step, "epoch": final["epoch"], "elapsed_s": self.elapsed, **floats})
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self.run_dir is not None and self.dist.is_main:
            # Sample grids only when the run ended by itself: after a signal the process is asked to exit now.
            final["samples"] = [str(p) for p in self.sample_grids("final")] if done else []
            if self.quality.enabled:  # the curve with the last validation point
                plot_quality(self.run_dir / "metrics.jsonl", self.run_dir / "quality.png")
            atomic_write_bytes(self.run_dir / "metrics.json", (json.dumps(final, indent=2) + "\n").encode())
            self._log.info(f"wrote {self.run_dir / 'metrics.json'} and sample grids in {self.run_dir / 'samples'}")
        if failure is not None:
            raise DivergenceError(failure)
        return final


def _load_splits(config: Config) -> DatasetSplits:
    d = config.data
    return load_dataset(
        d.dataset,
        d.data_dir,
        val_size=d.val_size,
        seed=config.train.seed,
        download=d.download,
        limit=d.limit,
        image_size=d.image_size,
    )


def _build_network(config: Config, splits: DatasetSplits, device: torch.device) -> EnergyModel:
    m = config.model
    model = build_model(m.name, splits.image_shape, splits.num_classes, m.energy_head, m.options).to(device)
    if config.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


class _LogWindow:
    """Sums of the iteration statistics since the last log line (which shows their means) and when it began."""

    def __init__(self) -> None:
        self.reset(time.monotonic())

    def reset(self, start: float) -> None:
        self.sums: dict[str, float] = {}
        self.count = 0
        self.start = start

    def add(self, stats: dict[str, float]) -> None:
        for k, v in stats.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.count += 1

    def means(self) -> dict[str, float]:
        return {k: v / self.count for k, v in self.sums.items()}


def _throughput(record: dict[str, Any], global_batch: int, world: int) -> dict[str, float]:
    """Images/s (all ranks) and SGLD steps/s (chain batches per rank; chain-image steps over all ranks)."""
    rate = record["it_per_s"]
    out = {"images_per_s": rate * global_batch}
    if "sgld_steps" in record:
        out["sgld_steps_per_s"] = rate * record["sgld_steps"]
        out["sgld_image_steps_per_s"] = rate * record["sgld_chain_steps"] * world
    return out


def _format_record(record: dict[str, Any]) -> str:
    parts = []
    for key, value in record.items():
        if isinstance(value, float):
            parts.append(f"{key}={value:.4g}")
        else:
            parts.append(f"{key}={value}")
    return " ".join(parts)
