"""Generation from an EGC run: the noise estimate of the energy network, with the model's own classifier as guidance.

Unconditional: ε̂(x_t, t) = √(1 − ᾱ_t) ∇ₓE(x_t, t) (SPEC S5). Class-conditional for class y (classifier guidance,
Dhariwal & Nichol, 2021, with EGC's own classifier, Guo et al., 2023):

    ε̂(x_t, t | y) = √(1 − ᾱ_t) · (∇ₓE(x_t, t[, y]) − s · ∇ₓ log p(y | x_t, t))

with p(y | x_t, t) = softmax(f(x_t, t)) and guidance scale s; when the network is label-conditioned the energy
itself is the conditional one, E(x_t, t, y), and classifier-free guidance (Ho & Salimans, 2022) with weight w
(``egc.label_guidance``) replaces it by

    E_w(x_t, t, y) = E(x_t, t) + w · (E(x_t, t, y) − E(x_t, t))

(w = 1: the conditional energy itself; w > 1 moves further from the label-free energy). All gradients come from
one backward pass of their sum.

The control of the comparison (``egc.parameterisation=epsilon``, a plain ε-prediction diffusion model of the same
UNet) goes through the same DDIM/DDPM loop with ε̂(x_t, t[, y]) read off its output head; its class-conditional
samples come from its label conditioning, with the same classifier-free weight w on its two ε̂. It has no
classifier, so classifier guidance is an error for it.

This is the run-level glue (config, weights, devices, random sources); the maths it drives (schedule, DDIM/DDPM
loop) is `jemlab.diffusion`, which knows no run.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from jemlab.config import Config
from jemlab.diffusion.samplers import sample, sampler_eta, timestep_subsequence
from jemlab.diffusion.schedule import NoiseSchedule
from jemlab.errors import JemlabError
from jemlab.generate.seeds import SampleGenerators, draw_seeds
from jemlab.sampling import frozen

if TYPE_CHECKING:
    from jemlab.generate import SamplingSource


def schedule_from_config(config: Config) -> NoiseSchedule:
    """The run's noise schedule (egc.schedule, egc.timesteps)."""
    return NoiseSchedule(config.egc.schedule, config.egc.timesteps)


def langevin_at_t0(config: Config, model: Any) -> tuple[float, float]:
    """(step size α, noise σ) of Langevin dynamics on EGC's t = 0 density, for the SGLD-refinement defence.

    The t = 0 energy is trained at noise level σ_0 = √(1 − ᾱ_0) (0.01 for the linear schedule), where ∇ₓE is of
    order 1/σ_0; JEM's cold α = 1 would throw images far outside [−1, 1]. The textbook step α = σ_0²/2 with noise
    σ_0 samples that density instead. The step is returned for `model.energy(x)`, which is E(x, 0) itself or, with
    ``model.energy_scale=sigma``, σ_0·E(x, 0) (`energy_to_t0_scale`). With ``model.energy_base=gaussian`` the
    base's own drift, α·x ≈ 5·10⁻⁵·x per step, is left out (`energy(x)` is the network's part only).
    """
    sigma0 = float((1 - schedule_from_config(config).alpha_bar[0]).sqrt())
    return sigma0**2 / 2 * model.energy_to_t0_scale(sigma0), sigma0


def check_guidance(model: Any, labels: torch.Tensor | None, guidance: float, label_guidance: float = 1.0) -> None:
    """Refuse, in one line, classifier guidance for a model without a classifier (the ε-prediction control) and a
    classifier-free weight other than 1 for a network without label conditioning."""
    if labels is not None and guidance > 0 and not getattr(model, "has_classifier", True):
        raise JemlabError(
            f"classifier guidance (scale {guidance:g}) needs the model's own classifier, and this run is the plain "
            f"ε-prediction control (egc.parameterisation=epsilon), which has none: sample it with --guidance 0"
        )
    if labels is not None and label_guidance != 1 and getattr(model, "label_embed", None) is None:
        raise JemlabError(
            f"classifier-free guidance (weight {label_guidance:g}) needs a label-conditioned network, and this run "
            f"was trained without label conditioning: sample it with --label-guidance 1 and use --guidance"
        )


