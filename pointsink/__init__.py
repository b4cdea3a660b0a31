"""pointsink: Sinkformers for 3D shape classification."""

from pointsink.sinkhorn import log_sinkhorn, sinkhorn, sinkhorn_potentials

__all__ = ["log_sinkhorn", "sinkhorn", "sinkhorn_potentials"]
__version__ = "0.1.0"
