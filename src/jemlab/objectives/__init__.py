"""Training objectives. An objective receives the negatives (or its random source); it never draws them itself."""

from jemlab.objectives.egc import EGCWeights, egc_loss, epsilon_loss
from jemlab.objectives.jem import JEMWeights, jem_loss

__all__ = ["EGCWeights", "JEMWeights", "egc_loss", "epsilon_loss", "jem_loss"]
