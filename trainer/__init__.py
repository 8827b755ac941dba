"""trainer: train small students from a feature store, without the teacher.

Python API (same names and defaults as the CLI): fit, sweep, eval, export.
"""

__all__ = ["fit", "sweep", "eval", "export"]


def __getattr__(name: str):
    """The API loads on first use, so that a worker process importing one module of the package does
    not load the whole of it."""
    if name in __all__:
        from trainer import api
        return getattr(api, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
