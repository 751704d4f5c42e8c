"""The EGC side of the Trainer (SPEC S5): one optimisation step of the EGC loss, and the EMA weights.

`Trainer` holds one `EGCTraining` when ``objective.name=egc`` and hands it each batch; everything else (data, the
optimiser and its schedule, divergence recovery, checkpoints, logging, evaluation) is the Trainer's own. There is
no replay buffer and no SGLD: the objective draws its timesteps and noise from the Trainer's noise generator, which
the checkpoints already carry, so a resumed run repeats the same draws.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from jemlab.accel import AUTOCAST_DTYPES, choose_precision
from jemlab.config import Config
from jemlab.generate.egc import schedule_from_config
from jemlab.objectives import EGCWeights, egc_loss
from jemlab.training.ema import EMA
from jemlab.training.recovery import gradient_norm

if TYPE_CHECKING:
    from jemlab.training.loop import Trainer


class EGCTraining:
    """Schedule, loss weights and EMA of an EGC run.

    Args:
        config: the run's config (its ``egc`` section).
        model: the EGC network being trained (the EMA starts as a copy of it).
    """

    def __init__(self, config: Config, model: torch.nn.Module) -> None:
        e = config.egc
        self.schedule = schedule_from_config(config)
        self.weights = EGCWeights(
            gamma=e.gamma, gamma_clean=e.gamma_clean, label_smoothing=e.label_smoothing, label_dropout=e.label_dropout
        )
        device = next(model.parameters()).device
        self.autocast_dtype = AUTOCAST_DTYPES[choose_precision(e.precision, device, "egc.precision").value]
        self.ema = EMA(model, e.ema, warmup=e.ema_warmup)

    def train_step(self, trainer: Trainer, x: torch.Tensor, y: torch.Tensor, epoch: int) -> dict[str, float]:
        """One step: learning rate, EGC loss, divergence checks, backward, clip, update, EMA."""
        from jemlab.training.loop import learning_rate  # local: loop imports this module

        cfg = trainer.config
        x, y = x.to(trainer.device), y.to(trainer.device)
        lr = learning_rate(cfg, trainer.step, epoch)
        for group in trainer.optimizer.param_groups:
            group["lr"] = lr
        trainer.model.train()
        loss, loss_stats = egc_loss(
            trainer.model, self.schedule, x, y, self.weights, trainer.noise_generator, self.autocast_dtype
        )
        # Averaged over ranks before any check reads them (identity with one process): all ranks decide alike.
        stats = {"lr": lr, **trainer.dist.mean({k: float(v) for k, v in loss_stats.items()})}
        trainer.check_divergence(stats)
        trainer.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        params = [p for p in trainer.model.parameters() if p.requires_grad]
        trainer.dist.average_gradients(params)  # several processes: the mean gradient, as DDP would give
        stats["grad_norm"] = gradient_norm(params, cfg.optim.grad_clip)  # before clipping
        trainer.check_gradients(stats["grad_norm"])
        trainer.optimizer.step()
        self.ema.update(trainer.model)
        trainer.step += 1
        return stats

    def state_dict(self) -> dict[str, Any]:
        return {"ema": self.ema.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.ema.load_state_dict(state["ema"])
