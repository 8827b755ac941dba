"""The build: listing and decoding the sources, the index, the teacher pass, the patch basis, the heads,
the planner, and the build's config."""
