"""Defaults of ``jemlab eval --all``, in a module without heavy imports so that the CLI can show them in ``--help``.

The sizes are chosen so that the default-preset Fashion-MNIST model is evaluated in under 10 minutes on 2 CPU
cores; docs/evaluation.md lists the per-part timings behind them. Every cost grows linearly in its size.
"""

from __future__ import annotations

from typing import Any

from jemlab.quality import FEATURE_NET_EPOCHS, FEATURE_NET_MINUTES

#: The parts of the evaluation, in the order they run.
PARTS: tuple[str, ...] = ("classification", "calibration", "ood", "robustness", "samples")

EVAL_DEFAULTS: dict[str, Any] = {
    "n_test": 10000,  # the whole Fashion-MNIST/MNIST test split
    "n_val": 1000,
    "n_ood": 1000,
    "batch_size": 250,
    "pgd_n": 500,
    "pgd_steps": 10,
    "pgd_restarts": 1,
    "pgd_loss": "ce",
    "pgd_norms": ("linf", "l2"),
    "eps_linf": (0.0, 2 / 255, 4 / 255, 8 / 255, 16 / 255, 0.1),
    "eps_l2": (0.0, 0.25, 0.5, 1.0),
    "defence_steps": 10,  # JEM's K = 10 (Grathwohl et al., 2020, Fig. 6)
    "defence_n": 100,
    "defence_chains": 1,
    "defence_eot": 1,
    "defence_init_noise": 0.03,  # JEM's attack_model.py --sigma
    "n_samples": 500,
    "kid_subsets": 10,
    "kid_subset_size": 500,
    "bins": 20,  # JEM++'s ECE protocol
    "feature_net_epochs": FEATURE_NET_EPOCHS,
    "feature_net_minutes": FEATURE_NET_MINUTES,
}

#: Smaller attack sizes for EGC checkpoints: every attack step differentiates through the UNet's input gradient (a
#: double back-propagation), so the JEM sizes above took 490 s of a 621 s ``--all`` run of the ``egc`` preset's
#: model on 2 CPU cores; these keep the whole evaluation under 10 minutes. Explicit flags still win.
EGC_EVAL_DEFAULTS: dict[str, Any] = {
    "pgd_n": 200,
    "defence_n": 25,
}
