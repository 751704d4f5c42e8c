"""What the demo page can ask a model to do, one small function per action, behind one interface.

The page needs four things from a model: classify an image and give its energy (``predict``), start chains
(``start``), move chains a few steps along the model's sampler (``advance``; used for "refine" and for the live
chains) and the scores the OOD verdict ranks against (``ood_scores``). ``ModelActions`` bundles them. A JEM provides
them through SGLD on E(x) or E(x, y); a diffusion classifier such as EGC (SPEC S5) provides the same four with its
own sampler and registers a factory in ``ACTION_FACTORIES`` under its model kind. Nothing here knows about HTTP.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from jemlab.errors import JemlabError
from jemlab.sampling import frozen, run_chains


@dataclass
class Prediction:
    """One batch of predictions: p(y|x) (N, C), energies E(x) (N,) and input-gradient norms ‖∇ₓE(x)‖ (N,)."""

    probs: torch.Tensor
    energy: torch.Tensor
    grad_norm: torch.Tensor


@dataclass
class ModelActions:
    """The model-specific half of the demo server.

    Attributes:
        kind: model family shown on the page ("jem", "egc", ...).
        image_shape: (C, H, W) of the model's images.
        class_names: one name per class.
        predict: images (N, C, H, W) in [−1, 1] → Prediction.
        start: (n, labels or None, generator) → starting points (n, C, H, W) for chains "from noise".
        advance: (x, labels or None, steps, generator) → x after `steps` more sampler steps (CPU, in [−1, 1]).
        describe: a short protocol of the sampler, shown on the page.
    """

    kind: str
    image_shape: tuple[int, int, int]
    class_names: list[str]
    predict: Callable[[torch.Tensor], Prediction]
    start: Callable[[int, torch.Tensor | None, torch.Generator], torch.Tensor]
    advance: Callable[[torch.Tensor, torch.Tensor | None, int, torch.Generator], torch.Tensor]
    describe: dict[str, Any]


def jem_actions(run: Any) -> ModelActions:
    """The actions of a JEM-style run (any model with ``logits_and_energy`` and ``joint_energy``).

    Args:
        run: a ``jemlab.run.LoadedRun``.

    Returns:
        ModelActions whose chains are the run's own SGLD (its config's step size, noise, clipping and precision).
    """
    model, device, cfg = run.model, run.device, run.config.sampler
    channels_last = run.config.train.channels_last

    def predict(x: torch.Tensor) -> Prediction:
        x = x.to(device).requires_grad_(True)
        with frozen(model), torch.enable_grad():  # the gradient with respect to the input only
            logits, energy = model.logits_and_energy(x)
            (grad,) = torch.autograd.grad(energy.sum(), x)
        return Prediction(
            probs=logits.detach().float().softmax(1).cpu(),
            energy=energy.detach().float().cpu(),
            grad_norm=grad.flatten(1).norm(dim=1).float().cpu(),
        )

    def start(n: int, labels: torch.Tensor | None, generator: torch.Generator) -> torch.Tensor:
        return run.init(n, labels, generator).float().cpu()

    def advance(x: torch.Tensor, labels: torch.Tensor | None, steps: int, generator: torch.Generator) -> torch.Tensor:
        if steps == 0:
            return x.clone()
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        noise_gen = torch.Generator(device=device).manual_seed(seed)
        out, _ = run_chains(
            model,
            x.to(device),
            cfg,
            labels=None if labels is None else labels.to(device),
            steps=steps,
            generator=noise_gen,
            channels_last=channels_last,
        )
        return out.float().cpu().contiguous()

    return ModelActions(
        kind="jem",
        image_shape=run.image_shape,
        class_names=run.class_names,
        predict=predict,
        start=start,
        advance=advance,
        describe={
            "sampler": "SGLD",
            "step_size": cfg.step_size,
            "noise": cfg.noise,
            "grad_clamp": cfg.grad_clamp,
            "init": cfg.init,
            "train_steps": cfg.steps,
        },
    )


# Model kind → factory. A new model family (EGC) adds its entry here; `model_kind` decides which one a run gets.
ACTION_FACTORIES: dict[str, Callable[[Any], ModelActions]] = {"jem": jem_actions}


def model_kind(run: Any) -> str:
    """The model family of a loaded run: the checkpoint's ``kind`` metadata or config field, else "jem"."""
    kind = run.meta.get("kind") if isinstance(getattr(run, "meta", None), dict) else None
    kind = kind or getattr(run.config.model, "kind", None)
    return str(kind or "jem")


def build_actions(run: Any) -> ModelActions:
    """Pick the actions for a run by its model kind; an unknown kind is an error that lists the known ones."""
    kind = model_kind(run)
    if kind not in ACTION_FACTORIES:
        known = ", ".join(ACTION_FACTORIES)
        raise JemlabError(f"the demo server has no actions for model kind '{kind}'; known: {known}")
    return ACTION_FACTORIES[kind](run)
