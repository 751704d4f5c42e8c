"""The training loop: the only place that knows the data, the model, the sampler and the objective at once.

`Trainer.fit` reads top to bottom in stages: set-up, resume, then per iteration (batch → negatives → loss → step →
log), per epoch (validate → samples → checkpoint), and the end (final checkpoint, test metrics, sample grids).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import subprocess
import time
from pathlib import Path
from typing import Any

import torch

from jemlab import distributed
from jemlab.accel import AUTOCAST_DTYPES, Choice
from jemlab.allocator import allocator_status
from jemlab.config import Config, validate_config
from jemlab.data import ArrayDataset, DatasetSplits, load_dataset
from jemlab.data.augment import augment
from jemlab.errors import CheckpointError, ConfigError, DivergenceError
from jemlab.images import save_grid
from jemlab.models import EnergyModel, build_model
from jemlab.objectives import JEMWeights, jem_loss
from jemlab.samplers import ReplayBuffer
from jemlab.samplers.buffer_shards import shard_capacity
from jemlab.samplers.init import initializer_from_config, initializer_state
from jemlab.sampling import run_chains
from jemlab.training.checkpoint import (
    atomic_write_bytes,
    load_checkpoint,
    remove_stale_temporaries,
    resolve_checkpoint,
    save_run_checkpoint,
)
from jemlab.training.choices import hardware_record, header_lines, run_choices
from jemlab.training.distributed_state import checkpoint_state, local_state
from jemlab.training.logging import MetricsWriter, progress_bar, setup_logger
from jemlab.training.recovery import (
    DivergenceDetected,
    GapDriftMonitor,
    Recovery,
    StopRequest,
    gradient_norm,
    trim_metrics,
)


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when available; an explicit CUDA device without CUDA is a clear error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"train.device={name} but this torch build sees no CUDA GPU; use --device cpu")
    return torch.device(name)


def git_sha() -> str | None:
    """The current commit of the jemlab checkout, if it is one (recorded with every run)."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def build_optimizer(model: torch.nn.Module, config: Config) -> torch.optim.Optimizer:
    opt = config.optim
    params = [p for p in model.parameters() if p.requires_grad]
    if opt.name == "adam":
        return torch.optim.Adam(params, lr=opt.lr, betas=opt.betas, weight_decay=opt.weight_decay)
    if opt.name == "adamw":
        return torch.optim.AdamW(params, lr=opt.lr, betas=opt.betas, weight_decay=opt.weight_decay)
    return torch.optim.SGD(params, lr=opt.lr, momentum=opt.momentum, weight_decay=opt.weight_decay)


