"""The one storage module: fsspec URLs (local folders and ``s3://``), listing, batched reads,
atomic writes, JSON and Parquet with declared schemas (docs/architecture.md,
'Storage layout').

A :class:`Storage` is bound to a root URL (a lake or a workspace); everything else addresses
objects by a path relative to that root, so stages never build URLs by hand. Relative paths with
``.``/``..`` segments or a leading ``/`` are refused, so nothing (an object key from the lake
included) can address a file outside the root.

Nothing read back is trusted: :meth:`Storage.read_model` validates JSON against a pydantic model
and :meth:`Storage.read_table` Parquet against a declared schema; a file that fails is a
:class:`~tasks.errors.WorkspaceFileError` (:meth:`Storage.bad_file`), one sentence naming the file,
what is wrong and the folder to delete, never an exception deep in the flow. Nothing is
unpickled.

Object-store calls run under the one retry policy of the pipeline (:meth:`Storage._io`, settings
and worst case in :class:`tasks.settings.MachineSettings`): a transient fault
(:func:`tasks.errors.is_transient`) is tried again with exponential backoff, within a number of
attempts and a time budget (``SCAN_LAKE_IO_*``), and then raises
:class:`~tasks.errors.StorageUnavailableError`, one sentence naming the endpoint and the fix;
any other fault surfaces at once. The S3 clients underneath try each request once.
"""

from __future__ import annotations

import io
import json
import logging
import os
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.spec import AbstractFileSystem
from pydantic import BaseModel, ValidationError

from tasks.errors import ScanLakeError, WorkspaceFileError, is_transient, storage_unavailable
from tasks.settings import MachineSettings

logger = logging.getLogger(__name__)

T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)

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


def unsafe_key(key: str) -> str | None:
    """Why ``key`` cannot be used as a path under a root (None when it can): a leading ``/``,
    a ``.`` or ``..`` segment, or a NUL character would let it name a file outside the root."""
    if not key:
        return "empty key"
    if key.startswith("/"):
        return "key starts with '/'"
    if "\x00" in key:
        return "key contains a NUL character"
    if any(part in (".", "..") for part in key.split("/")):
        return "key has a '.' or '..' segment"
    return None


