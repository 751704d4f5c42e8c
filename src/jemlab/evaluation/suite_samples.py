"""The suite's sample-quality part: statistics of generated images under the model and in a feature net's space.

Unconditional samples: the model's class histogram and its entropy (mode coverage), mean max-softmax and mean
energy against the test images'. Class-conditional samples (when ``sample_fn`` takes labels): the model's
accuracy on them. With a feature net: Fréchet distance and KID of the samples to the test images, the same
between two real sets as a noise floor, and the feature net's own accuracy on the samples. A model without a
classifier (EGC's plain ε-prediction control) has no statistics under the model: they are skipped with a note, and
the feature net's are all there is.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from jemlab.errors import JemlabError
from jemlab.evaluation import classification as cls
from jemlab.evaluation.suite_context import PartResult, SuiteContext, has_classifier, on_device, split_of
from jemlab.quality import metrics as sq
from jemlab.quality.diversity import within_class_diversity

if TYPE_CHECKING:
    from jemlab.evaluation.suite_options import SampleFn

__all__ = ["evaluate_samples"]


def _generate(
    sample_fn: SampleFn,
    n: int,
    labels: Tensor | None,
    batch: int,
    gen: torch.Generator,
    shape: tuple[int, ...],
) -> Tensor:
    """``n`` samples, ``batch`` per ``sample_fn`` call, checked to be (b, *shape) images."""
    chunks = []
    for i in range(0, n, batch):
        b = min(batch, n - i)
        lb = None if labels is None else labels[i : i + b]
        xs = torch.as_tensor(sample_fn(b, lb, gen)).detach().float().cpu()
        if tuple(xs.shape) != (b, *shape):
            raise JemlabError(
                f"sample_fn returned shape {tuple(xs.shape)}, expected {(b, *shape)}; it must "
                "return "
                "(n, C, H, W) images in [-1, 1]"
            )
        chunks.append(xs)
    return torch.cat(chunks)


def _map_batches(fn: Callable[[Tensor], Tensor], x: Tensor, ctx: SuiteContext) -> Tensor:
    """``fn`` on the suite's device batch by batch, without gradients, gathered on the CPU."""
    batch_size = ctx.opts.batch_size
    with torch.no_grad():
        return torch.cat([fn(x[i : i + batch_size].to(ctx.device)).cpu() for i in range(0, len(x), batch_size)])


def _unconditional_stats(ctx: SuiteContext, x_u: Tensor) -> dict[str, Any]:
    """Mode coverage, confidence and energy of the unconditional samples under the model."""
    logits_u = ctx.logits(x_u)
    energy = ctx.model.energy
    e_u = _map_batches(lambda xb: energy(xb).reshape(-1), x_u, ctx)
    e_t = _map_batches(lambda xb: energy(xb).reshape(-1), ctx.x_test, ctx)
    return {
        "class_histogram_entropy": sq.class_histogram_entropy(logits_u, ctx.num_classes),
        "class_histogram": sq.class_histogram(logits_u, ctx.num_classes).tolist(),
        "mean_max_softmax": float(torch.softmax(logits_u, 1).max(1).values.mean()),
        "mean_energy_samples": float(e_u.mean()),
        "mean_energy_test": float(e_t.mean()),
    }


def _conditional_samples(ctx: SuiteContext, shape: tuple[int, ...]) -> tuple[Tensor | None, Tensor | None]:
    """Class-conditional samples (labels 0, 1, ..., C-1, 0, ...) clamped to [-1, 1], or ``(None, None)`` when
    they are switched off or ``sample_fn`` refuses labels (with a note)."""
    opts = ctx.opts
    if not opts.conditional_samples:
        return None, None
    labels_c = torch.arange(opts.n_samples) % ctx.num_classes
    try:
        x_c = _generate(ctx.sample_fn, opts.n_samples, labels_c, opts.sample_batch, ctx.gen, shape).clamp(-1, 1)
    except (NotImplementedError, TypeError, ValueError, JemlabError) as exc:
        ctx.notes.append(f"Class-conditional samples skipped: sample_fn refused labels ({exc}).")
        return None, None
    return x_c, labels_c


