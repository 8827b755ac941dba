"""Shared plumbing of the build and the trainer: errors, options and configs, logging, devices, child
processes, what is read from files a user received, provenance, ranks and locks."""
