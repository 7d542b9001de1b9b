"""Experiments that train models to measure something: they sit above `medsyn.training` (which trains)
and `medsyn.metrics` (which measures), and the notebooks call them."""
