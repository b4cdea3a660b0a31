"""pointsink: Sinkformers for 3D shape classification."""

from pointsink.inference import Prediction, ShapeClassifier
from pointsink.model import SetSinkformer
from pointsink.sinkhorn import log_sinkhorn, sinkhorn, sinkhorn_potentials
from pointsink.sinkhorn_attention import sinkhorn_attention

__all__ = [
    "Prediction",
    "SetSinkformer",
    "ShapeClassifier",
    "log_sinkhorn",
    "sinkhorn",
    "sinkhorn_attention",
    "sinkhorn_potentials",
]
__version__ = "0.1.0"