def _conditional_stats(ctx: SuiteContext, x_c: Tensor, labels_c: Tensor) -> dict[str, Any]:
    """The model's accuracy on the class-conditional samples, and their grid (one row per class)."""
    num_classes = ctx.num_classes
    stats: dict[str, Any] = {}
    if has_classifier(ctx.model):
        stats["model_accuracy"] = sq.sample_class_accuracy(ctx.logits(x_c), labels_c, num_classes)
    # Variety within each class: samples with a near-copy among their class's samples (RMS pixel difference < 0.05
    # on [0, 1]; real test images of a class have none), and the mean distance to the nearest one.
    variety = within_class_diversity(x_c, labels_c)
    stats["near_copies"] = variety.near_copies
    stats["near_copy_fraction"] = variety.near_copy_fraction
    stats["nearest_in_class_rms"] = variety.nn_rms
    order = torch.argsort(labels_c[: min(len(labels_c), 10 * num_classes)], stable=True)
    ctx.figures.append(
        (
            "Class-conditional samples (one row per class)",
            sq.plot_image_grid(
                x_c[order],
                ctx.fig_dir / "samples_conditional.png",
                nrow=max(1, len(order) // num_classes),
                title="class-conditional samples",
            ),
        )
    )
    return stats


def _save_samples(ctx: SuiteContext, x_u: Tensor, x_c: Tensor | None, labels_c: Tensor | None) -> None:
    """Write the samples in the exchange format (SPEC): float32 images in [0, 1], int64 labels for the
    class-conditional ones."""
    np.savez_compressed(
        ctx.out / "samples_unconditional.npz", images=((x_u.numpy() + 1.0) / 2.0).astype(np.float32)
    )
    if x_c is not None and labels_c is not None:
        np.savez_compressed(
            ctx.out / "samples_conditional.npz",
            images=((x_c.numpy() + 1.0) / 2.0).astype(np.float32),
            labels=labels_c.numpy().astype(np.int64),
        )


def _kid(ctx: SuiteContext, f_real: np.ndarray, f_other: np.ndarray) -> dict[str, float]:
    """KID mean and standard deviation over the suite's subsets."""
    opts = ctx.opts
    kid = sq.kernel_inception_distance(
        f_real, f_other, n_subsets=opts.kid_subsets, subset_size=opts.kid_subset_size, seed=opts.seed
    )
    return dict(zip(("mean", "std"), kid, strict=True))


def _feature_space_stats(
    ctx: SuiteContext, x_u: Tensor, x_c: Tensor | None, labels_c: Tensor | None, conditional: dict[str, Any] | None
) -> dict[str, Any]:
    """Fréchet distance and KID in the feature net's space (samples vs test, and real vs real as a noise floor),
    the feature net's accuracy on the test images and class histogram of the samples; adds its accuracy on the
    class-conditional samples to ``conditional``."""
    fnet = ctx.feature_net.to(ctx.device).eval() if hasattr(ctx.feature_net, "eval") else ctx.feature_net

    def feats(x: Tensor) -> np.ndarray:
        return sq.extract_features(on_device(fnet.features, ctx.device), x, ctx.opts.batch_size)

    f_test = feats(ctx.x_test)
    f_u = feats(x_u)
    fq: dict[str, Any] = {}
    n_ref = min(len(f_test), len(f_u))
    fq["frechet_unconditional"] = sq.frechet_distance_from_features(f_test[:n_ref], f_u[:n_ref])
    fq["kid_unconditional"] = _kid(ctx, f_test, f_u)
    fq["feature_net_test_accuracy"] = cls.accuracy(_map_batches(fnet, ctx.x_test, ctx), ctx.y_test)
    fn_logits_u = _map_batches(fnet, x_u, ctx)
    fq["class_histogram_entropy_feature_net"] = sq.class_histogram_entropy(fn_logits_u, ctx.num_classes)
    # Noise floor: the same statistics between two real sets of the same size.
    val = split_of(ctx.splits, "val")
    if val is not None and len(val) >= 2:
        x_v, _ = ctx.load(val, n_ref)
        f_v = feats(x_v)
        m = min(len(f_v), n_ref)
        fq["frechet_real_vs_real"] = sq.frechet_distance_from_features(f_test[:m], f_v[:m])
        fq["kid_real_vs_real"] = _kid(ctx, f_test, f_v)
    if x_c is not None and labels_c is not None and conditional is not None:
        f_c = feats(x_c)
        fq["frechet_conditional"] = sq.frechet_distance_from_features(f_test[:n_ref], f_c[:n_ref])
        fq["kid_conditional"] = _kid(ctx, f_test, f_c)
        fn_logits_c = _map_batches(fnet, x_c, ctx)
        conditional["feature_net_accuracy"] = sq.sample_class_accuracy(fn_logits_c, labels_c, ctx.num_classes)
    meta = getattr(fnet, "meta", {}) or {}
    fq["feature_net_meta"] = dict(meta)
    ctx.notes.append(
        f"Fréchet distance/KID: {n_ref} test images vs {n_ref} samples in the feature net's penultimate "
        f"space (feature net: dataset {meta.get('dataset', '?')}, accuracy {meta.get('accuracy', '?')}); "
        "KID = unbiased MMD^2 with k(x,y)=(x.y/d+1)^3, mean/std over subsets. Not Inception FID: compare "
        "only across models scored with the same feature net and sample count."
    )
    return fq


def evaluate_samples(ctx: SuiteContext) -> PartResult:
    """Sample quality of ``sample_fn``; skipped (with a note) without a ``sample_fn`` or with ``n_samples`` 0."""
    opts = ctx.opts
    if ctx.sample_fn is None or opts.n_samples <= 0:
        ctx.notes.append("Sample quality skipped: no sample_fn given.")
        return None
    shape = tuple(ctx.x_test.shape[1:])
    res: dict[str, Any] = {}
    x_u = _generate(ctx.sample_fn, opts.n_samples, None, opts.sample_batch, ctx.gen, shape)
    if not torch.isfinite(x_u).all():
        raise JemlabError("sample_fn returned non-finite images; the sampler or model has diverged")
    res["n"] = len(x_u)
    res["fraction_outside_range"] = float(((x_u < -1.0001) | (x_u > 1.0001)).double().mean())
    x_u = x_u.clamp(-1, 1)
    if has_classifier(ctx.model):
        res["unconditional"] = _unconditional_stats(ctx, x_u)
    else:
        ctx.notes.append(
            "Samples: the model has no classifier or energy (EGC's plain ε-prediction control), so the statistics "
            "of the samples under the model (class histogram, confidence, energy, accuracy on class-conditional "
            "samples) are not computed; the feature net's are."
        )
    ctx.figures.append(
        (
            "Unconditional samples",
            sq.plot_image_grid(x_u[:64], ctx.fig_dir / "samples_unconditional.png", title="unconditional samples"),
        )
    )
    x_c, labels_c = _conditional_samples(ctx, shape)
    if x_c is not None and labels_c is not None:
        res["conditional"] = _conditional_stats(ctx, x_c, labels_c)
    _save_samples(ctx, x_u, x_c, labels_c)
    if ctx.feature_net is not None:
        res["feature_space"] = _feature_space_stats(ctx, x_u, x_c, labels_c, res.get("conditional"))
    else:
        ctx.notes.append("Fréchet distance/KID skipped: no feature net given.")
    if math.isnan(res["fraction_outside_range"]):
        res["fraction_outside_range"] = None
    return res, "samples: done"
