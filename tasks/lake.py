"""The lake scan that runs on every flow run: list, hash, inspect, decode (docs/architecture.md,
'The stage contract').

Objects whose (key, size, version) are unchanged since the previous scan keep their image_id without
being read again, unless their pixels are missing from the pixel store; the rest are read in
concurrent batches, hashed, inspected and decoded, in shards of ``SCAN_LAKE_SHARD_IMAGES`` objects
fanned out on the run's engine (:mod:`tasks.parallel`), each shard appending one pixel store file
named by its content. Every listed object ends up either usable or quarantined with a one-sentence
reason: the one :class:`scan_core.images.ImageDecodeError` gives, or, without reading it, a key that
could name a path outside the lake (``..`` segments) or a size above ``SCAN_LAKE_MAX_OBJECT_BYTES``,
or a read the credentials may not do. Objects deleted between listing and reading are no longer part
of the lake. The lake is only ever read.

The scan writes a snapshot (the catalog stage's input) named by the catalog key, so an unchanged
lake gives the same key and every stage after it is a cache hit. What it reads back from the
workspace is checked: an index that fails (:func:`previous_index`) means reading every object
again, the pixel store is validated by :mod:`tasks.pixels`, and the snapshot is written by every
scan, never read from an earlier one.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, ConfigDict

from scan_core.config import ImageConfig
from scan_core.data import LABELS_SIDECAR
from scan_core.images import ImageDecodeError, decode_image, image_id, inspect_image
from tasks import keys, pixels
from tasks.errors import ScanLakeError, WorkspaceFileError
from tasks.parallel import chunks, fan_out
from tasks.schemas import LAKE_INDEX, LISTING
from tasks.settings import MachineSettings
from tasks.storage import ObjectInfo, Storage, unsafe_key

logger = logging.getLogger(__name__)

#: An image_id: the SHA-256 hex of an object's bytes (:func:`scan_core.images.image_id`).
IMAGE_ID = re.compile(r"[0-9a-f]{64}")
DENIED = "reading the object was denied: grant the pipeline's credentials read access to it"


class LakeSnapshot(BaseModel):
    """What one scan of the lake found (small; the rows are in ``listing``)."""

    model_config = ConfigDict(frozen=True)

    lake: str
    listing: str  # workspace-relative Parquet snapshot (schema LISTING)
    images_key: str
    catalog_key: str
    image_config_key: str
    num_objects: int
    num_images: int
    num_unique: int
    num_quarantined: int
    num_read: int
    num_decoded: int
    has_labels: bool
    labels_fingerprint: str | None

    def summary(self) -> str:
        """One log line: what the scan found and what it had to read and decode."""
        return (
            f"{self.num_objects} objects, {self.num_images} usable images "
            f"({self.num_unique} unique), {self.num_quarantined} quarantined; "
            f"read {self.num_read}, decoded {self.num_decoded}"
        )


def index_path(lake: Storage) -> str:
    """Workspace-relative path of the lake's index (previous scan, per lake URL)."""
    return f"lake-index/{hashlib.sha256(lake.url.encode()).hexdigest()[:24]}.parquet"


def lake_objects(lake: Storage, workspace: Storage) -> list[ObjectInfo]:
    """The lake's image candidates: every object, hidden names included, but the labels
    sidecar and a nested workspace."""
    nested = ""
    if workspace.protocol == lake.protocol and workspace.root.startswith(lake.root + "/"):
        nested = workspace.root[len(lake.root) + 1 :] + "/"
    return [
        o
        for o in lake.list_objects(hidden=True)
        if o.key != LABELS_SIDECAR and not (nested and o.key.startswith(nested))
    ]


def refusal(obj: ObjectInfo, max_bytes: int) -> str | None:
    """Why ``obj`` is quarantined without being read, or None to read it."""
    problem = unsafe_key(obj.key)
    if problem is not None:
        return f"unsafe object key ({problem}), not read: rename the object"
    if obj.size > max_bytes:
        return (
            f"object of {obj.size} bytes exceeds the limit of {max_bytes} bytes "
            "(SCAN_LAKE_MAX_OBJECT_BYTES), not read"
        )
    return None


def read_labels(lake: Storage) -> tuple[dict[str, int], str | None]:
    """The labels sidecar as ``{key: label}`` and its fingerprint (empty, None when absent).

    Raises:
        ScanLakeError: the sidecar exists but is not a (key, label) Parquet table.
    """
    if not lake.exists(LABELS_SIDECAR):
        return {}, None
    data = lake.read_bytes(LABELS_SIDECAR)
    try:
        parsed = pq.read_table(pa.BufferReader(data), columns=["key", "label"])
    except Exception as exc:
        raise ScanLakeError(
            f"The labels sidecar {lake.uri(LABELS_SIDECAR)} is not a Parquet table with columns "
            f"key and label ({exc}): fix or remove it."
        ) from exc
    labels = dict(zip(parsed["key"].to_pylist(), parsed["label"].to_pylist(), strict=True))
    return labels, hashlib.sha256(data).hexdigest()


