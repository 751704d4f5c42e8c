"""Sample quality, below the trainer and the evaluation suite: the domain feature net, Fréchet distance, KID and
the diversity of samples.

The evaluation suite (`jemlab eval --parts samples`) and the training loop's live tracking
(`jemlab.training.quality`) use the same functions and the same cached feature net (`reference.py`).
"""

from __future__ import annotations

__all__ = ["arrays", "diversity", "feature_net", "metrics", "reference"]
