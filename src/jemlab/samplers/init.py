"""Where chains start. An initialiser maps (n, labels or None, generator) to n images in [−1, 1].

Two initialisers:
- ``"uniform"``: U[−1, 1] noise (JEM, Grathwohl et al., 2020).
- ``"gaussian"``: the *informative initialisation* of JEM++ (Yang & Ji, ICCV 2021, Sec. 3.2): one Gaussian per
  class fitted to the training images; a chain for class y (or for a uniformly drawn class when unconditional)
  starts from a draw of N(μ_y, Σ_y), clamped to the pixel box. Starting near the data lets SGLD converge in
  K = 5–10 steps instead of 20+ and keeps BatchNorm statistics of samples close to those of data.

The Gaussians are stored as tensors (`ClassGaussians.state_dict`), so a run's checkpoint restores the very same
initialiser without the training data.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from jemlab.errors import ConfigError

Initializer = Callable[[int, "torch.Tensor | None", "torch.Generator | None"], torch.Tensor]

COVARIANCES = ("diag", "lowrank", "full")
# Largest full covariance set fitted (K·D² float32): 10 classes of 32×32×3 images take 0.35 GiB, of 64×64×3 5.6 GiB.
_FULL_COVARIANCE_BYTES = 2 * 2**30


def uniform_init(shape: tuple[int, ...], device: torch.device | str = "cpu", **_unused: Any) -> Initializer:
    """U[−1, 1] noise of the given per-sample shape (JEM's initialisation of the buffer and of re-started chains)."""

    def init(n: int, labels: torch.Tensor | None = None, generator: torch.Generator | None = None):
        return torch.rand((n, *shape), generator=generator, device=device) * 2 - 1

    return init


class ClassGaussians:
    """Per-class Gaussians x = μ_y + F_y z + d_y ⊙ z', with z ~ N(0, I_r) and z' ~ N(0, I_D), clamped to [−1, 1].

    One parametrisation covers the three covariance types (D = C·H·W pixels):
    - diag:    F is empty (r = 0), d = per-pixel standard deviation;   Σ = diag(d²)
    - lowrank: F = U·diag(s) from the top-r principal directions, d² = the variance they leave unexplained;
               Σ = F Fᵀ + diag(d²) (a probabilistic-PCA-like fit that keeps the exact per-pixel variances)
    - full:    F = chol(Σ + δI) (r = D), d = 0;   Σ = the sample covariance (JEM++'s choice, δ = 1e-4 as there)

    Args:
        means: (K, D) class means μ_y.
        factors: (K, D, r) loading matrices F_y (r = 0 for diag).
        diag_std: (K, D) per-pixel standard deviations d_y.
        shape: per-image shape (C, H, W) with C·H·W = D.
        bounds: clamp box of the samples (pixels live in [−1, 1]); None for no clamp.
    """

    def __init__(
        self,
        means: torch.Tensor,
        factors: torch.Tensor,
        diag_std: torch.Tensor,
        shape: tuple[int, ...],
        bounds: tuple[float, float] | None = (-1.0, 1.0),
    ) -> None:
        k, d = means.shape
        if factors.shape[:2] != (k, d) or diag_std.shape != (k, d):
            raise ConfigError(
                f"class Gaussians have inconsistent shapes: means {tuple(means.shape)}, factors "
                f"{tuple(factors.shape)}, diag_std {tuple(diag_std.shape)}; refit them with fit_class_gaussians"
            )
        if int(torch.tensor(shape).prod()) != d:
            raise ConfigError(f"class Gaussians have {d} pixels but the images are {tuple(shape)}; refit them")
        self.means = means.float()
        self.factors = factors.float()
        self.diag_std = diag_std.float()
        self.shape = tuple(shape)
        self.bounds = bounds

    @property
    def num_classes(self) -> int:
        return int(self.means.shape[0])

    @property
    def rank(self) -> int:
        return int(self.factors.shape[2])

    def covariance(self, label: int) -> torch.Tensor:
        """The (D, D) covariance of one class (for tests and inspection; dense, so only for small images)."""
        f = self.factors[label]
        return f @ f.T + torch.diag(self.diag_std[label] ** 2)

    def __call__(
        self, n: int, labels: torch.Tensor | None = None, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Draw n images; classes are `labels` or, when None, uniform over classes (as JEM++ does)."""
        if labels is None:
            labels = torch.randint(0, self.num_classes, (n,), generator=generator)
        labels = labels.to(torch.long).cpu()
        z = torch.randn((n, self.rank), generator=generator)
        z_diag = torch.randn((n, self.means.shape[1]), generator=generator)
        x = self.means[labels] + self.diag_std[labels] * z_diag  # (n, D)
        if self.rank > 0:
            for c in labels.unique().tolist():  # one (n_c, r) @ (r, D) product per class, never (n, D, r)
                rows = (labels == c).nonzero().squeeze(1)
                x[rows] += z[rows] @ self.factors[c].T
        if self.bounds is not None:
            x = x.clamp(*self.bounds)
        return x.view(n, *self.shape)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors only, so the initialiser can live in a safetensors checkpoint."""
        return {"means": self.means, "factors": self.factors, "diag_std": self.diag_std}

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor], shape: tuple[int, ...]) -> ClassGaussians:
        try:
            return cls(state["means"], state["factors"], state["diag_std"], shape)
        except KeyError as err:
            missing = err.args[0]
            raise ConfigError(f"saved class Gaussians lack '{missing}'; refit them from the training data") from None