def guided_eps(
    model: Any,
    x: torch.Tensor,
    t: torch.Tensor,
    sigma: torch.Tensor,
    labels: torch.Tensor | None = None,
    guidance: float = 0.0,
    label_guidance: float = 1.0,
) -> torch.Tensor:
    """ε̂ for unconditional (labels None) or class-conditional sampling with classifier and classifier-free guidance.

    Args:
        model: an EGC network (`logit_map`, `map_and_logits`, `energy_from_map`, `label_embed`).
        x: (N, C, H, W) noisy images.
        t: (N,) timesteps.
        sigma: √(1 − ᾱ_t) broadcastable to x.
        labels: (N,) classes, or None.
        guidance: scale s of ∇ₓ log p(y | x_t, t).
        label_guidance: classifier-free weight w of a label-conditioned network (1: its conditional energy alone).

    Returns:
        ε̂, detached, shaped like x.
    """
    if labels is None:
        return model.eps(x, t, sigma)
    check_guidance(model, labels, guidance, label_guidance)
    conditional = getattr(model, "label_embed", None) is not None
    if not getattr(model, "has_classifier", True):  # the control: its label-conditioned ε̂, no classifier
        eps = model.eps(x, t, sigma, labels if conditional else None)
        return eps if label_guidance == 1 else torch.lerp(model.eps(x, t, sigma), eps, label_guidance)
    with torch.enable_grad():
        x_in = x.detach().requires_grad_(True)
        # the label-free pass: what the classifier reads, and the other end of classifier-free guidance
        free = not conditional or guidance > 0 or label_guidance != 1
        m_free, logits_free = None, None
        if guidance > 0:  # the classifier is read: map and logits from one pass of the trunk
            m_free, logits_free = model.map_and_logits(x_in, t)
        elif free:
            m_free = model.logit_map(x_in, t)
        m = model.logit_map(x_in, t, labels) if conditional else m_free
        objective = model.energy_from_map(m).sum()
        if conditional and label_guidance != 1:
            objective = torch.lerp(model.energy_from_map(m_free).sum(), objective, label_guidance)
        if guidance > 0:
            log_py = F.log_softmax(logits_free.float(), dim=1).gather(1, labels.view(-1, 1))
            objective = objective - guidance * (model.guidance_weight(sigma) * log_py.reshape(-1)).sum()
        (grad,) = torch.autograd.grad(objective, x_in)
    return model.noise_from_gradient(grad, sigma, x).detach()


