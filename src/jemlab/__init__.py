"""jemlab: Joint Energy-Based Models (JEM, JEM++, EGC) for learning, reproducing and using.

One network is a classifier p(y|x) and an energy model p(x) ∝ exp(−E(x)). From Python:

    import jemlab

    model = jemlab.load("runs/fashion-mnist")        # a run directory or a checkpoint file, JEM or EGC
    probs = model.predict_proba(images)               # (N, C); images: float in [0, 1] or uint8 0-255
    scores = model.ood_score(images)                  # typicality against real test images
    samples = model.sample(16, labels="Sandal")       # (16, C, H, W) in [0, 1]
    model = jemlab.train("default", "runs/quick", {"train.minutes": 2}, callback=print)

Images go in as float in [0, 1] shaped (N, C, H, W) or (N, H, W), or as uint8 0–255 shaped (N, H, W) or
(N, H, W, C); images come out as float32 (N, C, H, W) in [0, 1]. Start with `load`, `train` and `Model`.

The names below are imported on first use, so that ``import jemlab`` (and the ``jemlab`` command) does not pay
for importing torch.
"""

from __future__ import annotations

import importlib
from typing import Any

from jemlab.errors import JemlabError

__version__ = "0.1.0"
__docformat__ = "google"

# Public name → the module that defines it, imported on first access (PEP 562). Not imported under TYPE_CHECKING
# either: the architecture contracts (lint-imports) would then see every module importing the API through `jemlab`.
_LAZY = {
    "load": "jemlab.api",
    "train": "jemlab.api",
    "Model": "jemlab.api",
    "Samples": "jemlab.api",
    "OODScores": "jemlab.api",
    "Reference": "jemlab.api",
    "ImageBatch": "jemlab.api",
}

__all__ = ["ImageBatch", "JemlabError", "Model", "OODScores", "Reference", "Samples", "load", "train"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # later lookups find it without this hook
        return value
    raise AttributeError(f"module 'jemlab' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