def _as_pixels(images: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) uint8 in 0..255 or float in [−1, 1] → (N, D) float64 in [−1, 1]."""
    if images.dtype == torch.uint8:
        return images.reshape(len(images), -1).double() / 127.5 - 1.0
    return images.reshape(len(images), -1).double()


def fit_class_gaussians(
    images: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    covariance: str = "diag",
    rank: int = 32,
    *,
    max_per_class: int | None = None,
    min_std: float = 1e-2,
    jitter: float = 1e-4,
    seed: int = 0,
) -> ClassGaussians:
    """Fit one Gaussian per class to training images (JEM++'s informative initialisation).

    Args:
        images: (N, C, H, W) uint8 pixels 0..255 or floats in [−1, 1].
        labels: (N,) int64 classes in [0, num_classes).
        num_classes: number of classes K.
        covariance: "diag", "lowrank" or "full" (see `ClassGaussians`); "full" stores K·D² floats
            (25 MB for 28×28, 380 MB for 32×32×3), so prefer "lowrank" for colour images.
        rank: number of principal directions kept by "lowrank".
        max_per_class: fit on at most this many images per class (a fixed-seed subset), None for all.
        min_std: floor of the per-pixel standard deviation, so pixels that are constant in the data
            (the black border of MNIST) still get a little noise and chains are not pinned there.
        jitter: δ added to the diagonal of a full covariance before the Cholesky factorisation (JEM++: 1e-4).
        seed: seed of the subset choice.

    Returns:
        The fitted `ClassGaussians`.
    """
    if covariance not in COVARIANCES:
        raise ConfigError(f"unknown sampler.init_covariance '{covariance}'; choose one of: {', '.join(COVARIANCES)}")
    if rank < 1:
        raise ConfigError(f"sampler.init_rank must be >= 1, got {rank}")
    shape = tuple(images.shape[1:])
    d = int(torch.tensor(shape).prod())
    r = {"diag": 0, "lowrank": min(rank, d), "full": d}[covariance]
    if covariance == "full" and num_classes * d * d * 4 > _FULL_COVARIANCE_BYTES:
        # Larger images (a user's dataset, data.image_size) would run out of memory or take hours to factorise.
        raise ConfigError(
            f"sampler.init_covariance=full needs {num_classes * d * d * 4 / 2**30:.1f} GiB for {num_classes} classes "
            f"of {'x'.join(map(str, shape))} images (K·D² floats, at most {_FULL_COVARIANCE_BYTES // 2**30} GiB); "
            f"use sampler.init_covariance=lowrank (or diag), or smaller images (data.image_size)"
        )
    means = torch.zeros(num_classes, d)
    factors = torch.zeros(num_classes, d, r)
    diag_std = torch.zeros(num_classes, d)
    generator = torch.Generator().manual_seed(seed)
    for c in range(num_classes):
        index = (labels == c).nonzero().squeeze(1)
        if len(index) < 2:
            raise ConfigError(
                f"class {c} has {len(index)} training image(s); the Gaussian initialiser needs at least 2 per class "
                f"(use sampler.init=uniform or more data)"
            )
        if max_per_class is not None and len(index) > max_per_class:
            index = index[torch.randperm(len(index), generator=generator)[:max_per_class]]
        x = _as_pixels(images[index])  # (n, D), float64 for stable second moments
        mu = x.mean(0)
        centred = x - mu
        variance = centred.pow(2).mean(0)  # biased (1/n) estimate, as JEM++ computes it
        means[c] = mu.float()
        if covariance == "diag":
            diag_std[c] = variance.sqrt().clamp_min(min_std).float()
        elif covariance == "lowrank":
            # Principal directions of the class from a randomised SVD of the centred data (Halko et al., 2011),
            # Σ ≈ V diag(S²/n) Vᵀ; exact when r reaches the rank of the data. Seeded, so a refit is identical.
            q = min(r + 8, *centred.shape)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed + c)
                _, s, v = torch.svd_lowrank(centred.float(), q=q, niter=2)  # float32: 2× faster, ample here
            k = min(r, q)
            loadings = (v[:, :k] * (s[:k] / len(x) ** 0.5)).double()  # (D, k)
            factors[c, :, :k] = loadings.float()
            residual = (variance - loadings.pow(2).sum(1)).clamp_min(0)
            diag_std[c] = residual.sqrt().clamp_min(min_std).float()
        else:
            cov = centred.T @ centred / len(x) + jitter * torch.eye(d, dtype=torch.float64)
            factors[c] = torch.linalg.cholesky(cov).float()
    return ClassGaussians(means, factors, diag_std, shape)


def gaussian_init(
    shape: tuple[int, ...],
    *,
    data: Any = None,
    state: dict[str, torch.Tensor] | None = None,
    num_classes: int | None = None,
    covariance: str = "diag",
    rank: int = 32,
    max_per_class: int | None = None,
    **_unused: Any,
) -> ClassGaussians:
    """The per-class Gaussian initialiser, fitted to `data` or restored from a saved `state`.

    Args:
        shape: per-image shape (C, H, W).
        data: the training set (an object with uint8 `.images` (N, C, H, W) and int64 `.labels`), used when no
            state is given.
        state: a `ClassGaussians.state_dict()` from a checkpoint (takes precedence over data).
        num_classes: number of classes (default: max label + 1).
        covariance, rank, max_per_class: see `fit_class_gaussians`.
    """
    if state is not None:
        return ClassGaussians.from_state_dict(state, shape)
    if data is None:
        raise ConfigError(
            "sampler.init=gaussian needs the training data to fit its class Gaussians (or a checkpoint that holds "
            "them); pass data= or use sampler.init=uniform"
        )
    labels = data.labels
    k = num_classes if num_classes is not None else int(labels.max()) + 1
    return fit_class_gaussians(data.images, labels, k, covariance, rank, max_per_class=max_per_class)


INITIALIZERS: dict[str, Callable[..., Initializer]] = {"uniform": uniform_init, "gaussian": gaussian_init}


def build_initializer(name: str, shape: tuple[int, ...], **kwargs: Any) -> Initializer:
    """An initialiser by name; an unknown name lists the choices.

    Args:
        name: a key of `INITIALIZERS`.
        shape: per-image shape (C, H, W).
        **kwargs: passed to the factory; initialisers ignore what they do not need (``data`` and ``state`` for
            the Gaussian initialiser; see `gaussian_init`).
    """
    if name not in INITIALIZERS:
        raise ConfigError(f"unknown sampler.init '{name}'; choose one of: {', '.join(INITIALIZERS)}")
    return INITIALIZERS[name](shape, **kwargs)


def initializer_state(init: Initializer) -> dict[str, torch.Tensor] | None:
    """The tensors that restore an initialiser (None for stateless ones like uniform)."""
    state_dict = getattr(init, "state_dict", None)
    return state_dict() if callable(state_dict) else None


def initializer_from_config(
    sampler: Any,
    shape: tuple[int, ...],
    *,
    data: Any = None,
    num_classes: int | None = None,
    state: dict[str, torch.Tensor] | None = None,
) -> Initializer:
    """The initialiser a run's `SamplerConfig` asks for (`Trainer` passes the training data, `load_run` the state).

    Args:
        sampler: the run's SamplerConfig (init, init_covariance, init_rank, init_max_per_class).
        shape: per-image shape (C, H, W).
        data: the training set, for initialisers fitted to data.
        num_classes: number of classes of the dataset.
        state: saved initialiser tensors from a checkpoint (`initializer_state`), used instead of refitting.
    """
    return build_initializer(
        sampler.init,
        shape,
        data=data,
        state=state,
        num_classes=num_classes,
        covariance=sampler.init_covariance,
        rank=sampler.init_rank,
        max_per_class=sampler.init_max_per_class,
    )