def generate_egc(
    source: SamplingSource,
    n: int,
    *,
    labels: torch.Tensor | None = None,
    steps: int | None = None,
    generator: torch.Generator | None = None,
    batch_size: int = 256,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Draw n samples from an EGC run with its configured sampler (DDIM or DDPM) and guidance.

    Uses the EMA weights: a Trainer's ``eval_model``, or a loaded run's model (loaded from the EMA weights). Sample i
    draws x_T and its per-step noise from its own generator, seeded from `generator` and i (`seeds.py`), so it does
    not depend on `batch_size` or on n.

    Args:
        source: a Trainer or a loaded run of an EGC config.
        n: number of samples.
        labels: (n,) classes for class-conditional samples, or None.
        steps: sampler steps (default egc.sample_steps).
        generator: random source (CPU or the model's device) of the per-sample seeds; fixed seed → same samples.
        batch_size: images denoised at once.

    Returns:
        (images in [−1, 1] on the CPU, protocol dict).
    """
    cfg = source.config.egc
    if labels is not None and len(labels) != n:
        raise JemlabError(f"got {len(labels)} labels for {n} samples")
    model = getattr(source, "eval_model", None)  # a Trainer's EMA weights; a loaded run's model already holds them
    model = source.model if model is None else model
    check_guidance(model, labels, cfg.guidance, cfg.label_guidance)
    schedule = schedule_from_config(source.config)
    steps = cfg.sample_steps if steps is None else steps
    eta = sampler_eta(cfg.sampler, cfg.eta)
    shape = tuple(source.image_shape) if hasattr(source, "image_shape") else tuple(source.splits.image_shape)
    generators = SampleGenerators.seeded(draw_seeds(generator)[0], n, source.device)
    was_training = model.training
    model.eval()
    out = []
    with frozen(model):
        for i in range(0, n, batch_size):
            rows = generators[i : i + batch_size]
            chunk_labels = None if labels is None else labels[i : i + batch_size].to(source.device)

            def eps_fn(x: torch.Tensor, t: torch.Tensor, chunk_labels=chunk_labels) -> torch.Tensor:
                return guided_eps(model, x, t, schedule.sigma(t, x), chunk_labels, cfg.guidance, cfg.label_guidance)

            x_T = rows.randn(shape)  # (b, C, H, W), then each sample's step noise from the same generator
            x = sample(eps_fn, schedule, x_T, steps=steps, eta=eta, clip_x0=cfg.clip_x0, randn_like=rows.randn_like)
            out.append(x.clamp(-1, 1).float().cpu())
    model.train(was_training)
    protocol = {
        "init": "noise",
        "parameterisation": cfg.parameterisation,  # energy (EGC) or epsilon (the plain diffusion control)
        "sampler": cfg.sampler,
        "steps": steps,
        "eta": eta,
        "step_size": None,
        "noise": None,
        "guidance": cfg.guidance if labels is not None else 0.0,
        "label_guidance": cfg.label_guidance if labels is not None else 1.0,
        "schedule": f"{cfg.schedule}, T={cfg.timesteps}",
        "weights": "ema",
        "conditional": labels is not None,
        "n": n,
    }
    return torch.cat(out).contiguous(), protocol


def denoise_segment(
    model: Any,
    config: Config,
    x: torch.Tensor,
    start: int,
    stop: int,
    *,
    labels: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    sample_steps: int | None = None,
) -> torch.Tensor:
    """Positions `start` … `stop` − 1 of the run's sampler (`sample_steps`, default ``egc.sample_steps``, steps
    from x_T to an image), for callers that show a chain as it goes (``jemlab sample --animate``, ``jemlab serve``).

    Positions past the end leave x unchanged; the segment that takes the last step clamps the image to [−1, 1].
    Runs on x's device; the per-step noise (DDPM, or DDIM with η > 0) comes from `generator` (CPU) and is moved
    there.
    """
    cfg = config.egc
    check_guidance(model, labels, cfg.guidance, cfg.label_guidance)
    schedule = schedule_from_config(config)
    steps = sample_steps or cfg.sample_steps
    eta = sampler_eta(cfg.sampler, cfg.eta)

    def eps_fn(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return guided_eps(model, x_t, t, schedule.sigma(t, x_t), labels, cfg.guidance, cfg.label_guidance)

    def randn_like(x_t: torch.Tensor) -> torch.Tensor:
        return torch.randn(x_t.shape, generator=generator).to(x_t.device)

    with frozen(model):
        x = sample(
            eps_fn,
            schedule,
            x,
            steps=steps,
            eta=eta,
            clip_x0=cfg.clip_x0,
            randn_like=randn_like,
            start=start,
            stop=stop,
        )
    ends = len(timestep_subsequence(schedule.timesteps, steps))
    return x.clamp(-1, 1) if max(start, 0) < ends <= stop else x


def renoise_position(config: Config, x0: torch.Tensor, fraction_left: float, generator: torch.Generator):
    """Noise clean images to the sampler position where `fraction_left` of the steps remain (SDEdit, Meng et al.,
    2022); returns (x_t, position)."""
    schedule = schedule_from_config(config)
    taus = timestep_subsequence(schedule.timesteps, config.egc.sample_steps).tolist()
    position = min(len(taus) - 1, round((1 - fraction_left) * len(taus)))
    ab = float(schedule.alpha_bar[taus[position]])
    return ab**0.5 * x0 + (1 - ab) ** 0.5 * torch.randn(x0.shape, generator=generator), position
