"""trainer: train small students from a feature store, without the teacher.

Python API (same names and defaults as the CLI): fit, sweep, eval.
"""
from .api import eval, fit, sweep  # noqa: A004

__all__ = ["fit", "sweep", "eval"]
