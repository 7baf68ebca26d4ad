"""Duplicates stage: a Parquet report of exact and near-duplicate images.

- **Exact** duplicates are lake objects with the same content hash (one ``image_id``, several
  keys): the first key (by URI) is paired with every other one.
- **Near** duplicates are pairs of distinct images that are one picture after an edit
  (re-encoded, resized, slightly cropped, brightened), found by :mod:`scan_core.duplicates` on the
  decoded pixels from the pixel store: perceptual hashes within ``duplicates.max_hamming`` bits,
  canonical views correlated at least ``duplicates.min_pixel_similarity``, and the embeddings'
  cosine similarity at least ``duplicates.min_cosine`` as a second opinion.

The row-building functions are pure; the stage reads the catalog, pixels and embeddings, writes
``duplicates.parquet`` (schema :data:`tasks.schemas.DUPLICATES`) and logs it to MLflow.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from prefect import task

from scan_core.config import DuplicatesConfig, ImageConfig
from scan_core.duplicates import Fingerprints, NearDuplicates, fingerprints, near_duplicates
from tasks.catalog import read_catalog
from tasks.embed import EMBEDDINGS_FILE, read_embeddings
from tasks.lake import unique_ids
from tasks.pixels import stream_pixels
from tasks.schemas import DUPLICATES
from tasks.stage import STAGE_TASK_OPTIONS, StageOutput, StageRequest, StageRun, run_stage
from tasks.storage import Storage

DUPLICATES_FILE = "duplicates.parquet"


def first_uris(image_ids: Sequence[str], uris: Sequence[str]) -> dict[str, list[str]]:
    """image_id -> the sorted URIs of the lake objects holding it."""
    groups: dict[str, list[str]] = {}
    for image, uri in zip(image_ids, uris, strict=True):
        groups.setdefault(image, []).append(uri)
    return {image: sorted(found) for image, found in groups.items()}


def exact_duplicate_pairs(groups: dict[str, list[str]]) -> list[dict[str, Any]]:
    """One ``exact`` row per extra object of an image: (first URI, other URI), by image_id."""
    rows = []
    for image in sorted(groups):
        first, *others = groups[image]
        for other in others:
            rows.append(
                {
                    "kind": "exact",
                    "image_id": image,
                    "duplicate_id": image,
                    "uri": first,
                    "duplicate_uri": other,
                    "similarity": 1.0,
                    "hamming": 0,
                    "cosine": 1.0,
                }
            )
    return rows


def near_duplicate_pairs(
    ids: Sequence[str], found: NearDuplicates, groups: dict[str, list[str]]
) -> list[dict[str, Any]]:
    """One ``near`` row per pair found by :func:`scan_core.duplicates.near_duplicates`.

    Args:
        ids: The images (unique ids) in the order of the rows the pairs index.
        found: The near-duplicate pairs (row indices into ``ids``).
        groups: image_id -> sorted URIs (:func:`first_uris`).

    Returns:
        Rows sorted by (image_id, duplicate_id) with ``image_id < duplicate_id``.
    """
    rows = []
    for i, j, hamming, pixel, cosine in zip(
        found.first.tolist(),
        found.second.tolist(),
        found.hamming.tolist(),
        found.pixel_similarity.tolist(),
        found.cosine.tolist(),
        strict=True,
    ):
        a, b = (ids[i], ids[j]) if ids[i] < ids[j] else (ids[j], ids[i])
        rows.append(
            {
                "kind": "near",
                "image_id": a,
                "duplicate_id": b,
                "uri": groups[a][0],
                "duplicate_uri": groups[b][0],
                "similarity": pixel,
                "hamming": hamming,
                "cosine": None if math.isnan(cosine) else cosine,
            }
        )
    return sorted(rows, key=lambda r: (r["image_id"], r["duplicate_id"]))


def image_fingerprints(workspace: Storage, catalog: StageOutput, ids: list[str]) -> Fingerprints:
    """Fingerprints of the images ``ids`` from the pixel store, one store shard at a time
    (:func:`tasks.pixels.stream_pixels`), in the order of ``ids``.

    Raises:
        ScanLakeError: an image is missing from the pixel store.
        WorkspaceFileError: a pixel store shard is not one.
    """
    image_config = ImageConfig.model_validate(catalog.summary["image_config"])
    key = catalog.summary["image_config_key"]
    hashes: np.ndarray | None = None
    views: np.ndarray | None = None
    for rows, images in stream_pixels(workspace, key, ids, image_config):
        part = fingerprints(images)
        if hashes is None or views is None:
            hashes = np.zeros((len(ids), *part.hashes.shape[1:]), dtype=part.hashes.dtype)
            views = np.zeros((len(ids), *part.views.shape[1:]), dtype=part.views.dtype)
        hashes[rows], views[rows] = part.hashes, part.views
    if hashes is None or views is None:
        return fingerprints(np.zeros((0, 1, 8, 8), dtype=np.uint8))
    return Fingerprints(hashes, views)


def aligned_embeddings(workspace: Storage, embed: StageOutput, ids: list[str]) -> np.ndarray:
    """The embeddings of ``ids``, in that order.

    Raises:
        WorkspaceFileError: the embeddings table is not one, or lacks an image of ``ids``.
    """
    embedded, vectors = read_embeddings(workspace, embed)
    row = {image_id: i for i, image_id in enumerate(embedded)}
    missing = [i for i in ids if i not in row]
    if missing:
        raise workspace.bad_file(
            f"{embed.rel_dir}/{EMBEDDINGS_FILE}",
            f"has no embedding for {len(missing)} catalogued images (e.g. {missing[0][:12]})",
        )
    return np.asarray(vectors[[row[i] for i in ids]], dtype=np.float32)


@task(name="duplicates", **STAGE_TASK_OPTIONS)
def duplicates(request: StageRequest, catalog: StageOutput, embed: StageOutput) -> StageOutput:
    """Find exact and near duplicates; write the report."""

    def body(run: StageRun) -> dict[str, Any]:
        config = DuplicatesConfig.model_validate(request.config)
        table = read_catalog(run.workspace, catalog)
        groups = first_uris(table["image_id"].to_pylist(), table["uri"].to_pylist())
        ids = unique_ids(table)
        prints = image_fingerprints(run.workspace, catalog, ids)
        found = near_duplicates(
            prints,
            config.max_hamming,
            config.min_pixel_similarity,
            aligned_embeddings(run.workspace, embed, ids),
            config.min_cosine,
        )
        exact = exact_duplicate_pairs(groups)
        near = near_duplicate_pairs(ids, found, groups)
        report = pa.Table.from_pylist(exact + near, schema=DUPLICATES)
        run.write_table(DUPLICATES_FILE, report)
        buffer = io.BytesIO()
        pq.write_table(report, buffer)
        run.log_artifact(DUPLICATES_FILE, buffer.getvalue())
        counts = {
            "exact_groups": sum(1 for uris in groups.values() if len(uris) > 1),
            "exact_duplicate_objects": len(exact),
            "near_pairs": len(near),
            "near_images": len({r["image_id"] for r in near} | {r["duplicate_id"] for r in near}),
        }
        run.log_metrics({f"duplicates/{k}": float(v) for k, v in counts.items()})
        return {**counts, "thresholds": config.model_dump(mode="json")}

    return run_stage(request, body)
