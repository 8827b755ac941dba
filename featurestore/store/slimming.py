"""`featurestore slim SRC DST --fields ...`: a copy of a store holding only the arrays named.

Labels, split, ids, sha256, the progress marks and the small arrays (heads, patch basis) always come
along; the dropped arrays are listed in the copy's `dropped` attribute, so the trainer reads it as it
reads a full store and says clearly when a loss needs what was dropped. The copy goes chunk by chunk
through checked reads (damage in SRC stops the copy) and is verified at the end.
"""
from __future__ import annotations

from featurestore.common.log import logger
from featurestore.common.options import ConfigError
from featurestore.store.backends import backend_class
from featurestore.store.reader import StoreReader
from featurestore.store.schema import StoreError, fields, progress_fields
from featurestore.store.writer import StoreWriter, occupied


def slim(src: str, dst: str, keep: list[str], storage_options: dict | None = None) -> None:
    """storage_options: for stores at URLs (the source, the copy, or both: slim straight into a bucket)."""
    from featurestore.store.integrity import seal_with_digest
    keep = [k.strip() for k in keep if k.strip()]
    if occupied(dst, storage_options):
        raise ConfigError(f"{dst} exists; slim writes a new store")
    with StoreReader.open(src, storage_options, reader="featurestore slim") as s:
        if not s.complete:
            raise StoreError(f"{src} is not complete; finish its build before slimming it")
        names = [f.name for f in s.fields()]
        unknown = sorted(set(keep) - set(names))
        if unknown:
            raise ConfigError(f"{src} has no arrays {unknown}; its arrays are {', '.join(names)}")
        always = [f.name for f in s.fields() if f.kind == "index"]
        dropped = [name for name in names if name not in keep and name not in always]
        attrs = {k: v for k, v in s.attrs.items() if k != "digest"} | {
            "dropped": sorted(set(s.attrs.get("dropped", [])) | set(dropped)), "slimmed_from": src,
            "slimmed_from_digest": s.attrs.get("digest")}
        compression = s.attrs.get("config", {}).get("store", {}).get("compression", "default")
        if backend_class(dst).kind != s.backend.kind:
            compression = "default"
        d = StoreWriter.create(dst, attrs | {"format_version": None}, compression, storage_options)
        try:
            for f in fields(attrs):
                for c in range(s.num_chunks):
                    a, b = s.chunk_range(c)
                    d.write(f.name, a, s.read(f.name, a, b))
            for marks in progress_fields(s.attrs):
                d.reset_done(s.done(marks.teacher), marks)
            for key in s.small_keys():
                d.write_small(key, s.small(key))
            d.set_attrs({"format_version": attrs["format_version"]})
            try:
                seal_with_digest(d)
            except StoreError as e:
                raise StoreError(f"{dst} did not verify: {e}") from None
            before = sum(s.stored_bytes(f.name) for f in s.fields())
            after = sum(d.reader.stored_bytes(f.name) for f in d.reader.fields())
        finally:
            d.close()
    logger.info(f"wrote {dst}: kept {', '.join(f.name for f in fields(attrs))}; dropped "
                f"{', '.join(dropped) or 'nothing'}; {before / 1e6:.1f} MB -> {after / 1e6:.1f} MB; verified")
