"""Metrics: each tested against an independent computation."""

from medsyn.metrics.fidelity import frechet_distance

__all__ = ["frechet_distance"]
