"""Metrics: each tested against an independent computation."""

from medsyn.metrics.fidelity import frechet_distance
from medsyn.metrics.niqe import niqe

__all__ = ["frechet_distance", "niqe"]
