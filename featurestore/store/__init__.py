"""The store: its format (schema), reading and writing it, its backends, the digest, verify and repair,
slim, and the report `inspect` prints."""
