"""Evaluation suite: classification, calibration, OOD detection, robustness, sample quality and
reports.

Modules take callables and tensors (``logits_fn``, ``model.logits``/``model.energy``, ``defend``,
``sample_fn``) and never import the training loop or samplers.
:func:`jemlab.evaluation.suite.run_suite` runs everything.
"""

from __future__ import annotations

__all__ = [
    "calibration",
    "classification",
    "ood_metrics",
    "ood_scores",
    "ood_sets",
    "report",
    "robustness",
    "suite",
]
