"""The Python API: `load` or `train` a model, then classify, score and sample through `Model`.

``inputs`` holds the accepted image forms and their conversion, ``model`` the `Model` (and `load`),
``train_model`` the training entry point. ``import jemlab`` exposes these names without importing torch until one
is used.
"""

from jemlab.api.inputs import ImageBatch
from jemlab.api.model import Model, OODScores, Samples, load
from jemlab.api.train_model import train
from jemlab.typicality import Reference

__all__ = ["ImageBatch", "Model", "OODScores", "Reference", "Samples", "load", "train"]
