"""medsyn: text-guided medical image synthesis under one data format and one evaluation protocol."""

__version__ = "0.1.0"
