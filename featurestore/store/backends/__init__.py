"""Where a store's bytes live: one class per backend, behind the small protocol the reader and the
writer use, so that nothing else branches on the backend.

- `ZarrBackend`: Zarr v3 on a local disk; each store chunk of an array is one shard file with inner
  chunks as the schema lays them out, crc32c after the compressor; direct shard reads (shards.py).
- `RemoteZarr`: the same layout on object storage or any fsspec URL (s3://, gs://, ...), through
  zarr's FsspecStore; direct shard reads of byte ranges through fsspec. Endpoint, credentials and
  options come from the usual places (AWS_ENDPOINT_URL, profiles) and from `storage_options`.
- `Hdf5Backend`: one HDF5 file on a local disk; chunks as the schema's inner chunks, fletcher32.

Each backend is one module here with one class under `@register_backend` (base.py) saying which paths
it `claims` and its `priority`; the modules are imported from this package, so a new backend is one
file. A backend is opened for reading ("r"), appending ("r+") or created anew ("w"). Reads and writes
take and return numpy arrays; a backend's own exceptions travel up, and the reader turns them into
one StoreError naming the array and chunk. A finished Zarr store carries consolidated metadata
(`seal`), so opening it is one read of its root document, not one per array.
"""
from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path

from featurestore.store.backends.base import (
    BACKENDS,
    HDF5_SUFFIXES,
    Backend,
    first_line,
    is_local,
    local_path,
    register_backend,
)
from featurestore.store.backends.hdf5 import Hdf5Backend, hdf5_codec
from featurestore.store.backends.remote import (
    CACHE_ENV,
    CACHE_GB_ENV,
    RemoteZarr,
    filesystem,
    fresh_listings,
    read_cache,
)
from featurestore.store.backends.zarr_local import ZarrBackend, zarr_codec

__all__ = ["BACKENDS", "CACHE_ENV", "CACHE_GB_ENV", "HDF5_SUFFIXES", "Backend", "Hdf5Backend", "RemoteZarr",
           "ZarrBackend", "backend_class", "filesystem", "first_line", "fresh_listings", "hdf5_codec", "is_local",
           "local_path", "open_backend", "read_cache", "register_backend", "zarr_codec"]

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")


def backend_class(path: str | Path) -> type[Backend]:
    """The backend of highest priority that claims the path."""
    for cls in BACKENDS:
        if cls.claims(str(path)):
            return cls
    from featurestore.store.schema import StoreError
    raise StoreError(f"{path}: no backend takes this path (backends: {', '.join(c.__name__ for c in BACKENDS)})")


def open_backend(path: str | Path, mode: str, options: dict | None = None) -> Backend:
    """mode: r (read), r+ (append) or w (create anew); options: fsspec storage options."""
    return backend_class(path)(str(path), mode, options)
