"""Zarr at an fsspec URL (s3://, gs://, ...): the local Zarr layout through zarr's FsspecStore, direct
shard reads of byte ranges through fsspec, and a local read cache that keeps each shard once fetched.
Endpoint, credentials and options come from the usual places (AWS_ENDPOINT_URL, profiles) and from
`storage_options`."""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

from featurestore.store.backends.base import first_line, foreign_entries, is_local, register_backend, zarr_manifest
from featurestore.store.backends.zarr_local import ZarrBackend
from featurestore.store.schema import StoreError
from featurestore.store.shards import CachedFiles, FsspecFiles


@register_backend
class RemoteZarr(ZarrBackend):
    """A Zarr store at an fsspec URL. zarr's FsspecStore serves zarr (asynchronously); a synchronous
    filesystem of the same URL serves listings and the direct reads' byte ranges."""
    priority = 10

    @classmethod
    def claims(cls, path: str) -> bool:
        return not is_local(path)

    def __init__(self, path: str, mode: str, options: dict | None = None):
        self.options = fresh_listings(options)
        self.fs, self.key = filesystem(path, self.options)
        super().__init__(path, mode, options)
        self.cache = read_cache(path, self.get_attrs()) if mode == "r" else None     # fixed when opened

    def _zarr_store(self, options: dict | None):
        from zarr.storage import FsspecStore
        return FsspecStore.from_url(self.path, storage_options=self.options, read_only=self.mode == "r")

    def _files(self, key: str):
        """Byte ranges through fsspec; kept in the local read cache when the store is only read."""
        files = FsspecFiles(self.fs, f"{self.key}/{key}")
        return files if self.cache is None else CachedFiles(files, self.cache / key)

    def exists(self) -> bool:
        return self.fs.exists(f"{self.key}/zarr.json")

    def foreign_links(self) -> list[str]:
        return []                                      # object storage has no links

    def _sizes(self, key: str) -> dict[str, int]:
        """Every object of array `key` and its size, from one listing."""
        return {k: int(v["size"]) for k, v in self.fs.find(f"{self.key}/{key}", detail=True).items()}

    def stored_bytes(self, key: str) -> int:
        """The array's objects, its metadata document included (zarr's own count asks for each object)."""
        return sum(self._sizes(key).values())

    def payload_bytes(self, key: str) -> int:
        return sum(v for k, v in self._sizes(key).items() if not k.endswith("zarr.json"))

    @classmethod
    def occupied(cls, path: str, options: dict | None = None) -> bool:
        fs, key = filesystem(path, options or {})
        return bool(fs.exists(key) and fs.ls(key, detail=False))

    @classmethod
    def _listing(cls, path: str, options: dict | None) -> tuple[object, str, list[str], dict | None]:
        """(filesystem, key, every object under the store's key relative to it, the root attributes)."""
        fs, key = filesystem(path, options or {})
        names = [n[len(key) + 1:] for n in fs.find(key)] if fs.exists(key) else []
        try:
            attrs = json.loads(fs.cat_file(f"{key}/zarr.json")).get("attributes") or {}
        except (OSError, ValueError, AttributeError):
            attrs = None
        return fs, key, names, attrs

    @classmethod
    def not_made_by_kdstore(cls, path: str, options: dict | None = None) -> str | None:
        _, _, names, attrs = cls._listing(path, options)
        if not names:
            return "it holds nothing"
        folders = {"/".join(n.split("/")[:i]) for n in names for i in range(1, n.count("/") + 1)}
        return foreign_entries(names + sorted(folders), attrs, zarr_manifest)

    @classmethod
    def remove(cls, path: str, options: dict | None = None) -> None:
        """Delete the objects of the store's own manifest, and nothing else under its key."""
        fs, key, names, attrs = cls._listing(path, options)
        known = zarr_manifest(attrs)
        doomed = [f"{key}/{n}" for n in names if n in known]
        if doomed:
            fs.rm(doomed)


CACHE_ENV, CACHE_GB_ENV = "KDSTORE_CACHE", "KDSTORE_CACHE_GB"


def read_cache(url: str, attrs: dict) -> Path | None:
    """The local folder that keeps the shards read from the store at `url`, or None when the cache is
    off (KDSTORE_CACHE=off). It lives under KDSTORE_CACHE (default ~/.cache/kdstore), one folder per
    store and version (a store rebuilt or repaired at the same URL gets a new one), and is kept under
    KDSTORE_CACHE_GB (default 20) by deleting the files used least recently."""
    root = os.environ.get(CACHE_ENV) or str(Path.home() / ".cache" / "kdstore")
    if root.lower() == "off":
        return None
    import hashlib
    version = f"{url}|{attrs.get('created')}|{attrs.get('finished')}|{attrs.get('fingerprint')}"
    folder = Path(root).expanduser() / "remote" / hashlib.sha256(version.encode()).hexdigest()[:20]
    _prune(Path(root).expanduser() / "remote", float(os.environ.get(CACHE_GB_ENV, "20")) * 1e9)
    return folder


def _prune(root: Path, limit: float) -> None:
    files = [(p.stat().st_atime, p.stat().st_size, p) for p in root.rglob("*") if p.is_file()] if root.exists() else []
    total = sum(size for _, size, _ in files)
    for _, size, p in sorted(files):
        if total <= limit:
            break
        with contextlib.suppress(OSError):
            p.unlink()
            total -= size


def fresh_listings(options: dict | None) -> dict:
    """fsspec options with listings never cached: a store deleted or rewritten by one filesystem object
    is seen as it is by every other (the user's own options win)."""
    return {"use_listings_cache": False, **(options or {})}


def filesystem(url: str, options: dict):
    """A synchronous fsspec filesystem for `url`, and the path within it; a missing endpoint or
    credentials is one StoreError saying where they come from."""
    import fsspec
    try:
        return fsspec.url_to_fs(url, **fresh_listings(options))
    except (ImportError, ValueError) as e:
        raise StoreError(f"cannot reach {url}: {first_line(e)} (object storage needs its fsspec package, such as "
                         "s3fs for s3:// or gcsfs for gs://)") from None


