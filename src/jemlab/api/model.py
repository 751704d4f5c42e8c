"""`Model`: a trained JEM or EGC run behind a few typed calls; `load` opens one from disk.

Every call takes images in the forms `jemlab.api.inputs` accepts (float in [0, 1] or uint8 0–255) and returns
CPU tensors; images come back as float32 (N, C, H, W) in [0, 1]. The work is done by the modules the command line
uses: ``jemlab.run`` loads, ``jemlab.generate`` samples (as ``jemlab sample``), ``jemlab.typicality`` scores
typicality (as ``jemlab serve``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from jemlab.api.inputs import ImageBatch, to_model_input, to_unit
from jemlab.config import Config
from jemlab.errors import JemlabError
from jemlab.generate import generate
from jemlab.run import LoadedRun, load_run
from jemlab.typicality import (
    Prediction,
    Reference,
    compute_reference,
    ood_reasons,
    percentiles,
    predict_with_gradient,
    reference_from_test_set,
)

BATCH_SIZE = 256  # images per forward pass (the batch `jemlab sample` classifies its samples in)

# One class (index or name), or one per sample.
LabelSpec = int | str | Sequence[int | str] | torch.Tensor | np.ndarray


@dataclass(frozen=True)
class Samples:
    """Samples together with how they were made, as `Model.draw` returns them.

    Attributes:
        images: (N, C, H, W) float32 in [0, 1] on the CPU.
        labels: (N,) int64 classes the samples were drawn for, or None for unconditional samples.
        protocol: how they were made (sampler, steps, start, ...), the JSON `jemlab sample` prints.
        x: the same samples in [−1, 1], the scale the network works in (what jemlab's image writers take).
    """

    images: torch.Tensor
    labels: torch.Tensor | None
    protocol: dict[str, Any]
    x: torch.Tensor = field(repr=False)

    @classmethod
    def from_network_scale(cls, x: torch.Tensor, labels: torch.Tensor | None, protocol: dict[str, Any]) -> Samples:
        """Samples from images in [−1, 1], as jemlab's samplers return them.

        Args:
            x: (N, C, H, W) images in [−1, 1].
            labels: (N,) classes, or None.
            protocol: how they were made.

        Returns:
            The samples, with `Samples.images` in [0, 1].
        """
        return cls(images=to_unit(x), labels=labels, protocol=protocol, x=x)


@dataclass(frozen=True)
class OODScores:
    """Typicality of images against the model's scores on real test images (the verdict of ``jemlab serve``).

    An image is out of distribution when its log p(x) percentile or its gradient percentile is below
    ``quantile / 2``, so at most a fraction ``quantile`` of real test images would be flagged.

    Attributes:
        log_px: (N,) −E(x), higher = more probable under the model.
        grad_norm: (N,) ‖∇ₓE(x)‖, lower = nearer a mode of p(x).
        log_px_percentile: (N,) fraction of reference images the model finds no more probable, in [0, 1].
        grad_percentile: (N,) fraction of reference images with a gradient at least as steep, in [0, 1].
        score: (N,) the smaller of the two percentiles: higher = more typical; NaN where E(x) is not finite.
        out_of_distribution: (N,) bool, ``score < quantile / 2`` (True where the score is NaN).
        reasons: per image, the names of the scores that flag it ("log p(x)", "gradient norm").
        quantile: the fraction of real test images allowed to be flagged.
        reference: what the percentiles were measured against (e.g. "1000 random fashion-mnist test images").
    """

    log_px: torch.Tensor
    grad_norm: torch.Tensor
    log_px_percentile: torch.Tensor
    grad_percentile: torch.Tensor
    score: torch.Tensor
    out_of_distribution: torch.Tensor
    reasons: list[list[str]]
    quantile: float
    reference: str


class Model:
    """A trained energy model: classifier p(y|x), energy E(x), OOD scores and samples (JEM or EGC runs).

    Get one from `jemlab.load` (a run directory or checkpoint) or `jemlab.train`. Images go in as float in
    [0, 1] shaped (N, C, H, W) or (N, H, W), or as uint8 0–255 shaped (N, H, W) or (N, H, W, C); images come out
    as float32 (N, C, H, W) in [0, 1]. Everything returned is on the CPU.

    Args:
        run: a run loaded from a checkpoint (by load_run in jemlab.run; `load` does this for you).

    Example:
        >>> model = jemlab.load("runs/fashion-mnist")
        >>> model.predict(images)
        tensor([9, 2, 1, 1])
    """

    def __init__(self, run: LoadedRun) -> None:
        self.run = run
        """The loaded run underneath: network, replay buffer, chain initialiser (for jemlab's lower-level code)."""
        self.reference: Reference | None = None
        """Test-set scores that `ood_score` compares against; set by `fit_reference` (or its first call)."""

    # --- what the model is ---------------------------------------------------------------------------------------

    @property
    def class_names(self) -> list[str]:
        """One name per class, in label order (e.g. "T-shirt/top", "Trouser", ...)."""
        return list(self.run.class_names)

    @property
    def num_classes(self) -> int:
        """Number of classes C."""
        return self.run.num_classes

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the model's images, e.g. (1, 28, 28)."""
        return tuple(self.run.image_shape)  # type: ignore[return-value]

    @property
    def config(self) -> Config:
        """The resolved config the model was trained with (its sampler settings are the ones `sample` uses)."""
        return self.run.config

    @property
    def kind(self) -> str:
        """The model family: "jem" (SGLD samples) or "egc" (diffusion samples)."""
        return "egc" if self.run.config.objective.name == "egc" else "jem"

    @property
    def device(self) -> torch.device:
        """Where the network runs."""
        return self.run.device

    @property
    def path(self) -> Path | None:
        """The checkpoint file it was loaded from; None for a model trained in memory."""
        return self.run.path

    def __repr__(self) -> str:
        return (
            f"Model(kind={self.kind!r}, dataset={self.config.data.dataset!r}, classes={self.num_classes}, "
            f"image_shape={self.image_shape}, device={str(self.device)!r}, path={str(self.path)!r})"
        )

    # --- classifier and energy -----------------------------------------------------------------------------------

    def predict_proba(self, images: ImageBatch) -> torch.Tensor:
        """Class probabilities p(y|x) = softmax(f(x)).

        Args:
            images: float in [0, 1] (N, C, H, W) or (N, H, W), or uint8 0–255 (N, H, W) or (N, H, W, C).

        Returns:
            (N, C) float32; each row sums to 1.

        Example:
            >>> probs = model.predict_proba(images)
            >>> model.class_names[int(probs[0].argmax())]
            'Ankle boot'
        """
        logits = self._batched(lambda x: self.run.model.logits(x), to_model_input(images, self.image_shape))
        return logits.float().softmax(1)

    def predict(self, images: ImageBatch) -> torch.Tensor:
        """The most probable class of each image, argmax_y f(x)[y].

        Args:
            images: as for `Model.predict_proba`.

        Returns:
            (N,) int64 labels; ``model.class_names[label]`` names them.

        Example:
            >>> model.predict(images)
            tensor([9, 2, 1, 1])
        """
        return self._classify(to_model_input(images, self.image_shape))

    def energy(self, images: ImageBatch) -> torch.Tensor:
        """The energy E(x): low energy = probable, log p(x) = −E(x) + const.

        E(x) = −logsumexp_y f(x)[y] for the classifier's own energy (JEM, EGC at t = 0), −h(x) for a model with a
        separate energy head h (the course preset).

        Args:
            images: as for `Model.predict_proba`.

        Returns:
            (N,) float32 energies.

        Example:
            >>> model.energy(images)
            tensor([-11.2, -9.8, -12.0, -10.7])
        """
        return self._batched(lambda x: self.run.model.energy(x), to_model_input(images, self.image_shape)).float()

    # --- out-of-distribution scores ------------------------------------------------------------------------------

    def fit_reference(
        self,
        images: ImageBatch | None = None,
        labels: Sequence[int] | torch.Tensor | np.ndarray | None = None,
        *,
        size: int = 1000,
        data_dir: str | Path | None = None,
        seed: int = 0,
    ) -> Reference:
        """Score the reference images that `ood_score` compares against, and keep them on the model.

        Without images, `size` random test images of the run's dataset are scored, as ``jemlab serve`` does at
        start-up (``--reference-size``, default 1000). `ood_score` calls this by itself the first time.

        Args:
            images: in-distribution images to use instead (forms as for `Model.predict_proba`).
            labels: their classes (only for the accuracy reported with the reference), or None.
            size: how many test images, when `images` is None.
            data_dir: where the dataset lives, if not where the run's config says.
            seed: which random test images.

        Returns:
            The reference: the sorted scores, the model's accuracy on those images, and where they came from.

        Example:
            >>> model.fit_reference(size=500).source
            '500 random fashion-mnist test images'
        """
        if images is None:
            if not isinstance(size, int) or isinstance(size, bool) or size < 1:
                raise JemlabError(f"size must be a positive number of test images, got {size!r}")
            data = None if data_dir is None else str(data_dir)
            reference, note = reference_from_test_set(self.config, self._predict_with_gradient, size, data, seed)
            if reference is None:
                raise JemlabError(f"{note}; pass data_dir=... or in-distribution images: model.fit_reference(images)")
        else:
            x = to_model_input(images, self.image_shape)
            y = None if labels is None else torch.as_tensor(np.asarray(labels), dtype=torch.int64).reshape(-1)
            if y is not None and len(y) != len(x):
                raise JemlabError(f"got {len(y)} labels for {len(x)} reference images; pass one label per image")
            reference = compute_reference(self._predict_with_gradient, x, y, f"{len(x)} images given to fit_reference")
        self.reference = reference
        return reference

    def ood_score(self, images: ImageBatch, quantile: float = 0.05) -> OODScores:
        """How typical each image is of the data the model was trained on (the OOD verdict of ``jemlab serve``).

        Two scores per image, both JEM's: log p(x) = −E(x) and the gradient norm ‖∇ₓE(x)‖, each as a percentile
        of the model's scores on real test images (`fit_reference`; scored once, on the first call, when it was
        not called before).

        Args:
            images: as for `Model.predict_proba`.
            quantile: the fraction of real test images that may be flagged (split evenly over the two scores).

        Returns:
            The scores, their percentiles, a combined `OODScores.score` and the verdict per image.

        Example:
            >>> scores = model.ood_score(images)
            >>> scores.out_of_distribution
            tensor([False, False,  True, False])
        """
        if not isinstance(quantile, (int, float)) or isinstance(quantile, bool) or not 0 < quantile < 1:
            raise JemlabError(f"quantile must be a fraction in (0, 1), got {quantile!r}")
        x = to_model_input(images, self.image_shape)
        reference = self.reference if self.reference is not None else self.fit_reference()
        predictions = [self._predict_with_gradient(chunk) for chunk in x.split(BATCH_SIZE)]
        energy = torch.cat([p.energy for p in predictions])
        grad_norm = torch.cat([p.grad_norm for p in predictions])
        log_px_pct, grad_pct = percentiles(reference, energy.numpy(), grad_norm.numpy())
        reasons = [
            ood_reasons(a, b, quantile) if math.isfinite(a) else ["energy"]
            for a, b in zip(log_px_pct.tolist(), grad_pct.tolist(), strict=True)
        ]
        return OODScores(
            log_px=-energy,
            grad_norm=grad_norm,
            log_px_percentile=torch.from_numpy(log_px_pct).float(),
            grad_percentile=torch.from_numpy(grad_pct).float(),
            score=torch.from_numpy(np.minimum(log_px_pct, grad_pct)).float(),
            out_of_distribution=torch.tensor([bool(r) for r in reasons], dtype=torch.bool),
            reasons=reasons,
            quantile=float(quantile),
            reference=reference.source,
        )

    # --- samples -------------------------------------------------------------------------------------------------

    def sample(
        self,
        n: int,
        labels: LabelSpec | None = None,
        steps: int | None = None,
        seed: int = 0,
        *,
        init: str = "auto",
    ) -> torch.Tensor:
        """Draw samples from p(x), or from p(x|y) for given classes.

        JEM runs: SGLD chains from the replay buffer (or the initialiser's noise), as ``jemlab sample``; EGC runs:
        DDIM/DDPM from noise with the model's classifier guidance. Sample i depends only on `seed` and i.

        Args:
            n: number of samples.
            labels: None for p(x); a class (index or name) for n samples of it; or n classes, one per sample.
            steps: sampler steps (default: the run's ``sampler.steps``; EGC: ``egc.sample_steps``).
            seed: random seed; the same seed gives the same samples.
            init: where JEM chains start: "auto" (the replay buffer when the run kept one), "buffer" or "noise".

        Returns:
            (n, C, H, W) float32 images in [0, 1].

        Example:
            >>> x = model.sample(16)
            >>> grid = model.sample(30, labels=torch.arange(10).repeat_interleave(3))
        """
        return self.draw(n, labels, steps, seed, init=init).images

    def draw(
        self,
        n: int,
        labels: LabelSpec | None = None,
        steps: int | None = None,
        seed: int = 0,
        *,
        init: str = "auto",
    ) -> Samples:
        """`Model.sample`, plus the labels and how the samples were made (what ``jemlab sample`` writes and prints).

        Args:
            n: number of samples.
            labels: as for `Model.sample`.
            steps: as for `Model.sample`.
            seed: as for `Model.sample`.
            init: as for `Model.sample`.

        Returns:
            The samples, their labels and the sampling protocol.

        Example:
            >>> samples = model.draw(10, labels="Sandal", seed=1)
            >>> samples.protocol["steps"], model.self_agreement(samples)
            (20, 1.0)
        """
        _check_int("n", n, 1)
        if steps is not None:
            _check_int("steps", steps, 0)
        _check_int("seed", seed, 0)
        y = self._labels(labels, n)
        generator = torch.Generator().manual_seed(seed)
        x, protocol = generate(self.run, n, labels=y, steps=steps, init=init, generator=generator)
        return Samples.from_network_scale(x, y, protocol)

    def self_agreement(self, samples: Samples) -> float:
        """How often the model classifies class-conditional samples as the class they were drawn for.

        Args:
            samples: from `Model.draw` with labels.

        Returns:
            The fraction in [0, 1].

        Example:
            >>> model.self_agreement(model.draw(20, labels=3))
            0.95
        """
        if samples.labels is None:
            raise JemlabError("self_agreement needs class-conditional samples: draw them with labels=...")
        return float((self._classify(samples.x) == samples.labels).float().mean())

    # --- helpers ---------------------------------------------------------------------------------------------------

    def _batched(self, fn: Any, x: torch.Tensor) -> torch.Tensor:
        """fn over x (N, C, H, W) in [−1, 1], BATCH_SIZE images at a time, without gradients; on the CPU."""
        with torch.no_grad():
            return torch.cat([fn(chunk.to(self.device)).cpu() for chunk in x.split(BATCH_SIZE)])

    def _classify(self, x: torch.Tensor) -> torch.Tensor:
        """argmax of the logits of x in [−1, 1], BATCH_SIZE images at a time."""
        return self._batched(lambda chunk: self.run.model.logits(chunk).argmax(1), x)

    def _predict_with_gradient(self, x: torch.Tensor) -> Prediction:
        return predict_with_gradient(self.run.model, x, self.device)

    def _labels(self, labels: LabelSpec | None, n: int) -> torch.Tensor | None:
        """(n,) int64 classes from one class or n of them (indices or names); None stays None."""
        if labels is None:
            return None
        if isinstance(labels, (int, str, np.integer)) and not isinstance(labels, bool):
            items: list[Any] = [labels] * n
        elif isinstance(labels, (torch.Tensor, np.ndarray)):
            array = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else labels
            if array.dtype.kind not in "iu" or array.ndim != 1:
                raise JemlabError(f"labels must be a 1-d integer array of classes, got {array.dtype} {array.shape}")
            items = array.tolist()
        elif isinstance(labels, Sequence):
            items = list(labels)
        else:
            raise JemlabError(f"labels must be a class, a list of classes or None, got {type(labels).__name__}")
        if len(items) != n:
            raise JemlabError(f"got {len(items)} labels for {n} samples; pass one class for all or one per sample")
        return torch.tensor([self._class_index(item) for item in items], dtype=torch.int64)

    def _class_index(self, label: Any) -> int:
        if isinstance(label, str):
            if label not in self.run.class_names:
                raise JemlabError(f"unknown class name {label!r}; this model's classes: {', '.join(self.class_names)}")
            return self.run.class_names.index(label)
        if isinstance(label, bool) or not isinstance(label, (int, np.integer)) or not 0 <= label < self.num_classes:
            raise JemlabError(f"labels must be classes 0 to {self.num_classes - 1} (or class names), got {label!r}")
        return int(label)


def _check_int(name: str, value: Any, minimum: int) -> None:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < minimum:
        raise JemlabError(f"{name} must be an integer >= {minimum}, got {value!r}")


def load(path: str | Path, device: str = "auto") -> Model:
    """Open a trained model: a run directory (its latest checkpoint) or a checkpoint file, JEM or EGC.

    Checkpoints are safetensors files: nothing is unpickled. EGC runs load their EMA weights.

    Args:
        path: a run directory (as written by ``jemlab train`` or `jemlab.train`), its ``checkpoints`` folder or a
            ``step-*.safetensors`` file.
        device: "auto" (a GPU when there is one), "cpu", "cuda" or "cuda:N".

    Returns:
        The model, ready to classify, score and sample.

    Example:
        >>> import jemlab
        >>> model = jemlab.load("runs/fashion-mnist")
        >>> model.class_names[:3]
        ['T-shirt/top', 'Trouser', 'Pullover']
    """
    return Model(load_run(path, device=device))
