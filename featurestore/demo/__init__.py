"""The built-in demo: synthetic images of the ten reference classes (data.py) and small teachers that
know them (teacher.py)."""
from featurestore.demo.data import REFERENCE_CLASSES, REFERENCE_COUNTS, class_counts, make_image, write_demo_data

__all__ = ["REFERENCE_CLASSES", "REFERENCE_COUNTS", "class_counts", "make_image", "write_demo_data"]
