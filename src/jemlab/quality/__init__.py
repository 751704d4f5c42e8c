"""Sample quality, below the trainer and the evaluation suite: the domain feature net, Fréchet distance, KID and
the diversity of samples.

The evaluation suite (`jemlab eval --parts samples`) and the training loop's live tracking
(`jemlab.training.quality`) use the same functions and the same cached feature net (`reference.py`).
"""

from __future__ import annotations

__all__ = ["FEATURE_NET_EPOCHS", "FEATURE_NET_MINUTES", "arrays", "diversity", "feature_net", "metrics", "reference"]

#: How the reference feature net is trained when no cached one exists (by `jemlab eval` or by training-time tracking,
#: so that whichever trains it first caches the same kind of net). Kept here, free of heavy imports, for the CLI help.
FEATURE_NET_EPOCHS = 2
FEATURE_NET_MINUTES = 3.0
