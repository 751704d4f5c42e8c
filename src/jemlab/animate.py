"""Sampling chains as animations: the chain recorded every few steps, written as an animated GIF (Pillow).

``record_chain`` starts chains the way ``generate`` does (buffer or initialiser, per class when labels are given)
and runs the same sampler in chunks, keeping a grid image after each chunk. It does not touch the run's buffer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from jemlab.errors import JemlabError
from jemlab.generate import SamplingSource, generate
from jemlab.images import make_grid
from jemlab.sampling import run_chains


def record_chain(
    source: SamplingSource,
    n: int,
    *,
    labels: torch.Tensor | None = None,
    steps: int | None = None,
    frames: int = 20,
    init: str = "auto",
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, list[torch.Tensor], dict[str, Any]]:
    """Run chains and keep snapshots of them along the way.

    Args:
        source: a Trainer or a loaded run.
        n: number of chains.
        labels: (n,) classes for p(x|y) chains, or None for p(x).
        steps: SGLD steps in total (default: the run's sampler.steps).
        frames: snapshots after the start (the steps are split evenly over them; at most `steps`).
        init: "auto", "buffer" or "noise", as in ``generate``.
        generator: random source (CPU) for the starting points and the Langevin noise.

    Returns:
        (final images, snapshots including the start, protocol); images in [−1, 1] on the CPU.
    """
    if frames < 1:
        raise JemlabError(f"frames must be >= 1, got {frames}")
    generator = generator or torch.Generator().manual_seed(0)
    if source.config.objective.name == "egc":
        return _record_diffusion(source, n, labels, steps, frames, generator)
    cfg = source.config.sampler
    steps = cfg.steps if steps is None else steps
    x, protocol = generate(source, n, labels=labels, steps=0, init=init, generator=generator)  # starting points
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    noise_gen = torch.Generator(device=source.device).manual_seed(seed)
    frames = max(1, min(frames, steps))
    chunks = [steps // frames + (1 if i < steps % frames else 0) for i in range(frames)]
    snapshots = [x.clone()]
    for chunk in chunks:
        if chunk == 0:
            continue
        out, _ = run_chains(
            source.model,
            x.to(source.device),
            cfg,
            labels=None if labels is None else labels.to(source.device),
            steps=chunk,
            generator=noise_gen,
            channels_last=source.config.train.channels_last,
        )
        x = out.float().cpu().contiguous()
        snapshots.append(x.clone())
    return x, snapshots, {**protocol, "steps": steps, "frames": len(snapshots)}


def _record_diffusion(
    source: SamplingSource,
    n: int,
    labels: torch.Tensor | None,
    steps: int | None,
    frames: int,
    generator: torch.Generator,
) -> tuple[torch.Tensor, list[torch.Tensor], dict[str, Any]]:
    """An EGC run's chain: x_T ~ N(0, I) denoised by its sampler, the noisy x_t shown clamped to [−1, 1]."""
    from jemlab.generate.egc import denoise_segment

    cfg = source.config.egc
    steps = cfg.sample_steps if steps is None else steps
    shape = tuple(source.image_shape) if hasattr(source, "image_shape") else tuple(source.splits.image_shape)
    model = getattr(source, "eval_model", None)
    model = source.model if model is None else model
    x = torch.randn((n, *shape), generator=generator)
    y = None if labels is None else labels.to(source.device)
    frames = max(1, min(frames, steps))
    chunks = [steps // frames + (1 if i < steps % frames else 0) for i in range(frames)]
    snapshots, done = [x.clamp(-1, 1)], 0
    x = x.to(source.device)
    for chunk in chunks:
        x = denoise_segment(
            model, source.config, x, done, done + chunk, labels=y, generator=generator, sample_steps=steps
        )
        done += chunk
        snapshots.append(x.clamp(-1, 1).float().cpu())
    guidance = cfg.guidance if y is not None else 0.0
    protocol = {"init": "noise", "sampler": cfg.sampler, "steps": steps, "guidance": guidance}
    return snapshots[-1], snapshots, {**protocol, "frames": len(snapshots), "weights": "ema"}


def save_gif(
    snapshots: list[torch.Tensor],
    path: str | Path,
    *,
    nrow: int | None = None,
    scale: int | None = None,
    frame_ms: int = 120,
    hold_last_ms: int = 1500,
) -> Path:
    """Write snapshots (each (N, C, H, W) in [−1, 1]) as a looping animated GIF of image grids.

    Args:
        snapshots: the chain at successive moments.
        path: output file (.gif).
        nrow: images per grid row (default: square-ish).
        scale: integer upscaling (default: enough to make 28-pixel images legible).
        frame_ms: display time of each frame.
        hold_last_ms: display time of the last frame, so the final samples can be seen.

    Returns:
        The path written.
    """
    from PIL import Image

    if not snapshots:
        raise JemlabError("no frames to write")
    scale = scale or max(1, 64 // snapshots[0].shape[-1])
    images = [Image.fromarray(np.ascontiguousarray(make_grid(x, nrow=nrow, scale=scale))) for x in snapshots]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    durations = [frame_ms] * (len(images) - 1) + [hold_last_ms]
    images[0].save(path, save_all=True, append_images=images[1:], duration=durations, loop=0, optimize=False)
    return path
