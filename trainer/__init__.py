"""trainer: train small students from a feature store, without the teacher.

Python API (same names and defaults as the CLI): fit, sweep, eval, export.
"""
from trainer.api import eval, export, fit, sweep  # noqa: A004

__all__ = ["fit", "sweep", "eval", "export"]
