"""Training: the `Trainer` (loop.py, in commented stages) and the small pieces it composes, each of which knows
nothing of the Trainer: optimiser and schedule (optim.py), split evaluation (evaluate.py), divergence detection
(divergence.py, gap_drift.py), rollback snapshots and the recovery policy (snapshot.py, recovery.py), checkpoints
(checkpoint.py), the EGC step and EMA (egc.py, ema.py), distributed state (distributed_state.py), the hardware
choices of a run (choices.py), logs and metrics files (logging.py, metrics_file.py) and signals (stop_request.py).

Import the Trainer from `jemlab.training.loop`; inference code (`jemlab.run`, `jemlab.generate`, `jemlab.serve`,
`jemlab.evaluation`) never needs to.
"""
