"""Metrics: each tested against an independent computation."""
