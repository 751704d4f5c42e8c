"""Sample quality measured while a run trains: is the generator getting better or rotting?

Every `quality.every` iterations (and once at the end) `QualityTracker.measure` compares the run's samples with
held-out validation images in the feature space of the dataset's cached reference feature net, the one
`jemlab eval --parts samples` uses (`jemlab.quality.reference`):

- ``quality_fd`` / ``quality_kid``: Fréchet distance and KID of the samples the run shows: `quality.samples`
  replay-buffer images for a JEM run (JEM's own protocol, no extra chain steps), fresh DDIM/DDPM samples for EGC;
- ``quality_fresh_fd`` / ``quality_fresh_kid`` (JEM runs with a buffer, `quality.fresh`): the same for as many
  chains started from the initialiser and run for the run's K steps;
- ``quality_fd_class``: the same for `quality.per_class` class-conditional samples per class, drawn exactly as
  `jemlab sample --per-class` draws them; ``quality_class_agreement`` / ``quality_model_agreement``: how often the
  feature net / the model's own classifier assign them their requested class; ``quality_near_copies``: the fraction
  with a near-copy in their class, and ``quality_nn_rms`` the mean distance to the nearest same-class sample
  (`jemlab.quality.diversity`);
- ``quality_seconds``: what the measurement cost.

The measurement draws with generators of its own, seeded from `quality.seed` and the iteration, and leaves the
replay buffer, the model and every training random stream as they were: a run with tracking computes the same
iterations as one without it.
"""

from __future__ import annotations

import logging
import math
import time
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from jemlab.config import Config
from jemlab.data import DatasetSplits
from jemlab.errors import JemlabError
from jemlab.generate import generate
from jemlab.quality import FEATURE_NET_EPOCHS, FEATURE_NET_MINUTES
from jemlab.quality import metrics as qm
from jemlab.quality.diversity import within_class_diversity
from jemlab.quality.feature_net import to_model_range
from jemlab.quality.reference import reference_feature_net

if TYPE_CHECKING:
    from jemlab.generate import SamplingSource
    from jemlab.quality.feature_net import FeatureNet