def previous_index(workspace: Storage, rel: str) -> dict[str, dict[str, Any]]:
    """The previous scan's index rows by key; empty (every object is read again) when there is
    none or it cannot be used: not Parquet, other columns than :data:`LAKE_INDEX`, or rows
    whose image_id is not a content hash."""
    if not workspace.exists(rel):
        return {}
    try:
        rows = workspace.read_table(rel, schema=LAKE_INDEX).to_pylist()
    except WorkspaceFileError as exc:
        logger.warning("%s Reading every object of the lake again.", exc)
        return {}
    bad = next((r for r in rows if not _valid_index_row(r)), None)
    if bad is not None:
        logger.warning(
            "the lake index %s has an invalid row (key %r); reading every object of the lake again",
            workspace.uri(rel),
            str(bad["key"])[:80],
        )
        return {}
    return {row["key"]: row for row in rows}


def _valid_index_row(row: dict[str, Any]) -> bool:
    """A usable row names a content hash (and no reason), a refused one a reason."""
    image = row["image_id"]
    if row["key"] is None or row["size"] is None or row["version"] is None:
        return False
    if row["reason"] is None:
        return isinstance(image, str) and IMAGE_ID.fullmatch(image) is not None
    return image is None or IMAGE_ID.fullmatch(image) is not None


def _blank_row(obj: ObjectInfo) -> dict[str, Any]:
    return {
        "key": obj.key,
        "size": obj.size,
        "version": obj.version,
        "image_id": None,
        "reason": None,
        "format": None,
        "mode": None,
        "width": None,
        "height": None,
    }


def _plan_reads(
    objects: list[ObjectInfo],
    previous: dict[str, dict[str, Any]],
    have_pixels: set[str],
    max_bytes: int,
) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """The index rows known without reading (refused objects; unchanged ones whose pixels are
    stored) and the keys to read."""
    rows: dict[str, dict[str, Any]] = {}
    to_read: list[str] = []
    for obj in objects:
        old = previous.get(obj.key)
        refused = refusal(obj, max_bytes)
        if refused is not None:
            rows[obj.key] = {**_blank_row(obj), "reason": refused}
        elif (
            old is not None
            and old["size"] == obj.size
            and old["version"] == obj.version
            and old["reason"] != DENIED  # read again: the access may have been granted since
            and (old["reason"] is not None or old["image_id"] in have_pixels)
        ):
            rows[obj.key] = old
        else:
            to_read.append(obj.key)
    return rows, to_read


