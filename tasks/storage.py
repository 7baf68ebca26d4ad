"""The one storage module: fsspec URLs (local folders and ``s3://``), listing, batched reads,
atomic-ish writes, JSON and Parquet with declared schemas (DESIGN.md §3.5).

A :class:`Storage` is bound to a root URL (a lake or a workspace); everything else addresses
objects by a path relative to that root, so stages never build URLs by hand.
"""

from __future__ import annotations

import io
import json
import logging
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.spec import AbstractFileSystem

from tasks.errors import ScanLakeError
from tasks.settings import MachineSettings

logger = logging.getLogger(__name__)

#: Schema metadata key that names the stage key that produced a table.
STAGE_KEY_METADATA = b"scan_lake.stage_key"


@dataclass(frozen=True)
class ObjectInfo:
    """One listed object: path relative to the root, size in bytes and a version string
    (the S3 ETag, else the modification time) that changes when the object is rewritten."""

    key: str
    size: int
    version: str


def _protocol(url: str) -> str:
    if "://" in url:
        return url.split("://", 1)[0]
    return "file"


def _temp_name(path: str) -> str:
    head, _, tail = path.rpartition("/")
    return f"{head}/.tmp-{uuid.uuid4().hex[:12]}-{tail}"


class Storage:
    """Files under one root URL.

    Args:
        url: A local path (relative paths are made absolute) or any fsspec URL, e.g.
            ``s3://bucket/prefix``.
        settings: Machine settings (S3 endpoint and credentials); read from the environment
            when omitted.
    """

    def __init__(self, url: str, settings: MachineSettings | None = None) -> None:
        settings = settings or MachineSettings()
        self.protocol = _protocol(url)
        if self.protocol == "file":
            url = os.path.abspath(url.removeprefix("file://"))
        self.url = url.rstrip("/") or "/"
        options: dict[str, Any] = settings.s3_options() if self.protocol in ("s3", "s3a") else {}
        try:
            self.fs: AbstractFileSystem = fsspec.filesystem(self.protocol, **options)
        except (ImportError, ValueError) as exc:
            raise ScanLakeError(
                f"Cannot open '{url}' ({exc}): use a local path or an s3:// URL."
            ) from exc
        self.root: str = self.fs._strip_protocol(self.url).rstrip("/")

    def __repr__(self) -> str:
        return f"Storage({self.url!r})"

    @property
    def is_local(self) -> bool:
        """True for a local folder."""
        return self.protocol == "file"

    def path(self, rel: str = "") -> str:
        """The filesystem path of ``rel`` (relative to the root)."""
        return f"{self.root}/{rel}".rstrip("/") if rel else self.root

    def uri(self, rel: str = "") -> str:
        """The full URL of ``rel``, as a user would type it."""
        return f"{self.url}/{rel}" if rel else self.url

    def relative(self, path: str) -> str:
        """Inverse of :meth:`path` for paths under the root."""
        return path[len(self.root) :].lstrip("/")

    # -- checks -------------------------------------------------------------------------------

    def check_reachable(self, create: bool = False) -> None:
        """Fail with a clear sentence when the root cannot be reached or does not exist.

        Args:
            create: Create a missing local folder / S3 prefix (the bucket must exist).

        Raises:
            ScanLakeError: unreachable endpoint, missing bucket, missing folder, no access.
        """
        try:
            if self.protocol in ("s3", "s3a"):
                bucket = self.root.split("/", 1)[0]
                try:
                    self.fs.ls(bucket, refresh=True)  # raises on an unreachable endpoint
                    present = True
                except FileNotFoundError:
                    present = False
                if not present:
                    raise ScanLakeError(
                        f"The S3 bucket '{bucket}' of '{self.url}' does not exist: create it or "
                        "fix the URL (and check SCAN_LAKE_S3_ENDPOINT_URL points at the right "
                        "server)."
                    )
            elif not self.fs.exists(self.root):
                if not create:
                    raise ScanLakeError(
                        f"'{self.url}' does not exist: check the path or create the folder."
                    )
                self.fs.makedirs(self.root, exist_ok=True)
        except ScanLakeError:
            raise
        except PermissionError as exc:
            raise ScanLakeError(
                f"Access to '{self.url}' was denied ({exc}): check AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY."
            ) from exc
        except Exception as exc:  # botocore connection errors, DNS failures, ...
            raise ScanLakeError(
                f"Cannot reach '{self.url}' ({type(exc).__name__}: {exc}): check "
                "SCAN_LAKE_S3_ENDPOINT_URL / AWS_ENDPOINT_URL and that the server is up."
            ) from exc

    # -- listing and reading -----------------------------------------------------------------

    def list_objects(self, prefix: str = "") -> list[ObjectInfo]:
        """Every object under ``prefix`` (fresh listing, caches invalidated), sorted by key.

        Hidden names (a path part starting with ``.``) are left out: they are temp files.
        """
        self.fs.invalidate_cache()
        base = self.path(prefix)
        if not self.fs.exists(base):
            return []
        found = self.fs.find(base, detail=True)
        out = []
        for path, info in found.items():
            if info.get("type") == "directory":
                continue
            key = self.relative(path)
            if any(part.startswith(".") for part in key.split("/")):
                continue
            version = info.get("ETag") or info.get("etag") or info.get("mtime") or ""
            if not isinstance(version, str):
                version = repr(version)
            out.append(ObjectInfo(key=key, size=int(info.get("size") or 0), version=version))
        out.sort(key=lambda o: o.key)
        return out

    def exists(self, rel: str) -> bool:
        """Whether ``rel`` exists (no cached answer)."""
        self.fs.invalidate_cache(self.path(rel))
        return bool(self.fs.exists(self.path(rel)))

    def read_bytes(self, rel: str) -> bytes:
        """The content of ``rel``."""
        return bytes(self.fs.cat_file(self.path(rel)))

    def read_many(self, keys: list[str], batch: int = 512) -> Iterator[tuple[str, bytes]]:
        """Yield ``(key, content)`` for ``keys``, read ``batch`` at a time (concurrently on S3).

        Raises:
            OSError: the first read that failed (the calling task retries).
        """
        for start in range(0, len(keys), batch):
            chunk = keys[start : start + batch]
            paths = [self.path(k) for k in chunk]
            if len(paths) == 1:
                results = {paths[0]: self.fs.cat_file(paths[0])}
            else:
                results = self.fs.cat(paths, on_error="return")
            for key, path in zip(chunk, paths, strict=True):
                value = results[path]
                if isinstance(value, BaseException):
                    raise OSError(f"reading {self.uri(key)} failed: {value}") from value
                yield key, bytes(value)

    def read_json(self, rel: str) -> Any:
        """Parse ``rel`` as JSON."""
        return json.loads(self.read_bytes(rel))

    def read_table(self, rel: str | list[str], columns: list[str] | None = None) -> pa.Table:
        """Read one Parquet file, or several with one schema, into a table."""
        paths = [self.path(r) for r in ([rel] if isinstance(rel, str) else rel)]
        tables = [pq.read_table(p, filesystem=self.fs, columns=columns) for p in paths]
        if not tables:
            raise FileNotFoundError("no Parquet file to read")
        return pa.concat_tables(tables) if len(tables) > 1 else tables[0]

    # -- writing ------------------------------------------------------------------------------

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Write ``data`` to ``rel`` under a temp name, then move it into place, so a reader
        never sees half an object."""
        final = self.path(rel)
        temp = _temp_name(final)
        parent = final.rpartition("/")[0]
        if self.is_local:
            self.fs.makedirs(parent, exist_ok=True)
        self.fs.pipe_file(temp, data)
        try:
            self.fs.mv(temp, final)
        finally:
            if self.fs.exists(temp):
                self.fs.rm_file(temp)
        self.fs.invalidate_cache(parent)

    def write_json(self, rel: str, value: Any) -> None:
        """Write ``value`` as indented JSON."""
        self.write_bytes(rel, json.dumps(value, indent=2, sort_keys=True).encode())

    def write_table(self, rel: str, table: pa.Table, stage_key: str) -> int:
        """Write ``table`` as Parquet with ``stage_key`` in its schema metadata; return bytes."""
        metadata = dict(table.schema.metadata or {})
        metadata[STAGE_KEY_METADATA] = stage_key.encode()
        table = table.replace_schema_metadata(metadata)
        buffer = io.BytesIO()
        pq.write_table(table, buffer, compression="zstd")
        data = buffer.getvalue()
        self.write_bytes(rel, data)
        return len(data)

    def remove(self, rel: str) -> None:
        """Remove ``rel`` and everything under it, if present."""
        if self.exists(rel):
            self.fs.rm(self.path(rel), recursive=True)


def table_stage_key(table: pa.Table) -> str | None:
    """The stage key a table was written by (schema metadata), if any."""
    value = (table.schema.metadata or {}).get(STAGE_KEY_METADATA)
    return value.decode() if value else None