class QualityTracker:
    """Measures a run's sample quality against held-out images (see the module docstring).

    Args:
        config: the run's config (its ``quality`` section).
        splits: the dataset; the reference images are the first `quality.samples` of its validation split.
        device: where the feature net runs.
        log: the run's logger.
    """

    def __init__(self, config: Config, splits: DatasetSplits, device: torch.device, log: logging.Logger) -> None:
        self.settings = config.quality
        self.splits = splits
        self.device = device
        self._log = log
        self.net: FeatureNet | None = None
        self.reference: np.ndarray | None = None  # features of the held-out images
        self.reference_stats: tuple[np.ndarray, np.ndarray] | None = None
        self.disabled_reason: str | None = None
        # Train (and cache) a missing feature net only on the whole training set: one trained on a --limit subset
        # would be cached for every later evaluation of the dataset.
        self.may_train = self.settings.train_feature_net and config.data.limit is None
        if self.settings.every == 0:
            self.disabled_reason = "quality.every=0"
        elif len(splits.val) < 2:
            self.disabled_reason = "the validation split has fewer than 2 images"

    @property
    def enabled(self) -> bool:
        return self.disabled_reason is None

    def due(self, step: int) -> bool:
        """A measurement is due after iteration `step`."""
        return self.enabled and step > 0 and step % self.settings.every == 0

    def prepare(self) -> bool:
        """Load (or train and cache) the feature net and the held-out features, once (the trainer leaves the time
        out of its budget). False: tracking is off or impossible (the reason is logged once)."""
        if self.net is not None:
            return True
        if not self.enabled:
            return False
        try:
            net, info = reference_feature_net(
                self.splits,
                train_if_missing=self.may_train,
                epochs=FEATURE_NET_EPOCHS,
                max_minutes=FEATURE_NET_MINUTES,
                log=self._log.info,
            )
        except (JemlabError, OSError) as err:
            net, info = None, {"note": f"no feature net: {err}"}
        self._log.info(f"sample-quality tracking: {info.get('note', '')}")
        if net is None:
            self.disabled_reason = info.get("note", "no feature net")
            return False
        self.net = net.to(self.device).eval()
        held_out = self.splits.val.images[: self.settings.samples]
        self.reference = self._features(to_model_range(held_out))
        self.reference_stats = qm.feature_statistics(self.reference)
        return True

    @torch.no_grad()
    def _features(self, x: torch.Tensor) -> np.ndarray:
        assert self.net is not None
        return qm.extract_features(lambda b: self.net.features(b.to(self.device)), x.float())

    @torch.no_grad()
    def _predicted(self, x: torch.Tensor) -> torch.Tensor:
        assert self.net is not None
        out = [self.net(x[i : i + 256].float().to(self.device)).argmax(1).cpu() for i in range(0, len(x), 256)]
        return torch.cat(out)

    def _scores(self, x: torch.Tensor, prefix: str) -> dict[str, float]:
        """Fréchet distance and KID of samples x against the held-out images."""
        assert self.reference is not None and self.reference_stats is not None
        features = self._features(x)
        mu, sigma = qm.feature_statistics(features)
        fd = qm.frechet_distance(mu, sigma, *self.reference_stats)
        kid, _ = qm.kernel_inception_distance(features, self.reference, n_subsets=5, subset_size=len(features), seed=0)
        return {f"{prefix}fd": float(fd), f"{prefix}kid": float(kid)}

    def measure(self, source: SamplingSource, step: int) -> dict[str, float] | None:
        """One measurement of `source`'s samples (a Trainer); None when tracking is off or impossible."""
        if not self.prepare():
            return None
        start = time.monotonic()
        q = self.settings
        out: dict[str, float] = {}
        unconditional = _unconditional_samples(source, q.samples, q.seed + step)
        out.update(self._scores(unconditional, "quality_"))
        if q.fresh and source.buffer is not None:  # chains from the initialiser: can the model still make images?
            x, _ = generate(source, q.samples, init="noise", generator=torch.Generator().manual_seed(q.seed + step + 2))
            out.update(self._scores(x, "quality_fresh_"))
        if q.per_class > 0:
            c = self.splits.num_classes
            labels = torch.arange(c).repeat_interleave(q.per_class)
            gen = torch.Generator().manual_seed(q.seed + step + 1)
            x, _ = generate(source, len(labels), labels=labels, generator=gen)
            out.update(self._scores(x, "quality_class_"))
            out["quality_class_agreement"] = float((self._predicted(x) == labels).float().mean())
            if getattr(getattr(source, "eval_model", source.model), "has_classifier", True):
                out["quality_model_agreement"] = _model_agreement(source, x, labels)
            diversity = within_class_diversity(x, labels)
            out["quality_near_copies"] = diversity.near_copy_fraction
            out["quality_nn_rms"] = diversity.nn_rms
        out["quality_seconds"] = time.monotonic() - start
        return {k: (v if math.isfinite(v) else float("nan")) for k, v in out.items()}


def _unconditional_samples(source: SamplingSource, n: int, seed: int) -> torch.Tensor:
    """The samples a run shows: n distinct replay-buffer images (JEM), else n fresh samples (EGC, short-run)."""
    buffer = source.buffer
    if buffer is not None and len(buffer) > 0:
        order = torch.randperm(len(buffer), generator=torch.Generator().manual_seed(seed))[:n]
        return buffer.images[order].float().clone()
    x, _ = generate(source, n, generator=torch.Generator().manual_seed(seed))
    return x


@torch.no_grad()
def _model_agreement(source: SamplingSource, x: torch.Tensor, labels: torch.Tensor) -> float:
    """How often the run's own classifier (its evaluation weights) assigns the samples their requested class."""
    model: Any = getattr(source, "eval_model", source.model)
    was_training = model.training
    model.eval()
    predicted = [model.logits(x[i : i + 256].to(source.device)).argmax(1).cpu() for i in range(0, len(x), 256)]
    model.train(was_training)
    return float((torch.cat(predicted) == labels).float().mean())
