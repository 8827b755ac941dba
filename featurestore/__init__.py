"""featurestore: run a vision teacher once over augmented views and store its outputs.

Python API (same names and defaults as the CLI): build, plan, slim, inspect, verify, demo_data,
demo_teacher.
"""
from featurestore.api import build, demo_data, demo_teacher, inspect, plan, slim, verify

__all__ = ["build", "plan", "slim", "inspect", "verify", "demo_data", "demo_teacher"]