def learning_rate(config: Config, step: int, epoch: int) -> float:
    """Learning rate at iteration `step` (0-based) in epoch `epoch` (0-based): linear warm-up × schedule."""
    opt = config.optim
    lr = opt.lr
    if opt.warmup_steps > 0:
        lr *= min(1.0, (step + 1) / opt.warmup_steps)
    if opt.schedule == "step":
        lr *= opt.gamma ** (epoch // opt.step_epochs)
    elif opt.schedule == "multistep":
        lr *= opt.gamma ** sum(epoch >= m for m in opt.milestones)
    elif opt.schedule == "cosine":
        lr *= 0.5 * (1 + math.cos(math.pi * min(1.0, epoch / config.train.epochs)))
    return lr


@torch.no_grad()
def evaluate_split(
    model: EnergyModel, data: ArrayDataset, device: torch.device, prefix: str, batch_size: int = 500
) -> dict[str, float]:
    """Mean cross-entropy (`<prefix>_nll`) and accuracy (`<prefix>_accuracy`, a fraction) of the classifier."""
    if len(data) == 0:
        return {}
    was_training = model.training
    model.eval()
    total_loss, correct = 0.0, 0
    for start in range(0, len(data), batch_size):
        x, y = data.batch(torch.arange(start, min(start + batch_size, len(data))))
        logits = model.logits(x.to(device)).float()
        y = y.to(device)
        total_loss += float(torch.nn.functional.cross_entropy(logits, y, reduction="sum"))
        correct += int((logits.argmax(1) == y).sum())
    model.train(was_training)
    return {f"{prefix}_nll": total_loss / len(data), f"{prefix}_accuracy": correct / len(data)}


class Trainer:
    """Trains one energy model from a config; holds everything a checkpoint must capture.

    Args:
        config: the resolved, validated config.
        run_dir: folder for config.json, metrics, logs, checkpoints and sample grids (None: keep nothing on disk).
        splits: the dataset (loaded from `config.data` when None).
    """

    def __init__(self, config: Config, run_dir: str | Path | None, splits: DatasetSplits | None = None):
        validate_config(config)
        self.config = config
        self.run_dir = Path(run_dir) if run_dir is not None else None
        t = config.train
        if t.threads is not None:
            torch.set_num_threads(t.threads)
        # One process or one of N under torchrun (distributed.py): rank, world size, this rank's device.
        self.dist = distributed.init_distributed(t.device)
        self.device = self.dist.device
        torch.manual_seed(t.seed)  # model initialisation (the same on every rank)

        # Data: held in memory, batched by index with the batcher's own generator.
        d = config.data
        self.splits = splits or load_dataset(
            d.dataset,
            d.data_dir,
            val_size=d.val_size,
            seed=t.seed,
            download=d.download,
            limit=d.limit,
        )
        # One shuffle shared by all ranks; each takes its block of batch_size images from every global batch.
        self.batcher = distributed.RankBatcher(self.splits.train, t.batch_size, seed=t.seed, env=self.dist)

        # Network.
        self.model: EnergyModel = build_model(
            config.model.name,
            self.splits.image_shape,
            self.splits.num_classes,
            config.model.energy_head,
            config.model.options,
        ).to(self.device)
        if t.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
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
        self.weights = JEMWeights(
            ce=config.objective.ce,
            px=config.objective.px,
            pxy=config.objective.pxy,
            energy_l2=config.objective.energy_l2,
        )

        # Sampler state: the replay buffer (CPU) and two random sources, one for buffer draws and one for the
        # Langevin and input noise on the training device. Each is seeded from the run seed.
        s = config.sampler
        self.cpu_generator = torch.Generator().manual_seed(self.dist.seed(t.seed + 1))
        self.noise_generator = torch.Generator(device=self.device).manual_seed(self.dist.seed(t.seed + 2))
        # The chain initialiser; a data-fitted one (JEM++ class Gaussians) is fitted here and saved in checkpoints.
        self.init = initializer_from_config(
            s, self.splits.image_shape, data=self.splits.train, num_classes=self.splits.num_classes
        )
        self.buffer: ReplayBuffer | None = None
        if s.persistent and (self.weights.px > 0 or self.weights.pxy > 0):
            self.buffer = ReplayBuffer(
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

        # EGC (SPEC S5, objective.name=egc): its loss step and EMA weights live in training/egc.py.
        self.egc = None
        if config.objective.name == "egc":
            from jemlab.training.egc import EGCTraining

            self.egc = EGCTraining(config, self.model)

        self.step = 0
        self.elapsed = 0.0  # training seconds, carried over on resume

        # Divergence watch (recovery.py): detectors on the live diagnostics, the last healthy state in memory, and
        # the recovery policy, which changes `config` in place so that checkpoints carry the changed values.
        self.recovery = Recovery(config, self.splits.num_classes)
        self.metrics_lines = 0  # lines of run_dir/metrics.jsonl written so far (recorded in checkpoints)

    # --- state ---------------------------------------------------------------------------------------------------

    @property
    def eval_model(self) -> torch.nn.Module:
        """The weights to evaluate and sample with: the EMA for EGC, else the live model."""
        return self.model if self.egc is None else self.egc.ema.model

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
        state = checkpoint_state(self)  # with several processes: gathers every rank's buffer shard and generators
        if not self.dist.is_main:
            return None
        meta = {"config": self.config.to_dict(), "progress": self.progress(), "git_sha": git_sha()}
        meta["world_size"] = self.dist.world_size
        meta["recovery"] = self.recovery.state_dict()
        meta["metrics_lines"] = self.metrics_lines
        meta["dataset"] = {
            "name": self.splits.name,
            "image_shape": list(self.splits.image_shape),
            "num_classes": self.splits.num_classes,
            "class_names": list(self.splits.class_names),
        }
        return save_run_checkpoint(
            self.run_dir,
            self.step,
            state,
            meta,
            keep=self.config.train.keep_checkpoints,
        )

    def resume(self, path: str | Path) -> dict[str, Any]:
        """Load a checkpoint of this run (same config) and continue from its next iteration."""
        state, meta = load_checkpoint(path)
        try:
            state, step = local_state(self, state, meta)  # this rank's part, for any number of processes
            self.load_state_dict(state)
            progress = meta["progress"]
            self.step = step
            self.elapsed = float(progress["elapsed_s"])
            if "recovery" in meta:  # the detector's averages and past recoveries continue too
                self.recovery.load_state_dict(meta["recovery"])
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

    def train_step(self, x: torch.Tensor, y: torch.Tensor, epoch: int) -> dict[str, float]:
        """One optimisation step on a batch: negatives, loss, backward, update."""
        if self.egc is not None:
            return self.egc.train_step(self, x, y, epoch)
        cfg = self.config
        x, y = x.to(self.device), y.to(self.device)
        if cfg.train.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        lr = learning_rate(cfg, self.step, epoch)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
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
        # Augmentation (data.augment) for log p(y|x); the p(x) terms take the unaugmented images with
        # data.augment_px=none (SADA-JEM), else the same ones.
        x_px = None
        if cfg.data.augment != "none":
            x_plain = x
            x = augment(x, cfg.data.augment, self.noise_generator)
            if cfg.data.augment_px == "none" and (self.weights.px > 0 or self.weights.pxy > 0):
                x_px = x_plain
        if cfg.objective.input_noise > 0:
            noise = torch.randn(x.shape, generator=self.noise_generator, device=x.device)
            x = x + cfg.objective.input_noise * noise
            if x_px is not None:
                x_px = x_px + cfg.objective.input_noise * torch.randn(
                    x_px.shape, generator=self.noise_generator, device=x.device
                )

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

    def autocast(self) -> contextlib.AbstractContextManager:
        """Mixed precision for the training loss (train.precision): autocast to bf16 or fp16, or nothing."""
        dtype = AUTOCAST_DTYPES[self.precision]
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=dtype)

    def check_divergence(self, stats: dict[str, float], x_model: torch.Tensor | None = None) -> None:
        """Raise `DivergenceDetected` (a DivergenceError) with a named reason before a non-finite or exploding loss
        reaches the weights: non-finite values, |energy| beyond train.max_abs_energy, an exploding or collapsing
        energy gap, an exploding SGLD gradient (see recovery.REASONS)."""
        signal = self.recovery.detector.check_step(self.step + 1, stats, x_model)
        if signal is not None:
            raise DivergenceDetected(signal)

    def check_gradients(self, grad_norm: float) -> None:
        """Raise `DivergenceDetected` when a parameter gradient is not finite (before the optimizer step)."""
        signal = self.recovery.detector.check_gradients(self.step + 1, grad_norm)
        if signal is not None:
            raise DivergenceDetected(signal)

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
        if self.run_dir is None or (self.weights.px == 0 and self.weights.pxy == 0 and self.egc is None):
            return []
        from jemlab.generate import generate

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

    def fit(self, resume_from: str | Path | None = None, log_file: str | Path | None = None) -> dict[str, Any]:
        """Train until `train.epochs` or the `train.minutes` budget, then evaluate and save.

        Divergence is rolled back and recovered from as `config.recovery` says; SIGTERM and Ctrl-C stop the run
        after the current iteration, with a checkpoint (a second Ctrl-C stops at once, from the last healthy state).

        Args:
            resume_from: checkpoint file or run directory to continue from.
            log_file: an extra file that receives the log (besides run_dir/train.log).

        Returns:
            The final metrics (also written to run_dir/metrics.json).

        Raises:
            DivergenceError: training diverged and recovery was off or out of retries (after saving the last
                healthy state and writing metrics.json with ``stop_reason: "diverged"``).
        """
        with StopRequest() as stop:
            return self._fit(stop, resume_from, log_file)

    def _fit(self, stop: StopRequest, resume_from: str | Path | None, log_file: str | Path | None) -> dict[str, Any]:
        cfg, t = self.config, self.config.train
        # Rank 0 writes every file (logs, metrics, checkpoints, samples); the other ranks only print warnings.
        main = self.dist.is_main
        log = setup_logger(self.run_dir if main else None, extra_file=log_file if main else None)
        if not main:
            log.setLevel(logging.WARNING)

        # Resume: model, optimizer, buffer, batcher position and RNG states continue exactly; metrics.jsonl is cut
        # back to what it held at the checkpoint, so that iterations logged after it (by a killed run) and logged
        # again now do not appear twice.
        if resume_from is not None:
            meta = self.resume(resume_from)
            own_checkpoint = (
                main
                and self.run_dir is not None
                and (resolve_checkpoint(resume_from).resolve().parent == (self.run_dir / "checkpoints").resolve())
            )
            if own_checkpoint:
                metrics = self.run_dir / "metrics.jsonl"
                trim_metrics(metrics, _metrics_lines_at(metrics, meta.get("metrics_lines")), self.step)
                remove_stale_temporaries(self.run_dir / "checkpoints")
            log.info(f"resumed from {resume_from} at step {self.step}, epoch {self.batcher.epoch}")
        writer = None
        if self.run_dir is not None and main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(self.run_dir / "config.json", (cfg.to_json() + "\n").encode())
            self.metrics_lines = _count_lines(self.run_dir / "metrics.jsonl")
            writer = MetricsWriter(self.run_dir, tensorboard=t.tensorboard)

        def emit(record: dict[str, Any]) -> None:
            if writer:
                writer.write(record)
                self.metrics_lines += 1

        steps_per_epoch = len(self.batcher)
        total_steps = steps_per_epoch * t.epochs
        budget = None if t.minutes is None else t.minutes * 60.0
        n_params = sum(p.numel() for p in self.model.parameters())
        log.info(
            f"jemlab: preset={cfg.preset} dataset={self.splits.name} model={cfg.model.name} "
            f"({n_params / 1e6:.2f}M params) device={self.device} threads={torch.get_num_threads()} "
            f"processes={self.dist.world_size} malloc={'tuned' if allocator_status()['tuned'] else 'default'} "
            f"train={len(self.splits.train)} val={len(self.splits.val)} steps/epoch={steps_per_epoch} "
            f"budget={'none' if budget is None else f'{t.minutes:g} min'} run_dir={self.run_dir}"
        )
        for line in header_lines(self.choices, self.device):
            log.info(line)

        started = time.monotonic() - self.elapsed
        last_ckpt = time.monotonic()
        window: dict[str, float] = {}
        window_count, window_start = 0, time.monotonic()
        stop_reason = "epochs"
        failure: str | None = None
        self.recovery.take_snapshot(self, force=True)  # the healthy state to roll back to until the next snapshot
        bar = progress_bar(total_steps, t.progress, initial=self.step)
        gap_monitor = GapDriftMonitor(cfg.recovery.gap_warning)  # slow drift of the energy gap: a warning only
        try:
            while self.step < total_steps:
                # Batch (the batcher rolls over to a new epoch by itself).
                epoch = self.step // steps_per_epoch
                x, y = self.batcher.next_batch()
                try:
                    stats = self.train_step(x, y, epoch)
                except DivergenceDetected as err:
                    # Divergence: back to the last healthy snapshot, with the recovery policy's changes applied;
                    # or, with recovery off or out of retries, stop from that healthy state with a clear error.
                    event = self.recovery.recover(self, err.signal)
                    emit({**event, "elapsed_s": self.elapsed})
                    if event["event"] == "diverged":
                        log.error(event["error"])
                        stop_reason, failure = "diverged", event["error"]
                        break
                    log.warning(
                        f"divergence: {err.signal.describe()}; rolled back to step {self.step}, recovery "
                        f"{event['attempt']}/{cfg.recovery.max_retries}: "
                        + ", ".join(f"{k} {old}->{new}" for k, (old, new) in event["changes"].items())
                    )
                    bar.n = self.step
                    bar.refresh()
                    window, window_count, window_start = {}, 0, time.monotonic()
                    continue
                self.elapsed = time.monotonic() - started
                bar.update(1)
                for k, v in stats.items():
                    window[k] = window.get(k, 0.0) + v
                window_count += 1

                # Log line with live diagnostics.
                if self.step % t.log_every == 0:
                    now = time.monotonic()
                    record = {
                        "step": self.step,
                        "epoch": self.step / steps_per_epoch,
                        "elapsed_s": self.elapsed,
                    }
                    record.update({k: v / window_count for k, v in window.items()})
                    record["it_per_s"] = window_count / max(now - window_start, 1e-9)
                    record.update(_throughput(record, t.batch_size * self.dist.world_size, self.dist.world_size))
                    if self.buffer is not None:
                        record["buffer_mean"] = float(self.buffer.images.mean())
                        record["buffer_std"] = float(self.buffer.images.std())
                    emit(record)
                    bar.set_postfix(loss=f"{record['loss']:.3f}", acc=f"{record['train_accuracy']:.3f}")
                    log.info(_format_record(record))
                    if "cd" in record:  # a slowly opening energy gap: warn, do not roll back (recovery.gap_warning)
                        warning = gap_monitor.check(record["cd"])
                        if warning is not None:
                            log.warning(f"step {self.step}: {warning}")
                            emit({"step": self.step, "event": "warning", "reason": "energy_gap_drift",
                                  "cd": record["cd"], "message": warning, "elapsed_s": self.elapsed})  # fmt: skip
                    window, window_count, window_start = {}, 0, now

                # End of epoch: validate, samples, checkpoint (every checkpoint is also a healthy snapshot).
                # Stop and checkpoint decisions are or-ed over ranks: saving and evaluating are collectives.
                out_of_time, stop_now, checkpoint_due = self.dist.any(
                    budget is not None and self.elapsed >= budget,
                    stop.reason is not None,
                    time.monotonic() - last_ckpt > t.checkpoint_minutes * 60,
                )
                saved = False
                if self.step % steps_per_epoch == 0:
                    done_epochs = self.step // steps_per_epoch
                    val = self.evaluate("val")
                    record = {
                        "step": self.step,
                        "epoch": done_epochs,
                        "elapsed_s": self.elapsed,
                        **val,
                    }
                    emit(record)
                    log.info(f"epoch {done_epochs}: " + _format_record(val))
                    if done_epochs % t.sample_every == 0 and main:
                        self.sample_grids(f"epoch{done_epochs:03d}")
                    if done_epochs % t.checkpoint_every == 0 and not out_of_time:
                        self.save()
                        saved = True
                        last_ckpt = time.monotonic()
                elif checkpoint_due:
                    self.save()
                    saved = True
                    last_ckpt = time.monotonic()
                if saved or self.step % cfg.recovery.snapshot_every == 0 or self.recovery.snapshot_due:
                    self.recovery.take_snapshot(self)
                if out_of_time:
                    stop_reason = "time budget"
                    break
                if stop_now:
                    stop_reason = stop.reason or "terminated"  # the signal may have reached another rank only
                    log.info(f"{stop_reason} at step {self.step}; saving a checkpoint")
                    break
        except KeyboardInterrupt:
            # A second Ctrl-C, possibly half-way through an iteration: save the last healthy snapshot instead.
            # With several processes the ranks may be inside different collectives: exit without saving (the
            # last checkpoint stays the run's state).
            if self.dist.active:
                raise
            self.recovery.restore_snapshot(self)
            stop_reason = "interrupted"
            log.info(f"interrupted; saving the state of step {self.step}")
        finally:
            bar.close()

        # End: final checkpoint, metrics on val and test, sample grids.
        ckpt = self.save()
        final = {
            "stop_reason": stop_reason,
            **self.progress(),
            "epoch": self.step / steps_per_epoch,
            **self.evaluate("val"),
            **self.evaluate("test"),
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
        log.info(
            f"finished ({stop_reason}) after {self.step} steps, {self.elapsed / 60:.1f} min: "
            + _format_record({k: final[k] for k in final if k.endswith(("accuracy", "nll"))})
        )
        emit(
            {
                "step": self.step,
                "epoch": final["epoch"],
                "elapsed_s": self.elapsed,
                **{k: v for k, v in final.items() if isinstance(v, float)},
            }
        )
        if writer:
            writer.close()
        if self.run_dir is not None and main:
            # Sample grids only when the run ended by itself: after a signal the process is asked to exit now.
            done = stop_reason in ("epochs", "time budget")
            final["samples"] = [str(p) for p in self.sample_grids("final")] if done else []
            atomic_write_bytes(self.run_dir / "metrics.json", (json.dumps(final, indent=2) + "\n").encode())
            log.info(f"wrote {self.run_dir / 'metrics.json'} and sample grids in {self.run_dir / 'samples'}")
        if failure is not None:
            raise DivergenceError(failure)
        return final


def _throughput(record: dict[str, Any], global_batch: int, world: int) -> dict[str, float]:
    """Images/s (all ranks) and SGLD steps/s (chain batches per rank; chain-image steps over all ranks)."""
    rate = record["it_per_s"]
    out = {"images_per_s": rate * global_batch}
    if "sgld_steps" in record:
        out["sgld_steps_per_s"] = rate * record["sgld_steps"]
        out["sgld_image_steps_per_s"] = rate * record["sgld_chain_steps"] * world
    return out


def _count_lines(path: Path) -> int:
    if not path.is_file():
        return 0
    with open(path, "rb") as f:
        return sum(1 for _ in f)


def _metrics_lines_at(path: Path, recorded: Any) -> int | None:
    """Lines metrics.jsonl had when a checkpoint was written (None for checkpoints that did not record it)."""
    if recorded is None:
        return None
    return min(int(recorded), _count_lines(path))


def _format_record(record: dict[str, Any]) -> str:
    parts = []
    for key, value in record.items():
        if isinstance(value, float):
            parts.append(f"{key}={value:.4g}")
        else:
            parts.append(f"{key}={value}")
    return " ".join(parts)
