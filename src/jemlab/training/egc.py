"""The EGC side of the Trainer (SPEC S5): one optimisation step of the EGC loss, and the EMA weights.

`Trainer` holds one `EGCTraining` when ``objective.name=egc`` and hands it each batch together with what the step
works on (model, optimizer, noise generator, process group, divergence detector, config, iteration); everything
else (data, divergence recovery, checkpoints, logging, evaluation) is the Trainer's own. There is no replay buffer
and no SGLD: the objective draws its timesteps and noise from the Trainer's noise generator, which the checkpoints
already carry, so a resumed run repeats the same draws.

With ``egc.parameterisation=epsilon`` the same step trains the control of the comparison instead, a plain
ε-prediction diffusion model of the same UNet (`objectives.egc.epsilon_loss`: denoising loss only, no classifier).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from jemlab.accel import AUTOCAST_DTYPES, choose_precision
from jemlab.config import Config
from jemlab.distributed import DistEnv
from jemlab.generate.egc import schedule_from_config
from jemlab.objectives import EGCWeights, egc_loss, epsilon_loss
from jemlab.training.divergence import DivergenceDetector, raise_if_diverged
from jemlab.training.ema import EMA
from jemlab.training.optim import gradient_norm, learning_rate, set_learning_rate


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
            gamma=e.gamma,
            gamma_clean=e.gamma_clean,
            label_smoothing=e.label_smoothing,
            label_dropout=e.label_dropout,
            min_snr=e.min_snr,
            trunk_grad=e.ce_trunk_grad,
        )
        # EGC's loss, or the control's (egc.parameterisation=epsilon: ε̂ from the output head, no CE terms).
        self.loss_fn = epsilon_loss if e.parameterisation == "epsilon" else egc_loss
        self.device = next(model.parameters()).device  # the training device: batches move there
        self.autocast_dtype = AUTOCAST_DTYPES[choose_precision(e.precision, self.device, "egc.precision").value]
        self.ema = EMA(model, e.ema, warmup=e.ema_warmup)

    def train_step(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        *,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        generator: torch.Generator,
        env: DistEnv,
        detector: DivergenceDetector,
        config: Config,
        step: int,
        epoch: int,
    ) -> dict[str, float]:
        """One step: learning rate, EGC loss, divergence checks, backward, clip, update, EMA.

        Args:
            x, y: the batch (this rank's part).
            model: the network being trained (updated in place, then averaged into the EMA).
            optimizer: its optimizer.
            generator: the random source of the timesteps, noise and label dropout (on the training device).
            env: the process group (statistics and gradients are averaged over ranks).
            detector: checks the statistics and the gradient norm; raises `DivergenceDetected` before the update.
            config: the run's config now (learning rate and gradient clip).
            step: iterations done so far (0-based index of this one).
            epoch: the epoch this iteration belongs to (0-based).

        Returns:
            The iteration's statistics (learning rate, loss terms, gradient norm).
        """
        x, y = x.to(self.device), y.to(self.device)
        lr = learning_rate(config, step, epoch)
        set_learning_rate(optimizer, lr)
        model.train()
        loss, loss_stats = self.loss_fn(model, self.schedule, x, y, self.weights, generator, self.autocast_dtype)
        # Averaged over ranks before any check reads them (identity with one process): all ranks decide alike.
        stats = {"lr": lr, **env.mean({k: float(v) for k, v in loss_stats.items()})}
        raise_if_diverged(detector.check_step(step + 1, stats))
        # The control has no classifier; the Trainer's progress line still reads a training accuracy: NaN (logged
        # as "nan"), set after the divergence check, which would take a non-finite statistic for a divergence.
        stats.setdefault("train_accuracy", math.nan)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        params = [p for p in model.parameters() if p.requires_grad]
        env.average_gradients(params)  # several processes: the mean gradient, as DDP would give
        stats["grad_norm"] = gradient_norm(params, config.optim.grad_clip)  # before clipping
        raise_if_diverged(detector.check_gradients(step + 1, stats["grad_norm"]))
        optimizer.step()
        self.ema.update(model)
        return stats

    def state_dict(self) -> dict[str, Any]:
        return {"ema": self.ema.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.ema.load_state_dict(state["ema"])
