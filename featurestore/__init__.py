"""featurestore: run a vision teacher once over augmented views and store its outputs.

Python API (same names and defaults as the CLI): build, add_teacher, plan, slim, inspect, show, verify,
demo_data, demo_teacher.
"""

__all__ = ["build", "add_teacher", "plan", "slim", "inspect", "show", "verify", "demo_data", "demo_teacher"]


def __getattr__(name: str):
    """The API loads on first use, so that a worker process importing one module of the package does
    not load the whole of it."""
    if name in __all__:
        from featurestore import api
        return getattr(api, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
