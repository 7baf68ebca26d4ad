"""Duplicates stage: a Parquet report of exact and near-duplicate images.

- **Exact** duplicates are lake objects with the same content hash (one ``image_id``, several
  keys): the first key (by URI) is paired with every other one.
- **Near** duplicates are pairs of distinct images whose embeddings have a cosine similarity of at
  least ``duplicates.near_threshold``, read from the neighbours table (so only pairs within each
  other's ``neighbors.k`` nearest neighbours are found; the similarities are exact for the flat
  index and approximate for IVF/HNSW).

The pair-finding functions are pure; the stage reads the catalog and neighbours, writes
``duplicates.parquet`` (schema :data:`tasks.schemas.DUPLICATES`) and logs it to MLflow.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from prefect import task

from scan_core.config import DuplicatesConfig
from tasks.catalog import read_catalog
from tasks.neighbors import NEIGHBORS_FILE
from tasks.schemas import DUPLICATES
from tasks.stage import STAGE_TASK_OPTIONS, StageOutput, StageRequest, StageRun, run_stage

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
                }
            )
    return rows


def near_duplicate_pairs(
    ids: Sequence[str],
    neighbor_ids: Sequence[Sequence[str]],
    similarities: Sequence[Sequence[float]],
    threshold: float,
    groups: dict[str, list[str]],
) -> list[dict[str, Any]]:
    """One ``near`` row per unordered pair of distinct images with similarity >= ``threshold``.

    Args:
        ids: The anchors (unique image ids).
        neighbor_ids: Each anchor's neighbour ids.
        similarities: The matching cosine similarities.
        threshold: Minimum cosine similarity.
        groups: image_id -> sorted URIs (:func:`first_uris`).

    Returns:
        Rows sorted by (image_id, duplicate_id) with ``image_id < duplicate_id``; a pair found from
        both ends keeps its larger similarity.
    """
    best: dict[tuple[str, str], float] = {}
    for anchor, others, sims in zip(ids, neighbor_ids, similarities, strict=True):
        for other, sim in zip(others, sims, strict=True):
            if other == anchor or sim < threshold:
                continue
            pair = (anchor, other) if anchor < other else (other, anchor)
            best[pair] = max(best.get(pair, -1.0), float(sim))
    return [
        {
            "kind": "near",
            "image_id": a,
            "duplicate_id": b,
            "uri": groups[a][0],
            "duplicate_uri": groups[b][0],
            "similarity": sim,
        }
        for (a, b), sim in sorted(best.items())
    ]


def duplicates_fn(
    request: StageRequest, catalog: StageOutput, neighbors: StageOutput
) -> StageOutput:
    """Find exact and near duplicates; write the report."""

    def body(run: StageRun) -> dict[str, Any]:
        config = DuplicatesConfig.model_validate(request.config)
        table = read_catalog(run.workspace, catalog)
        groups = first_uris(table["image_id"].to_pylist(), table["uri"].to_pylist())
        nbrs = run.workspace.read_table(f"{neighbors.rel_dir}/{NEIGHBORS_FILE}")
        exact = exact_duplicate_pairs(groups)
        near = near_duplicate_pairs(
            nbrs["image_id"].to_pylist(),
            nbrs["neighbor_ids"].to_pylist(),
            nbrs["similarities"].to_pylist(),
            config.near_threshold,
            groups,
        )
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
        return {**counts, "near_threshold": config.near_threshold}

    return run_stage(request, body)


@task(name="duplicates", **STAGE_TASK_OPTIONS)
def duplicates(request: StageRequest, catalog: StageOutput, neighbors: StageOutput) -> StageOutput:
    """Duplicates stage task (cached on the duplicates key)."""
    return duplicates_fn(request, catalog, neighbors)
