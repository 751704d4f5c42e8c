"""What every part of :func:`~jemlab.evaluation.suite.run_suite` sees: the model, the data, the options and the
report being built, plus the small data helpers the parts share.

A part is a function ``part(context) -> (metrics, log line)`` (or ``None`` when it has nothing to evaluate); it
appends its figures and protocol notes to the context in the order the report shows them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from jemlab.errors import JemlabError
from jemlab.evaluation import classification as cls

if TYPE_CHECKING:
    from jemlab.evaluation.suite_options import SampleFn, SuiteOptions

__all__ = [
    "PartResult",
    "SuiteContext",
    "batched_logits",
    "has_classifier",
    "load_subset",
    "model_device",
    "on_device",
    "split_of",
]

#: What a part returns: its metrics (stored under the part's name) and one line for the progress log; ``None``
#: when the part is skipped (no timing is recorded then).
PartResult = tuple[dict[str, Any], str] | None


def split_of(splits: Any, name: str) -> Any:
    """The ``name`` dataset of ``splits`` (a mapping or an object with attributes), or None."""
    if isinstance(splits, Mapping):
        return splits.get(name)
    return getattr(splits, name, None)


def load_subset(dataset: Any, n: int, gen: torch.Generator, batch_size: int) -> tuple[Tensor, Tensor]:
    """A random subset of ``n`` examples (all when fewer), loaded in index order.

    Args:
        dataset: Exposes ``len()`` and ``batch(index_tensor) -> (x, y)``.
        n: Subset size.
        gen: Random generator choosing the subset.
        batch_size: Examples per ``batch`` call.

    Returns:
        ``(x float32, y int64)``.
    """
    total = len(dataset)
    if total == 0:
        raise JemlabError("evaluation split is empty; check the dataset files")
    idx = torch.randperm(total, generator=gen)[: min(n, total)].sort().values
    xs, ys = [], []
    for xb, yb in cls.iterate_dataset(dataset, idx, batch_size):
        xs.append(torch.as_tensor(xb).float())
        ys.append(torch.as_tensor(yb).long())
    return torch.cat(xs), torch.cat(ys)


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a model without parameters)."""
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def has_classifier(model: Any) -> bool:
    """Whether the model has logits and an energy to read; False for EGC's plain ε-prediction control."""
    return bool(getattr(model, "has_classifier", True))


def batched_logits(model: Any, x: Tensor, batch_size: int, device: torch.device) -> Tensor:
    """``model.logits`` of every image, batch by batch on ``device``, gathered on the CPU."""
    batches = (x[i : i + batch_size] for i in range(0, len(x), batch_size))
    logits, _ = cls.collect_logits(model.logits, batches, device=device)
    return logits


def on_device(fn: Callable[[Tensor], Tensor], device: torch.device) -> Callable[[Tensor], Tensor]:
    """``fn`` taking and returning CPU tensors while it runs on ``device``."""
    return lambda x: fn(x.to(device)).cpu()


@dataclass
class SuiteContext:
    """State shared by the parts of one :func:`~jemlab.evaluation.suite.run_suite` call.

    Attributes:
        model: The evaluated model (``logits`` and ``energy``), in eval mode.
        splits: The caller's splits (``test``, optionally ``val`` and ``train``).
        opts: Sizes and switches.
        gen: The one seeded generator every part draws from, in part order.
        device: The model's device.
        out: Output directory.
        fig_dir: Where the PNGs go.
        x_test: (N, C, H, W) test subset.
        y_test: (N,) its labels.
        logits_test: (N, K) its logits; (N, 0) for a model without a classifier.
        num_classes: K.
        ood_sets: The caller's named OOD image tensors.
        sample_fn: The caller's sampler, or None.
        feature_net: The feature net for Fréchet distance/KID, or None.
        defend_fn: The caller's refinement for the JEM defence, or None.
        figures: ``(title, png)`` pairs, in report order.
        notes: Protocol notes, in report order.
    """

    model: Any
    splits: Any
    opts: SuiteOptions
    gen: torch.Generator
    device: torch.device
    out: Path
    fig_dir: Path
    x_test: Tensor
    y_test: Tensor
    logits_test: Tensor
    num_classes: int
    ood_sets: Mapping[str, Tensor] | None
    sample_fn: SampleFn | None
    feature_net: nn.Module | None
    defend_fn: Callable[[Tensor], Tensor] | None
    figures: list[tuple[str, Path]]
    notes: list[str]

    def load(self, dataset: Any, n: int) -> tuple[Tensor, Tensor]:
        """:func:`load_subset` with the suite's generator and batch size."""
        return load_subset(dataset, n, self.gen, self.opts.batch_size)

    def logits(self, x: Tensor) -> Tensor:
        """:func:`batched_logits` of the model with the suite's batch size."""
        return batched_logits(self.model, x, self.opts.batch_size, self.device)
