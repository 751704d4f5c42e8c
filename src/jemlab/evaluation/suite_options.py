"""The evaluation suite's options and the sampler it is handed (kept apart so that the parts can import them)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor

from jemlab.errors import JemlabError
from jemlab.evaluation import calibration as cal
from jemlab.evaluation import robustness as rob
from jemlab.evaluation.defaults import PARTS
from jemlab.evaluation.ood_scores import FITTED_SCORES, SCORE_FUNCTIONS

#: ``sample_fn(n, labels or None, generator) -> (n, C, H, W)`` images in [-1, 1].
SampleFn = Callable[[int, Tensor | None, torch.Generator], Tensor]


@dataclass
class SuiteOptions:
    """Sizes and switches of the evaluation suite.

    Attributes:
        n_test: Test examples used for classification/calibration (and the pool for the other
            parts).
        n_val: Validation examples used to fit the temperature.
        n_ood: Examples per OOD set (and in-distribution examples scored).
        batch_size: Forward batch size.
        seed: Seed for subsets, noise sets, attack starts and sampling.
        parts: Which parts to run (subset of classification, calibration, ood, robustness, samples).
        calibration_bins: Equal-width ECE bins (20 as in JEM++).
        temperature_scaling: Also fit a temperature on the validation split and report the scaled
            calibration (Guo et al., 2017); False reports the raw calibration only.
        ood_scores: Scores from :data:`jemlab.evaluation.ood_scores.SCORE_FUNCTIONS`.
        synthetic_ood: Synthetic OOD sets to add (see :func:`jemlab.evaluation.ood_sets.build_ood_sets`).
        pgd_n: Test examples attacked.
        pgd_norms: ``linf`` and/or ``l2``.
        pgd_eps_linf: L∞ budgets in [0, 1] pixel units (converted ×2 internally).
        pgd_eps_l2: L2 budgets in [0, 1] pixel units.
        pgd_steps: PGD steps.
        pgd_restarts: PGD random restarts.
        pgd_loss: ``"ce"`` (cross-entropy, as the JEM paper attacks) or ``"margin"`` (max_{j≠y} f_j − f_y,
            Carlini & Wagner, 2017), which keeps a useful gradient where a saturated softmax makes the
            cross-entropy's vanish (a check for gradient masking).
        defence_steps: K SGLD refinement steps for the JEM defence (0 = do not evaluate the
            defence).
        defence_n: Examples attacked through the defence (it costs K× more per step).
        defence_chains: Refinement chains averaged per input (JEM uses 5).
        defence_eot: Extra EOT gradient samples per PGD step.
        defence_step_size: SGLD step α of the refinement.
        defence_noise: SGLD noise σ of the refinement.
        defence_init_noise: Gaussian noise added before refining (JEM: 0.03).
        n_samples: Generated samples (unconditional, and again class-conditional).
        sample_batch: Samples per ``sample_fn`` call. A sample_fn built on :func:`jemlab.generate.generate` batches
            its chains itself and draws distinct starting images only within one call, so give it all ``n_samples``
            at once (as ``jemlab eval`` does); several calls may start from the same buffer images again.
        conditional_samples: Also ask ``sample_fn`` for class-conditional samples.
        kid_subsets: KID subsets.
        kid_subset_size: KID subset size (capped by the set sizes).
        dataset_name: Recorded in the report.
    """

    n_test: int = 2000
    n_val: int = 1000
    n_ood: int = 1000
    batch_size: int = 250
    seed: int = 0
    parts: tuple[str, ...] = tuple(PARTS)
    calibration_bins: int = cal.DEFAULT_N_BINS
    temperature_scaling: bool = True
    ood_scores: tuple[str, ...] = (
        "log_px",
        "max_softmax",
        "energy",
        "grad_norm",
        "mahalanobis",
        "grad_norm+mahalanobis",
    )
    ood_fit_n: int = 10000
    synthetic_ood: tuple[str, ...] = ("uniform", "gaussian", "interp", "vflip", "hflip", "invert")
    pgd_n: int = 200
    pgd_norms: tuple[str, ...] = ("linf", "l2")
    pgd_eps_linf: tuple[float, ...] = (0.0, 2 / 255, 4 / 255, 8 / 255, 16 / 255, 0.1)
    pgd_eps_l2: tuple[float, ...] = (0.0, 0.25, 0.5, 1.0)
    pgd_steps: int = 10
    pgd_restarts: int = 1
    pgd_loss: str = "ce"
    defence_steps: int = 0
    defence_n: int = 50
    defence_chains: int = 1
    defence_eot: int = 1
    defence_step_size: float = 1.0
    defence_noise: float = 0.01
    defence_init_noise: float = 0.03
    n_samples: int = 500
    sample_batch: int = 100
    conditional_samples: bool = True
    kid_subsets: int = 10
    kid_subset_size: int = 500
    dataset_name: str = ""
    extra_notes: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        unknown = set(self.parts) - set(PARTS)
        if unknown:
            raise JemlabError(f"unknown suite parts {sorted(unknown)}; choose from {list(PARTS)}")
        known = {*SCORE_FUNCTIONS, *FITTED_SCORES}
        bad = set(self.ood_scores) - known
        if bad:
            raise JemlabError(f"unknown OOD scores {sorted(bad)}; choose from {sorted(known)}")
        if self.pgd_loss not in rob.LOSS_NAMES:
            raise JemlabError(f"pgd_loss must be one of {', '.join(rob.LOSS_NAMES)}, got {self.pgd_loss!r}")
        if set(self.pgd_norms) - {"linf", "l2"}:
            raise JemlabError(f"pgd_norms must be 'linf' and/or 'l2', got {list(self.pgd_norms)}")
        for name in ("n_test", "n_ood", "batch_size", "pgd_steps", "pgd_restarts", "sample_batch", "ood_fit_n"):
            if int(getattr(self, name)) < 1:
                raise JemlabError(f"SuiteOptions.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("n_val", "pgd_n", "n_samples", "defence_steps", "defence_n"):
            if int(getattr(self, name)) < 0:
                raise JemlabError(f"SuiteOptions.{name} must be >= 0, got {getattr(self, name)}")
        if any(e < 0 for e in (*self.pgd_eps_linf, *self.pgd_eps_l2)):
            raise JemlabError("PGD eps values must be >= 0 ([0, 1] pixel units)")

    @classmethod
    def quick(cls, **overrides: Any) -> SuiteOptions:
        """Tiny sizes for smoke tests (seconds on a CPU for a small model)."""
        base: dict[str, Any] = dict(
            n_test=200,
            n_val=200,
            n_ood=100,
            pgd_n=32,
            pgd_steps=5,
            pgd_eps_linf=(0.0, 8 / 255, 0.1),
            pgd_eps_l2=(0.0, 0.5),
            defence_n=8,
            n_samples=64,
            sample_batch=64,
            kid_subsets=3,
            kid_subset_size=50,
        )
        base.update(overrides)
        return cls(**base)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}


