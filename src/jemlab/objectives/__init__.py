"""Training objectives. An objective receives the negatives; it never draws them."""

from jemlab.objectives.jem import JEMWeights, jem_loss

__all__ = ["JEMWeights", "jem_loss"]