class Storage:
    """Files under one root URL.

    Args:
        url: A local path (relative paths are made absolute) or any fsspec URL, e.g.
            ``s3://bucket/prefix``.
        settings: Machine settings (S3 endpoint and credentials, retries); read from the
            environment when omitted.
    """

    def __init__(self, url: str, settings: MachineSettings | None = None) -> None:
        self.settings = settings or MachineSettings()
        self.protocol = _protocol(url)
        if self.protocol == "file":
            url = os.path.abspath(url.removeprefix("file://"))
        self.url = url.rstrip("/") or "/"
        options: dict[str, Any] = (
            self.settings.s3_options() if self.protocol in ("s3", "s3a") else {}
        )
        try:
            self.fs: AbstractFileSystem = fsspec.filesystem(self.protocol, **options)
        except (ImportError, ValueError) as exc:
            raise ScanLakeError(
                f"Cannot open '{url}' ({exc}): use a local path or an s3:// URL."
            ) from exc
        if hasattr(self.fs, "retries"):
            self.fs.retries = 1  # s3fs: one try per request; _io is the one retry loop
        self.root: str = self.fs._strip_protocol(self.url).rstrip("/")

    def __repr__(self) -> str:
        return f"Storage({self.url!r})"

    @property
    def is_local(self) -> bool:
        """True for a local folder."""
        return self.protocol == "file"

    def path(self, rel: str = "") -> str:
        """The filesystem path of ``rel`` (relative to the root).

        Raises:
            ValueError: ``rel`` could name something outside the root (see :func:`unsafe_key`).
        """
        if not rel:
            return self.root
        problem = unsafe_key(rel)
        if problem is not None:
            raise ValueError(f"refusing the path {rel!r} under {self.url}: {problem}")
        return f"{self.root}/{rel}".rstrip("/")

    def uri(self, rel: str = "") -> str:
        """The full URL of ``rel``, as a user would type it."""
        return f"{self.url}/{rel}" if rel else self.url

    def relative(self, path: str) -> str:
        """Inverse of :meth:`path` for paths under the root."""
        return path[len(self.root) :].lstrip("/")

    def _io(self, action: str, call: Callable[[], T]) -> T:
        """Run one object-store ``call`` under the retry policy: on a transient fault
        (:func:`~tasks.errors.is_transient`) try again after ``io_backoff_seconds``, doubling,
        at most ``io_attempts`` tries and none after ``io_max_seconds``, then raise
        :class:`StorageUnavailableError` naming ``action``; any other fault surfaces at once."""
        if self.is_local:
            return call()
        settings = self.settings
        start = time.monotonic()
        attempt = 0
        while True:
            attempt += 1
            try:
                return call()
            except Exception as exc:
                if not is_transient(exc):
                    raise
                delay = settings.io_backoff_seconds * 2 ** (attempt - 1)
                elapsed = time.monotonic() - start
                if attempt >= settings.io_attempts or elapsed + delay > settings.io_max_seconds:
                    raise storage_unavailable(
                        settings.s3_endpoint_name,
                        f"{action} (after {attempt} attempts in {elapsed:.0f} s)",
                        exc,
                    ) from exc
                logger.warning(
                    "%s failed (%s); retry %d/%d in %.1f s",
                    action,
                    type(exc).__name__,
                    attempt,
                    settings.io_attempts - 1,
                    delay,
                )
                time.sleep(delay)
                self.fs.invalidate_cache()

    # -- checks -------------------------------------------------------------------------------

    def check_reachable(self, create: bool = False) -> None:
        """Fail with a clear sentence when the root cannot be reached or does not exist.

        Args:
            create: The root is a workspace: create a missing local folder (an S3 bucket must
                exist) and prove that it is writable by writing and removing a probe object.

        Raises:
            ScanLakeError: unreachable endpoint, missing bucket, missing folder, no credentials,
                no access, a workspace that cannot be written.
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
            if create:
                self._check_writable()
        except ScanLakeError:
            raise
        except PermissionError as exc:
            raise ScanLakeError(
                f"Access to '{self.url}' was denied ({exc}): check AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY."
            ) from exc
        except Exception as exc:  # botocore connection errors, DNS failures, ...
            if type(exc).__name__ in ("NoCredentialsError", "PartialCredentialsError"):
                raise ScanLakeError(
                    f"No S3 credentials were found for '{self.url}' ({exc}): set "
                    "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)."
                ) from exc
            raise ScanLakeError(
                f"Cannot reach '{self.url}' ({type(exc).__name__}: {exc}): check "
                "SCAN_LAKE_S3_ENDPOINT_URL / AWS_ENDPOINT_URL and that the server is up."
            ) from exc

    def _check_writable(self) -> None:
        probe = f".scan-lake-write-probe-{uuid.uuid4().hex[:12]}"
        try:
            self.write_bytes(probe, b"")
        except PermissionError as exc:
            raise ScanLakeError(
                f"The workspace '{self.url}' cannot be written with these credentials ({exc}): "
                "grant them write access or choose another --workspace."
            ) from exc
        try:
            self.fs.rm_file(self.path(probe))
        except OSError:
            logger.warning("could not remove the write probe %s", self.uri(probe))

    # -- listing and reading -----------------------------------------------------------------

    def list_objects(self, prefix: str = "", hidden: bool = False) -> list[ObjectInfo]:
        """Every object under ``prefix`` (fresh listing, caches invalidated), sorted by key.

        Args:
            prefix: Relative folder to list.
            hidden: Also list names with a part starting with ``.``; left out by default
                because the workspace's are temp files (a lake's are listed).
        """
        base = self.path(prefix)

        def find() -> dict[str, Any]:
            self.fs.invalidate_cache()
            if not self.fs.exists(base):
                return {}
            return dict(self.fs.find(base, detail=True))

        found = self._io(f"listing {self.uri(prefix)}", find)
        out = []
        for path, info in found.items():
            if info.get("type") == "directory":
                continue
            key = self.relative(path)
            if not hidden and any(part.startswith(".") for part in key.split("/")):
                continue
            version = info.get("ETag") or info.get("etag") or info.get("mtime") or ""
            if not isinstance(version, str):
                version = repr(version)
            out.append(ObjectInfo(key=key, size=int(info.get("size") or 0), version=version))
        out.sort(key=lambda o: o.key)
        return out

    def exists(self, rel: str) -> bool:
        """Whether ``rel`` exists (no cached answer)."""
        path = self.path(rel)

        def check() -> bool:
            self.fs.invalidate_cache(path)
            return bool(self.fs.exists(path))

        return self._io(f"looking for {self.uri(rel)}", check)

    def read_bytes(self, rel: str) -> bytes:
        """The content of ``rel``."""
        path = self.path(rel)
        return self._io(f"reading {self.uri(rel)}", lambda: bytes(self.fs.cat_file(path)))

    def read_many(
        self,
        keys: list[str],
        batch: int = 512,
        errors: Literal["raise", "return"] = "raise",
    ) -> Iterator[tuple[str, bytes | OSError]]:
        """Yield ``(key, content)`` for ``keys``, read ``batch`` at a time (concurrently on S3).

        Lost connections are retried like every call (see :meth:`_io`). With
        ``errors="return"``, a missing object (deleted since it was listed) or a denied read
        yields its ``FileNotFoundError`` / ``PermissionError`` in place of the content.

        Raises:
            OSError: the first read that failed otherwise.
        """
        for start in range(0, len(keys), batch):
            chunk = keys[start : start + batch]
            paths = [self.path(k) for k in chunk]
            results = self._read_chunk(paths)
            for key, path in zip(chunk, paths, strict=True):
                value = results[path]
                if not isinstance(value, BaseException):
                    yield key, bytes(value)
                elif errors == "return" and isinstance(value, FileNotFoundError | PermissionError):
                    yield key, value
                else:
                    raise OSError(f"reading {self.uri(key)} failed: {value}") from value

    def _cat(self, paths: list[str]) -> dict[str, Any]:
        if len(paths) != 1:
            return dict(self.fs.cat(paths, on_error="return"))
        try:
            return {paths[0]: self.fs.cat_file(paths[0])}
        except Exception as exc:
            return {paths[0]: exc}

    def _read_chunk(self, paths: list[str]) -> dict[str, Any]:
        """Content (or the exception) of each path; reads that lost the connection are retried."""
        results: dict[str, Any] = {}
        pending = list(paths)

        def read() -> None:
            got = self._cat(pending)
            lost = [p for p, v in got.items() if isinstance(v, Exception) and is_transient(v)]
            results.update({p: v for p, v in got.items() if p not in lost})
            pending[:] = lost
            if lost:
                raise got[lost[0]]

        self._io(f"reading {len(paths)} objects of {self.url}", read)
        return results

    def bad_file(self, rel: str, problem: str) -> WorkspaceFileError:
        """The sentence for the workspace file ``rel`` that cannot be used: ``problem`` says what
        is wrong (``"is not JSON (...)"``); the fix is to delete the folder that holds it, the
        first two parts of ``rel`` (a stage key, a store, a lake's history), which the next run
        computes again."""
        folder = "/".join(rel.split("/")[:2])
        return WorkspaceFileError(
            f"The workspace file {self.uri(rel)} {problem}: delete {self.uri(folder)} so that "
            "the next run computes it again, and check who else can write this workspace."
        )

    def read_json(self, rel: str) -> Any:
        """Parse ``rel`` as JSON.

        Raises:
            WorkspaceFileError: ``rel`` is not UTF-8 JSON.
        """
        data = self.read_bytes(rel)
        try:
            return json.loads(data)
        except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
            raise self.bad_file(rel, f"is not JSON ({_short(exc)})") from exc

    def read_model(self, rel: str, model: type[M], what: str) -> M:
        """Read ``rel`` as JSON and validate it as ``model`` (``what`` names it in the error).

        Raises:
            WorkspaceFileError: ``rel`` is not JSON or not a valid ``what``.
        """
        value = self.read_json(rel)
        try:
            return model.model_validate(value)
        except ValidationError as exc:
            raise self.bad_file(rel, f"is not a valid {what} ({validation_problem(exc)})") from exc

    def read_table(
        self,
        rel: str | list[str],
        columns: list[str] | None = None,
        schema: pa.Schema | None = None,
    ) -> pa.Table:
        """Read one Parquet file, or several with one schema, into a table.

        Args:
            rel: The file, or the files.
            columns: Read only these columns.
            schema: The declared schema (:mod:`tasks.schemas`) each file must have: its columns
                (those of ``columns``, when given) with their types; metadata aside.

        Raises:
            WorkspaceFileError: a file is not Parquet, or its columns are not ``schema``'s.
            FileNotFoundError: a file does not exist.
        """
        rels = [rel] if isinstance(rel, str) else rel
        if not rels:
            raise FileNotFoundError("no Parquet file to read")
        tables = [self._read_parquet(r, columns, schema) for r in rels]
        if len(tables) == 1:
            return tables[0]
        try:
            return pa.concat_tables(tables)
        except pa.ArrowException as exc:
            raise self.bad_file(rels[0], f"does not match the other files ({_short(exc)})") from exc

    def _read_parquet(
        self, rel: str, columns: list[str] | None, schema: pa.Schema | None
    ) -> pa.Table:
        path = self.path(rel)

        def read() -> pa.Table:
            return pq.read_table(path, filesystem=self.fs, columns=columns)

        try:
            table = self._io(f"reading {self.uri(rel)}", read)
        except (FileNotFoundError, PermissionError, ScanLakeError):
            raise
        except (pa.ArrowException, OSError, ValueError) as exc:
            detail = _short(exc, without=path)
            raise self.bad_file(rel, f"is not a readable Parquet file ({detail})") from exc
        if schema is not None:
            wanted = [schema.field(c) for c in columns] if columns else list(schema)
            got = [(f.name, f.type) for f in table.schema]
            if got != [(f.name, f.type) for f in wanted]:
                shown = ", ".join(f"{name}: {kind}" for name, kind in got)[:200]
                raise self.bad_file(rel, f"does not have the declared columns (it has {shown})")
        return table

    # -- writing ------------------------------------------------------------------------------

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Write ``data`` to ``rel`` so that a reader never sees half an object: one PUT on S3
        (atomic there), a temp file renamed into place in a local folder."""
        final = self.path(rel)
        parent = final.rpartition("/")[0]
        if not self.is_local:
            self._io(f"writing {self.uri(rel)}", lambda: self.fs.pipe_file(final, data))
            self.fs.invalidate_cache(parent)
            return
        temp = _temp_name(final)
        self.fs.makedirs(parent, exist_ok=True)
        try:
            self.fs.pipe_file(temp, data)
            os.replace(temp, final)
        finally:
            if os.path.exists(temp):
                os.unlink(temp)
        self.fs.invalidate_cache(parent)

    def create_exclusive(self, rel: str, data: bytes) -> bool:
        """Write ``data`` to ``rel`` only if nothing is there yet; return whether it was written.

        Exactly one of several concurrent writers wins: a hard link of a complete temp file in a
        local folder, ``If-None-Match: *`` on S3 (AWS, SeaweedFS and MinIO honour it). Readers
        never see half an object.
        """
        final = self.path(rel)
        parent = final.rpartition("/")[0]
        if not self.is_local:

            def put() -> bool:
                try:
                    self.fs.pipe_file(final, data, IfNoneMatch="*")
                except OSError:
                    # 412 Precondition Failed / 409 conflict: it is there (checked within this
                    # try, so a lost connection is retried by the one loop around it)
                    self.fs.invalidate_cache(final)
                    if self.fs.exists(final):
                        return False
                    raise
                return True

            written = self._io(f"writing {self.uri(rel)}", put)
            self.fs.invalidate_cache(parent)
            return written
        temp = _temp_name(final)
        self.fs.makedirs(parent, exist_ok=True)
        try:
            self.fs.pipe_file(temp, data)
            os.link(temp, final)
        except FileExistsError:
            return False
        finally:
            if os.path.exists(temp):
                os.unlink(temp)
            self.fs.invalidate_cache(parent)
        return True

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
            path = self.path(rel)
            self._io(f"removing {self.uri(rel)}", lambda: self.fs.rm(path, recursive=True))


def _short(exc: BaseException, without: str = "") -> str:
    """``exc`` on one line, at most 160 characters, without the quoted path ``without`` (the
    sentence names the file already)."""
    text = f"{type(exc).__name__}: {exc}"
    if without:
        text = text.replace(f" '{without}'", "")
    return " ".join(text.split())[:160]


def validation_problem(exc: ValidationError) -> str:
    """The first problem of a pydantic validation error, as ``field: message``."""
    first = exc.errors()[0]
    where = ".".join(str(part) for part in first["loc"]) or "the value"
    return f"{where}: {first['msg']}"[:160]


def table_stage_key(table: pa.Table) -> str | None:
    """The stage key a table was written by (schema metadata), if any."""
    value = (table.schema.metadata or {}).get(STAGE_KEY_METADATA)
    return value.decode() if value else None
