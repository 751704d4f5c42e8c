"""What the demo page can ask a model to do, one small function per action, behind one interface.

The page needs four things from a model: classify an image and give its energy (``predict``), start chains
(``start``), move chains a few steps along the model's sampler (``advance``; used for "refine" and for the live
chains) and the starting point of a "refine" (``refine_start``). ``ModelActions`` bundles them. A JEM provides them
through SGLD on E(x) or E(x, y), whose chains are plain images; EGC (SPEC S5) provides them with its diffusion
sampler, whose chains are noisy images x_t at a position of the DDIM schedule: those are kept on the server
(``stateful``) because they are not images in [−1, 1] and would not survive the page's 8-bit round trip. A model
family registers a factory in ``ACTION_FACTORIES`` under its model kind. Nothing here knows about HTTP.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from jemlab.errors import JemlabError
from jemlab.sampling import run_chains
from jemlab.typicality import Prediction, predict_with_gradient


@dataclass
class ModelActions:
    """The model-specific half of the demo server.

    Attributes:
        kind: model family shown on the page ("jem", "egc", ...).
        image_shape: (C, H, W) of the model's images.
        class_names: one name per class.
        predict: images (N, C, H, W) in [−1, 1] → Prediction.
        start: (n, labels or None, generator) → starting points (n, C, H, W) for chains "from noise".
        advance: (x, labels or None, steps, generator, position) → x after `steps` more sampler steps (CPU);
            `position` is the number of steps the chain has made (diffusion samplers need it; SGLD ignores it).
        describe: a short protocol of the sampler, shown on the page.
        refine_start: drawing x (1, C, H, W) and generator → (chain state, position, most steps left or None).
        stateful: chain states are not displayable images (kept on the server between live-view requests).
    """

    kind: str
    image_shape: tuple[int, int, int]
    class_names: list[str]
    predict: Callable[[torch.Tensor], Prediction]
    start: Callable[[int, torch.Tensor | None, torch.Generator], torch.Tensor]
    advance: Callable[[torch.Tensor, torch.Tensor | None, int, torch.Generator, int], torch.Tensor]
    describe: dict[str, Any]
    refine_start: Callable[[torch.Tensor, torch.Generator], tuple[torch.Tensor, int, int | None]] = (
        lambda x, generator: (x, 0, None)
    )
    stateful: bool = False


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
        return predict_with_gradient(model, x, device)

    def start(n: int, labels: torch.Tensor | None, generator: torch.Generator) -> torch.Tensor:
        return run.init(n, labels, generator).float().cpu()

    def advance(
        x: torch.Tensor, labels: torch.Tensor | None, steps: int, generator: torch.Generator, position: int = 0
    ) -> torch.Tensor:
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


def egc_actions(run: Any, refine_fraction: float = 0.4) -> ModelActions:
    """The actions of an EGC run: DDIM/DDPM along the run's schedule with its classifier guidance.

    A chain from noise starts at x_T ~ N(0, I) (position 0) and ends after ``egc.sample_steps`` steps at an image;
    further steps leave it unchanged. "Refine" noises the drawing to the schedule position where a fraction
    `refine_fraction` of the steps is left (t ≈ 0.4·T by default) and denoises it from there (SDEdit, Meng et al.,
    2022): the model redraws what it reads in the sketch. Predictions read the t = 0 classifier and energy.
    """
    from jemlab.diffusion.samplers import sampler_eta
    from jemlab.generate.egc import denoise_segment, renoise_position

    jem = jem_actions(run)  # predict: the t = 0 logits and energy, as for a JEM
    model, device, config, cfg = run.model, run.device, run.config, run.config.egc
    eta = sampler_eta(cfg.sampler, cfg.eta)

    def start(n: int, labels: torch.Tensor | None, generator: torch.Generator) -> torch.Tensor:
        return torch.randn((n, *run.image_shape), generator=generator)

    def advance(
        x: torch.Tensor, labels: torch.Tensor | None, steps: int, generator: torch.Generator, position: int = 0
    ) -> torch.Tensor:
        y = None if labels is None else labels.to(device)
        x = denoise_segment(model, config, x.to(device), position, position + steps, labels=y, generator=generator)
        return x.float().cpu().contiguous()

    def refine_start(x: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, int, int | None]:
        noisy, position = renoise_position(config, x, refine_fraction, generator)
        return noisy, position, cfg.sample_steps - position

    return ModelActions(
        kind="egc",
        image_shape=run.image_shape,
        class_names=run.class_names,
        predict=jem.predict,
        start=start,
        advance=advance,
        describe={
            "sampler": cfg.sampler.upper(),
            "steps": cfg.sample_steps,
            "eta": eta,
            "guidance": cfg.guidance,
            "label_guidance": cfg.label_guidance,
            "schedule": f"{cfg.schedule}, T = {cfg.timesteps}",
            "init": "N(0, I) noise",
        },
        refine_start=refine_start,
        stateful=True,
    )


# Model kind → factory; `model_kind` decides which one a run gets.
ACTION_FACTORIES: dict[str, Callable[[Any], ModelActions]] = {"jem": jem_actions, "egc": egc_actions}


def model_kind(run: Any) -> str:
    """The model family of a loaded run: the checkpoint's ``kind`` metadata or config field, "egc" for runs of the
    EGC objective, else "jem"."""
    kind = run.meta.get("kind") if isinstance(getattr(run, "meta", None), dict) else None
    kind = kind or getattr(run.config.model, "kind", None)
    if kind is None and getattr(getattr(run.config, "objective", None), "name", "jem") == "egc":
        kind = "egc"
    return str(kind or "jem")


def build_actions(run: Any) -> ModelActions:
    """Pick the actions for a run by its model kind; an unknown kind is an error that lists the known ones."""
    kind = model_kind(run)
    if kind not in ACTION_FACTORIES:
        known = ", ".join(ACTION_FACTORIES)
        raise JemlabError(f"the demo server has no actions for model kind '{kind}'; known: {known}")
    return ACTION_FACTORIES[kind](run)
