"""featurestore: run a vision teacher once over augmented views and store its outputs."""
