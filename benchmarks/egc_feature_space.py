"""An EGC run together with the evaluation's feature space, for the benchmarks that score its samples.

`load` opens the run (EMA weights, CPU), its dataset and the cached reference feature net that `jemlab eval --parts
samples` uses; `EGCFeatureSpace.set_reference` embeds ``n`` test images (the set the samples are compared with) and
``n`` validation images, whose Fréchet distance to each other is the floor of the comparison.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from jemlab.data import load_dataset
from jemlab.evaluation.suite_context import load_subset
from jemlab.quality import metrics as sq
from jemlab.quality.reference import reference_feature_net
from jemlab.run import load_run


@dataclass
class EGCFeatureSpace:
    run: Any  # the loaded run (jemlab.run.LoadedRun)
    splits: Any  # its dataset splits
    net: torch.nn.Module  # the reference feature net
    info: dict[str, Any]  # where the feature net came from (cache path, accuracy)
    test_features: np.ndarray | None = None  # (n, d) features of the n reference test images
    floor: float = float("nan")  # Fréchet distance of those n test images to n validation images

    def features(self, x: torch.Tensor) -> np.ndarray:
        return sq.extract_features(self.net.features, x)

    def set_reference(self, n: int, seed: int) -> float:
        """Embed `n` test and `n` validation images (subsets drawn with `seed`); returns the real-vs-real floor."""
        x_test, _ = load_subset(self.splits.test, n, torch.Generator().manual_seed(seed), 250)
        x_val, _ = load_subset(self.splits.val, n, torch.Generator().manual_seed(seed + 1), 250)
        self.test_features = self.features(x_test)
        self.floor = sq.frechet_distance_from_features(self.test_features, self.features(x_val))
        return self.floor

    def summary(self) -> dict[str, Any]:
        """What a benchmark record says about the comparison: the real-vs-real floor and the feature net."""
        net = {k: v for k, v in self.info.items() if isinstance(v, (str, int, float))}
        return {"real_vs_real": self.floor, "feature_net": net}

    def frechet(self, x: torch.Tensor) -> float:
        """Fréchet distance of images `x` (in [−1, 1]) to the reference test images."""
        if self.test_features is None:
            raise RuntimeError("call set_reference first")
        return sq.frechet_distance_from_features(self.test_features, self.features(x))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options every EGC sample benchmark takes: the checkpoint, threads, seed and the results folder."""
    parser.add_argument("--checkpoint", required=True, help="EGC checkpoint file or run directory")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the samples and of the reference subsets")
    parser.add_argument("--out", default="benchmarks/results", help="folder for the JSON record and the grids")


def load(checkpoint: str, threads: int | None = None, log: Callable[[str], None] = print) -> EGCFeatureSpace:
    """The EGC run of `checkpoint` (SystemExit for any other run) with its dataset and the reference feature net;
    `threads` (if given) sets torch's CPU threads first."""
    if threads is not None:
        torch.set_num_threads(threads)
    run = load_run(checkpoint, device="cpu")
    if run.config.objective.name != "egc":
        raise SystemExit(f"{checkpoint} is not an EGC run (objective {run.config.objective.name})")
    d = run.config.data
    splits = load_dataset(d.dataset, d.data_dir, val_size=d.val_size, seed=run.config.train.seed, limit=d.limit)
    net, info = reference_feature_net(splits, log=log)
    if net is None:
        raise SystemExit(f"no feature net: {info}")
    return EGCFeatureSpace(run, splits, net, info)