@task(name="scan-lake", persist_result=False, cache_policy=NO_CACHE)
def scan_lake(lake_url: str, workspace_url: str, image_config: dict[str, Any]) -> LakeSnapshot:
    """List and fingerprint the lake, decode new images into the pixel store, write a snapshot
    (a task that always runs; the storage module retries transient faults, the task does not).

    Raises:
        ScanLakeError: unreachable lake or workspace, a lake without objects.
    """
    settings = MachineSettings()
    config = ImageConfig.model_validate(image_config)
    lake, workspace = Storage(lake_url, settings), Storage(workspace_url, settings)
    objects = lake_objects(lake, workspace)
    if not objects:
        raise ScanLakeError(
            f"The lake '{lake.url}' holds no objects: point --lake at a folder or prefix with "
            "images."
        )
    config_key = keys.image_config_key(config.fingerprint())
    previous = previous_index(workspace, index_path(lake))
    have_pixels = pixels.stored_ids(workspace, config_key)

    rows, to_read = _plan_reads(objects, previous, have_pixels, settings.max_object_bytes)
    sizes = {o.key: o for o in objects}
    shards = chunks([sizes[k] for k in to_read], settings.shard_images)
    results = fan_out(
        decode_shard,
        shards,
        stage="catalog",
        note="objects read",
        size_of=len,
        lake_url=lake.url,
        workspace_url=workspace.url,
        image_config=config.model_dump(mode="json"),
        known=have_pixels,
    )
    decoded = 0
    for result in results:
        rows.update({row["key"]: row for row in result["rows"]})
        decoded += result["decoded"]

    ordered = [rows[o.key] for o in objects if o.key in rows]
    index = pa.Table.from_pylist(ordered, schema=LAKE_INDEX)
    workspace.write_table(index_path(lake), index, "lake-index")

    labels, labels_fp = read_labels(lake)
    good = [r for r in ordered if r["reason"] is None]
    unique = sorted({r["image_id"] for r in good})
    if not unique:
        raise ScanLakeError(
            f"None of the {len(ordered)} objects in '{lake.url}' is a usable image (see the "
            "quarantine reasons in the log): add PNG/JPEG/WEBP/GIF/BMP/TIFF images."
        )
    images = keys.images_key(unique, config.fingerprint())
    pairs = keys.digest_lines(f"{r['key']}\t{r['image_id']}" for r in good)
    bad = keys.digest_lines(f"{r['key']}\t{r['reason']}" for r in ordered if r["reason"])
    catalog_key = keys.stage_key(
        "catalog",
        config.fingerprint(),
        {"images": images, "pairs": pairs, "quarantine": bad, "labels": labels_fp or ""},
    )
    # written by every scan, never trusted from an earlier one (same key, same content)
    listing_rel = f"listings/{catalog_key}.parquet"
    listing = [{**r, "uri": lake.uri(r["key"]), "label": labels.get(r["key"])} for r in ordered]
    workspace.write_table(listing_rel, pa.Table.from_pylist(listing, schema=LISTING), catalog_key)
    snapshot = LakeSnapshot(
        lake=lake.url,
        listing=listing_rel,
        images_key=images,
        catalog_key=catalog_key,
        image_config_key=config_key,
        num_objects=len(ordered),
        num_images=len(good),
        num_unique=len(unique),
        num_quarantined=len(ordered) - len(good),
        num_read=len(to_read),
        num_decoded=decoded,
        has_labels=labels_fp is not None,
        labels_fingerprint=labels_fp,
    )
    logger.info("lake %s: %s", lake.url, snapshot.summary())
    return snapshot


@task(name="decode-shard", persist_result=False, cache_policy=NO_CACHE)
def decode_shard(
    shard: list[ObjectInfo],
    lake_url: str,
    workspace_url: str,
    image_config: dict[str, Any],
    known: set[str],
) -> dict[str, Any]:
    """Read, hash, inspect and decode one shard of the lake's objects; append the decoded
    images not in ``known`` to the pixel store as one file named by its content (a retried
    shard writes it again). Returns the shard's index rows (objects deleted since they were
    listed have none) and how many images it decoded."""
    settings = MachineSettings()
    config = ImageConfig.model_validate(image_config)
    config_key = keys.image_config_key(config.fingerprint())
    lake, workspace = Storage(lake_url, settings), Storage(workspace_url, settings)
    infos = {o.key: o for o in shard}
    rows: list[dict[str, Any]] = []
    new_ids: list[str] = []
    new_pixels: list[bytes] = []
    seen: set[str] = set()
    for key, data in lake.read_many(list(infos), settings.read_batch, errors="return"):
        if isinstance(data, FileNotFoundError):
            continue  # deleted since it was listed: no longer part of the lake
        if isinstance(data, OSError):
            rows.append({**_blank_row(infos[key]), "reason": DENIED})
            continue
        row = {**_blank_row(infos[key]), "size": len(data), "image_id": image_id(data)}
        try:
            info = inspect_image(data, config.max_pixels)
            row.update(format=info.format, mode=info.mode, width=info.width, height=info.height)
            if row["image_id"] not in known and row["image_id"] not in seen:
                new_pixels.append(decode_image(data, config).numpy().tobytes())
                new_ids.append(row["image_id"])
                seen.add(row["image_id"])
        except ImageDecodeError as exc:
            row["reason"] = exc.reason
        rows.append(row)
    if new_ids:
        name = hashlib.sha256("\n".join([config_key, *new_ids]).encode()).hexdigest()[:32]
        pixels.write_shard(workspace, config_key, new_ids, new_pixels, name=name)
    return {"pid": os.getpid(), "rows": rows, "decoded": len(new_ids)}


def unique_ids(table: pa.Table) -> list[str]:
    """Sorted unique image_ids of a catalog table: the row order of every training stage."""
    return sorted(set(table["image_id"].to_pylist()))


def first_labels(table: pa.Table, ids: list[str]) -> np.ndarray:
    """Label of each id (its first labelled catalog row), ``-1`` when unknown."""
    found: dict[str, int] = {}
    for image, label in zip(table["image_id"].to_pylist(), table["label"].to_pylist(), strict=True):
        if label is not None and image not in found:
            found[image] = int(label)
    return np.array([found.get(i, -1) for i in ids], dtype=np.int64)
