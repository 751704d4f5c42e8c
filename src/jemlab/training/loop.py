"""The training loop: the only place that knows the data, the model, the sampler and the objective at once.

`Trainer.fit` reads top to bottom in stages: set-up, resume, then per iteration (batch → negatives → loss → step →
log), per epoch (validate → samples → checkpoint), and the end (final checkpoint, test metrics, sample grids).
"""

from __future__ import annotations

import json
import math
import subprocess
import time
from pathlib import Path
from typing import Any

import torch

from jemlab.config import Config, validate_config
from jemlab.data import ArrayDataset, DatasetSplits, RandomBatcher, load_dataset
from jemlab.errors import ConfigError, DivergenceError
from jemlab.images import save_grid
from jemlab.models import EnergyModel, build_model
from jemlab.objectives import JEMWeights, jem_loss
from jemlab.samplers import ReplayBuffer
from jemlab.samplers.init import initializer_from_config, initializer_state
from jemlab.sampling import run_chains
from jemlab.training.checkpoint import load_checkpoint, save_run_checkpoint
from jemlab.training.logging import MetricsWriter, progress_bar, setup_logger


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
        self.device = resolve_device(t.device)
        torch.manual_seed(t.seed)  # model initialisation

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
        self.batcher = RandomBatcher(self.splits.train, t.batch_size, seed=t.seed)

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
        self.weights = JEMWeights(
            ce=config.objective.ce,
            px=config.objective.px,
            pxy=config.objective.pxy,
            energy_l2=config.objective.energy_l2,
        )

        # Sampler state: the replay buffer (CPU) and two random sources, one for buffer draws and one for the
        # Langevin and input noise on the training device. Each is seeded from the run seed.
        s = config.sampler
        self.cpu_generator = torch.Generator().manual_seed(t.seed + 1)
        self.noise_generator = torch.Generator(device=self.device).manual_seed(t.seed + 2)
        # The chain initialiser; a data-fitted one (JEM++ class Gaussians) is fitted here and saved in checkpoints.
        self.init = initializer_from_config(
            s, self.splits.image_shape, data=self.splits.train, num_classes=self.splits.num_classes
        )
        self.buffer: ReplayBuffer | None = None
        if s.persistent and (self.weights.px > 0 or self.weights.pxy > 0):
            self.buffer = ReplayBuffer(
                s.buffer_size,
                self.splits.image_shape,
                self.init,
                reinit_prob=s.reinit_prob,
                mode=s.buffer_mode,
                num_classes=self.splits.num_classes,
                class_conditional=s.class_conditional,
                initial_size=s.batch_size or t.batch_size,
                generator=self.cpu_generator,
            )

        self.step = 0
        self.elapsed = 0.0  # training seconds, carried over on resume
        self.last_negatives: torch.Tensor | None = None

    # --- state ---------------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue the run exactly."""
        return {
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

    def progress(self) -> dict[str, Any]:
        return {"step": self.step, "epoch": self.batcher.epoch, "elapsed_s": self.elapsed}

    def save(self) -> Path | None:
        """Write a checkpoint into the run directory (atomic; keeps the newest few)."""
        if self.run_dir is None:
            return None
        meta = {"config": self.config.to_dict(), "progress": self.progress(), "git_sha": git_sha()}
        meta["dataset"] = {
            "name": self.splits.name,
            "image_shape": list(self.splits.image_shape),
            "num_classes": self.splits.num_classes,
            "class_names": list(self.splits.class_names),
        }
        return save_run_checkpoint(
            self.run_dir,
            self.step,
            self.state_dict(),
            meta,
            keep=self.config.train.keep_checkpoints,
        )

    def resume(self, path: str | Path) -> dict[str, Any]:
        """Load a checkpoint of this run (same config) and continue from its next iteration."""
        state, meta = load_checkpoint(path)
        self.load_state_dict(state)
        progress = meta["progress"]
        self.step = int(progress["step"])
        self.elapsed = float(progress["elapsed_s"])
        return meta

    # --- one iteration -------------------------------------------------------------------------------------------

    def negatives(self, n: int) -> tuple[torch.Tensor, dict[str, float]]:
        """Draw n SGLD samples of p(x): from the replay buffer (persistent) or from fresh noise (short-run)."""
        s = self.config.sampler
        if self.buffer is not None:
            draw = self.buffer.sample(n, generator=self.cpu_generator)
            x_init = draw.x
        else:
            draw, x_init = None, self.init(n, None, self.cpu_generator)
        x, stats = run_chains(
            self.model,
            x_init.to(self.device),
            s,
            generator=self.noise_generator,
            channels_last=self.config.train.channels_last,
        )
        if draw is not None:
            self.buffer.update(draw, x)
        return x, {"sgld_grad_norm": stats.grad_norm}

    def conditional_negatives(self, y: torch.Tensor) -> torch.Tensor:
        """SGLD samples of p(x|y) for the classes y, from the class-partitioned buffer when there is one."""
        if self.buffer is not None and self.buffer.class_conditional:
            draw = self.buffer.sample(len(y), labels=y.cpu(), generator=self.cpu_generator)
            x_init = draw.x
        else:
            draw, x_init = None, self.init(len(y), y.cpu(), self.cpu_generator)
        x, _ = run_chains(
            self.model,
            x_init.to(self.device),
            self.config.sampler,
            labels=y,
            generator=self.noise_generator,
            channels_last=self.config.train.channels_last,
        )
        if draw is not None:
            self.buffer.update(draw, x)
        return x

    def train_step(self, x: torch.Tensor, y: torch.Tensor, epoch: int) -> dict[str, float]:
        """One optimisation step on a batch: negatives, loss, backward, update."""
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
            self.last_negatives = x_model
        x_cond = y_cond = None
        if self.weights.pxy > 0:
            y_cond = y[:n_neg]
            x_cond = self.conditional_negatives(y_cond)
        if cfg.objective.input_noise > 0:
            noise = torch.randn(x.shape, generator=self.noise_generator, device=x.device)
            x = x + cfg.objective.input_noise * noise

        self.model.train()
        loss, loss_stats = jem_loss(self.model, x, y, x_model, self.weights, x_cond, y_cond)
        self.check_divergence(loss, loss_stats)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.optim.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.optim.grad_clip)
        self.optimizer.step()
        self.step += 1
        stats.update({k: float(v) for k, v in loss_stats.items()})
        return stats

    def check_divergence(self, loss: torch.Tensor, stats: dict[str, torch.Tensor]) -> None:
        """Stop before a non-finite or exploding loss reaches the weights (the last checkpoint stays good)."""
        bound = self.config.train.max_abs_energy
        energies = [float(stats[k]) for k in ("energy_data", "energy_model") if k in stats]
        if math.isfinite(float(loss.detach())) and all(abs(e) <= bound for e in energies):
            return
        detail = ", ".join(f"{k}={float(v):.4g}" for k, v in stats.items())
        raise DivergenceError(
            f"training diverged at step {self.step} ({detail}); resume from the last checkpoint with "
            f"--resume and a lower optim.lr or sampler.step_size, or a higher objective.energy_l2"
        )

    # --- evaluation and samples ----------------------------------------------------------------------------------

    def evaluate(self, split: str) -> dict[str, float]:
        """Cross-entropy and accuracy of the classifier on the val or test split."""
        return evaluate_split(self.model, getattr(self.splits, split), self.device, prefix=split)

    def sample_grids(self, tag: str) -> list[Path]:
        """Save the current negatives (unconditional) and one row of conditional samples per class."""
        if self.run_dir is None or (self.weights.px == 0 and self.weights.pxy == 0):
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

        Args:
            resume_from: checkpoint file or run directory to continue from.
            log_file: an extra file that receives the log (besides run_dir/train.log).

        Returns:
            The final metrics (also written to run_dir/metrics.json).
        """
        cfg, t = self.config, self.config.train
        log = setup_logger(self.run_dir, extra_file=log_file)
        writer = None
        if self.run_dir is not None:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.json").write_text(cfg.to_json() + "\n")
            writer = MetricsWriter(self.run_dir, tensorboard=t.tensorboard)

        # Resume: model, optimizer, buffer, batcher position and RNG states continue exactly.
        if resume_from is not None:
            self.resume(resume_from)
            log.info(f"resumed from {resume_from} at step {self.step}, epoch {self.batcher.epoch}")

        steps_per_epoch = len(self.batcher)
        total_steps = steps_per_epoch * t.epochs
        budget = None if t.minutes is None else t.minutes * 60.0
        n_params = sum(p.numel() for p in self.model.parameters())
        log.info(
            f"jemlab: preset={cfg.preset} dataset={self.splits.name} model={cfg.model.name} "
            f"({n_params / 1e6:.2f}M params) device={self.device} threads={torch.get_num_threads()} "
            f"train={len(self.splits.train)} val={len(self.splits.val)} steps/epoch={steps_per_epoch} "
            f"budget={'none' if budget is None else f'{t.minutes:g} min'} run_dir={self.run_dir}"
        )

        started = time.monotonic() - self.elapsed
        last_ckpt = time.monotonic()
        window: dict[str, float] = {}
        window_count, window_start = 0, time.monotonic()
        stop_reason = "epochs"
        bar = progress_bar(total_steps, t.progress, initial=self.step)
        try:
            while self.step < total_steps:
                # Batch (the batcher rolls over to a new epoch by itself).
                epoch = self.step // steps_per_epoch
                x, y = self.batcher.next_batch()
                stats = self.train_step(x, y, epoch)
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
                    if self.buffer is not None:
                        record["buffer_mean"] = float(self.buffer.images.mean())
                        record["buffer_std"] = float(self.buffer.images.std())
                    if writer:
                        writer.write(record)
                    bar.set_postfix(loss=f"{record['loss']:.3f}", acc=f"{record['train_accuracy']:.3f}")
                    log.info(_format_record(record))
                    window, window_count, window_start = {}, 0, now

                # End of epoch: validate, samples, checkpoint.
                out_of_time = budget is not None and self.elapsed >= budget
                if self.step % steps_per_epoch == 0:
                    done_epochs = self.step // steps_per_epoch
                    val = self.evaluate("val")
                    record = {
                        "step": self.step,
                        "epoch": done_epochs,
                        "elapsed_s": self.elapsed,
                        **val,
                    }
                    if writer:
                        writer.write(record)
                    log.info(f"epoch {done_epochs}: " + _format_record(val))
                    if done_epochs % t.sample_every == 0:
                        self.sample_grids(f"epoch{done_epochs:03d}")
                    if done_epochs % t.checkpoint_every == 0 and not out_of_time:
                        self.save()
                        last_ckpt = time.monotonic()
                elif time.monotonic() - last_ckpt > t.checkpoint_minutes * 60:
                    self.save()
                    last_ckpt = time.monotonic()
                if out_of_time:
                    stop_reason = "time budget"
                    break
        except KeyboardInterrupt:
            stop_reason = "interrupted"
            log.info(f"interrupted at step {self.step}; saving a checkpoint")
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
            "checkpoint": None if ckpt is None else str(ckpt),
            "git_sha": git_sha(),
            "torch_version": torch.__version__,
        }
        log.info(
            f"finished ({stop_reason}) after {self.step} steps, {self.elapsed / 60:.1f} min: "
            + _format_record({k: final[k] for k in final if k.endswith(("accuracy", "nll"))})
        )
        if writer:
            writer.write(
                {
                    "step": self.step,
                    "epoch": final["epoch"],
                    "elapsed_s": self.elapsed,
                    **{k: v for k, v in final.items() if isinstance(v, float)},
                }
            )
            writer.close()
        if self.run_dir is not None:
            final["samples"] = [str(p) for p in self.sample_grids("final")]
            (self.run_dir / "metrics.json").write_text(json.dumps(final, indent=2) + "\n")
            log.info(f"wrote {self.run_dir / 'metrics.json'} and sample grids in {self.run_dir / 'samples'}")
        return final


def _format_record(record: dict[str, Any]) -> str:
    parts = []
    for key, value in record.items():
        if isinstance(value, float):
            parts.append(f"{key}={value:.4g}")
        else:
            parts.append(f"{key}={value}")
    return " ".join(parts)
